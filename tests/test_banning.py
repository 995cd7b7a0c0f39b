"""rs.ban_experts: banned choices move to the next-best allowed expert; real tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import routescope as rs


def batch(rows: int = 2, length: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 100, (rows, length), generator=torch.Generator().manual_seed(seed))


def layer_rows(run_dir, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [tokens, k], weights [tokens, k]) of one layer, tokens in (seq_id, pos) order."""
    with rs.open_run(run_dir) as run:
        df = run.sql(
            "SELECT expert, weight, slot FROM routing WHERE layer = $layer ORDER BY seq_id, pos, slot",
            {"layer": layer},
        )
        k = run.top_k(layer)
    return df["expert"].to_numpy(np.int64).reshape(-1, k), df["weight"].to_numpy(np.float32).reshape(-1, k)


@pytest.mark.slow
def test_banned_choices_move_to_the_next_best_allowed_expert(tiny_model, tmp_path):
    model = tiny_model("mixtral")
    ids = batch()
    with torch.no_grad(), rs.record(model, tmp_path / "original"):
        model(input_ids=ids)
    before, before_w = layer_rows(tmp_path / "original", 0)
    banned = int(np.bincount(before.reshape(-1)).argmax())  # the busiest expert of layer 0
    seen = {}

    def keep_logits(module, args, output):
        seen["logits"] = output[0].detach()

    handle = model.model.layers[0].mlp.gate.register_forward_hook(keep_logits)
    try:
        with torch.no_grad(), rs.ban_experts(model, {0: [banned]}), rs.record(model, tmp_path / "banned"):
            model(input_ids=ids)
    finally:
        handle.remove()
    after, after_w = layer_rows(tmp_path / "banned", 0)
    assert banned not in after
    hit = (before == banned).any(1)
    assert hit.any() and (~hit).any()
    np.testing.assert_array_equal(after[~hit], before[~hit])  # untouched tokens: exactly as before
    np.testing.assert_array_equal(after_w[~hit], before_w[~hit])
    # layer 0 is the first layer, so its router logits are the same with and without the ban
    logits = seen["logits"].float()
    probs = logits.softmax(-1)
    for t in np.flatnonzero(hit):
        slot = int(np.flatnonzero(before[t] == banned)[0])
        other = before[t][1 - slot]
        assert after[t][1 - slot] == other  # the allowed choice keeps its slot
        ranked = [int(e) for e in logits[t].argsort(descending=True) if int(e) not in (banned, other)]
        assert after[t][slot] == ranked[0]
        chosen = probs[t, after[t]]
        np.testing.assert_allclose(after_w[t], (chosen / chosen.sum()).numpy(), rtol=1e-6)


def test_group_limited_router_bans_and_trains(tiny_model, tmp_path):
    """DeepSeek-V3 (bias, 2 groups of 4, one group per token): the banned expert never runs,
    every token still has k choices, and gradients reach the routers."""
    model = tiny_model("deepseek_v3")
    ids = batch()
    model.train()
    with rs.ban_experts(model, {1: [0, 5], 2: [3]}), rs.record(model, tmp_path / "banned"):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    model.eval()
    for layer, gone in ((1, [0, 5]), (2, [3])):
        chosen, weights = layer_rows(tmp_path / "banned", layer)
        assert chosen.shape == (ids.numel(), 2) and not np.isin(chosen, gone).any()
        assert (weights > 0).all()
        assert (np.sort(chosen, 1)[:, 0] != np.sort(chosen, 1)[:, 1]).all()  # two distinct experts
    grads = [model.model.layers[i].mlp.gate.weight.grad for i in (1, 2)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_ban_combines_with_prune_and_restores_the_model(tiny_model):
    model = tiny_model("qwen3_moe")
    ids = batch()
    with torch.no_grad():
        original = model(input_ids=ids).logits
        with rs.ban_experts(model, {0: [1]}):
            banned = model(input_ids=ids).logits
        with rs.prune_experts(model, [(0, 2)]):
            pruned = model(input_ids=ids).logits
        with rs.ban_experts(model, {0: [1]}), rs.prune_experts(model, [(0, 2)]):
            both = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert not torch.allclose(banned, original) and not torch.allclose(pruned, original)
    assert not torch.allclose(both, banned) and not torch.allclose(both, pruned)
    assert torch.equal(after, original)


def test_bad_bans_name_what_is_allowed(tiny_model):
    model = tiny_model("mixtral")  # 2 MoE layers, 4 experts, k = 2
    with pytest.raises(ValueError, match=r"layer 7 is not a MoE layer; valid .*0: experts 0\.\.3"):
        with rs.ban_experts(model, {7: [0]}):
            pass
    with pytest.raises(ValueError, match="layer 0 has no expert 4"):
        with rs.ban_experts(model, {0: [4]}):
            pass
    with pytest.raises(ValueError, match="at most 2 of its 4 can be banned"):
        with rs.ban_experts(model, {0: [0, 1, 2]}):
            pass
    with pytest.raises(ValueError, match="takes {layer: \\[expert ids\\]}"):
        with rs.ban_experts(model, [(0, 1)]):
            pass
    llama = tiny_model("llama4")
    with pytest.raises(rs.RouteScopeError, match="ban_experts cannot force router kind llama4"):
        with rs.ban_experts(llama, {0: [1]}):
            pass
    with pytest.raises(KeyError), rs.ban_experts(model, {0: [1]}):
        raise KeyError("user code failed")  # hooks go (the conftest fixture checks every model)

"""rs.replay: a model made to follow recorded routing, on real tiny models and real runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import routescope as rs
from routescope.capture.recording.wraps import is_wrapped
from routescope.importers import ImportedRun, write_imported_run
from routescope.importers.vllm import import_vllm
from tests.moe_types import installed_moe_types

DOCS = Path(__file__).resolve().parent.parent / "docs" / "models.md"
# Router kinds whose decision is not an experts call, so replay cannot swap it (docs/models.md, Replay).
NOT_REPLAYABLE = {
    "doge": "product_key",
    "jetmoe": "sorted_gating",
    "llama4": "llama4",
    "zaya": "skip_router",
}
# Model types whose combine weights follow none of adapters.WEIGHT_RULES: weights="recorded" only.
ROUTER_WEIGHT_GAPS = {
    "inkling_text": "a softmax over log-sigmoid scores that includes the shared experts' gammas",
    "phimoe": "sparsemixer: each slot's weight is a masked softmax after the earlier slots",
}

# DeepSeek-V3's tiny config has a dense first layer, a score-correction bias and
# group-limited choice (8 experts in 2 groups, 1 group per token).
FAMILIES = ["mixtral", "qwen3_moe", "deepseek_v3"]


def batch(rows: int = 2, length: int = 10, seed: int = 0, vocab: int = 100) -> torch.Tensor:
    return torch.randint(1, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


def routers(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Router weight matrices (the experts' sibling gate / router), by parameter name."""
    return {
        name: p
        for name, p in model.named_parameters()
        if name.endswith(("mlp.gate.weight", "mlp.router.weight", "block_sparse_moe.gate.weight"))
    }


def perturb_routers(model: torch.nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in routers(model).values():
            p.add_(torch.randn(p.shape, generator=gen) * 4 * p.abs().mean().clamp_min(0.05))


def rows(run_dir) -> pd.DataFrame:
    """Routing rows joined to token content, in a batch-order-free key (token prefix, layer, slot)."""
    with rs.open_run(run_dir) as run:
        tokens = run.sql("SELECT seq_id, pos, token_id FROM tokens ORDER BY seq_id, pos")
        routing = run.sql("SELECT * FROM routing ORDER BY seq_id, pos, layer, slot")
    prefixes = {}
    for seq_id, group in tokens.groupby("seq_id"):
        ids = group["token_id"].tolist()
        for pos in group["pos"]:
            prefixes[(seq_id, pos)] = tuple(ids[: pos + 1])
    routing["prefix"] = [prefixes[(s, p)] for s, p in zip(routing["seq_id"], routing["pos"], strict=True)]
    cols = ["prefix", "layer", "slot", "expert"] + (["weight"] if "weight" in routing else [])
    return routing[cols].sort_values(["prefix", "layer", "slot"], ignore_index=True)


def hook_count(model: torch.nn.Module) -> int:
    """routescope's hooks and forward wraps on any submodule (transformers keeps hooks of its own)."""
    hooks = [h for m in model.modules() for h in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]]
    ours = sum(getattr(getattr(h, "__func__", h), "__module__", "").startswith("routescope") for h in hooks)
    return ours + sum(is_wrapped(m) for m in model.modules())


@pytest.mark.slow
@pytest.mark.parametrize("model_type", FAMILIES)
def test_recorded_weights_reproduce_the_original_forward_after_routers_change(
    tiny_model, tmp_path, model_type
):
    model = tiny_model(model_type)
    ids = batch()
    with torch.no_grad():
        with rs.record(model, tmp_path / "original"):
            original = model(input_ids=ids).logits
        perturb_routers(model)
        with rs.record(model, tmp_path / "perturbed"):
            plain = model(input_ids=ids).logits
        with rs.replay(model, tmp_path / "original", weights="recorded") as replayer:
            with rs.record(model, tmp_path / "inside"):
                replayed = model(input_ids=ids).logits
    before, after = rows(tmp_path / "original"), rows(tmp_path / "perturbed")
    assert not before["expert"].equals(after["expert"]), "the perturbation must change the routing"
    assert not torch.allclose(plain, original)
    assert torch.equal(replayed, original)
    pd.testing.assert_frame_equal(rows(tmp_path / "inside"), before)
    assert replayer.replayed_tokens == ids.numel() and replayer.fallback_tokens == 0


@pytest.mark.slow
def test_tokens_match_by_content_not_batch_order(tiny_model, tmp_path):
    """Rows recorded as batch [a, b] replay as [b, a] and as a alone; left padding is skipped."""
    model = tiny_model("mixtral")
    ids = batch(rows=2, length=8)
    with torch.no_grad():
        with rs.record(model, tmp_path / "original"):
            model(input_ids=ids)
        perturb_routers(model)
        padded = torch.cat(
            [torch.zeros(1, 3, dtype=ids.dtype), ids[:1, :5]], dim=1
        )  # left-padded prefix of a
        mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
        with rs.replay(model, tmp_path / "original"):
            with rs.record(model, tmp_path / "swapped"):
                model(input_ids=ids.flip(0))
            with rs.record(model, tmp_path / "padded"):
                model(input_ids=padded, attention_mask=mask)
    original = rows(tmp_path / "original")
    pd.testing.assert_frame_equal(rows(tmp_path / "swapped"), original)
    prefix = rows(tmp_path / "padded")
    expected = original[original["prefix"].isin(set(prefix["prefix"]))].reset_index(drop=True)
    assert len(prefix) == 5 * 2 * 2  # the 5 unpadded tokens, 2 layers, k = 2
    pd.testing.assert_frame_equal(prefix, expected)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", FAMILIES)
def test_router_weights_follow_recorded_ids_and_train_the_routers(tiny_model, tmp_path, model_type):
    model = tiny_model(model_type)
    ids = batch()
    with torch.no_grad(), rs.record(model, tmp_path / "original"):
        original = model(input_ids=ids).logits
    # unchanged routers: the router's weights at its own ids are what it applied
    with torch.no_grad(), rs.replay(model, tmp_path / "original", weights="router") as replayer:
        same = model(input_ids=ids).logits
    torch.testing.assert_close(same, original, rtol=1e-5, atol=1e-6)
    assert set(replayer.rules) == set(rs.open_run(tmp_path / "original").moe_layers)

    perturb_routers(model)
    model.train()
    model.zero_grad()
    with rs.replay(model, tmp_path / "original", weights="router"):
        with rs.record(model, tmp_path / "inside"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    model.eval()
    grads = {name: p.grad for name, p in routers(model).items()}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), grads.keys()
    before, inside = rows(tmp_path / "original"), rows(tmp_path / "inside")
    pd.testing.assert_series_equal(inside["expert"], before["expert"])  # the recorded ids ...
    assert not np.allclose(inside["weight"], before["weight"])  # ... with the changed router's weights


def test_weights_rule_matches_an_independent_mixtral_computation(tiny_model, tmp_path):
    """Mixtral: softmax over all experts, renormalised over the chosen ones (transformers'
    MixtralTopKRouter), computed here from the router's own logits at the recorded ids."""
    model = tiny_model("mixtral")
    ids = batch(rows=1)
    with torch.no_grad(), rs.record(model, tmp_path / "original"):
        model(input_ids=ids)
    perturb_routers(model)
    seen = {}
    gate = model.model.layers[0].mlp.gate

    def keep_logits(module, args, output):
        seen["logits"] = output[0].detach()

    handle = gate.register_forward_hook(keep_logits)
    try:
        with torch.no_grad(), rs.replay(model, tmp_path / "original", weights="router"):
            with rs.record(model, tmp_path / "inside"):
                model(input_ids=ids)
    finally:
        handle.remove()
    got = rows(tmp_path / "inside")
    got = got[got["layer"] == 0]
    chosen = torch.tensor(got["expert"].to_numpy().astype(np.int64)).reshape(-1, 2)
    probs = seen["logits"].float().softmax(-1).gather(1, chosen)
    expected = (probs / probs.sum(-1, keepdim=True)).reshape(-1).numpy()
    np.testing.assert_allclose(got["weight"].to_numpy(), expected, rtol=1e-6)


@pytest.mark.slow
def test_unknown_token_raises_and_missing_router_counts_fallbacks(tiny_model, tmp_path):
    model = tiny_model("qwen3_moe")
    ids = batch(rows=1, length=8)
    with torch.no_grad(), rs.record(model, tmp_path / "original"):
        model(input_ids=ids)
    changed = ids.clone()
    changed[0, 5] = (changed[0, 5] + 1) % 100 + 1  # tokens 0-4 keep their prefix, 5-7 do not
    with pytest.raises(rs.RouteScopeError, match=r"3 of 8 tokens .* missing='router'"):
        with torch.no_grad(), rs.replay(model, tmp_path / "original"):
            model(input_ids=changed)
    assert hook_count(model) == 0
    perturb_routers(model)
    with pytest.warns(UserWarning, match="3 tokens were not in the run"):
        with torch.no_grad(), rs.replay(model, tmp_path / "original", missing="router") as replayer:
            with rs.record(model, tmp_path / "mixed"):
                model(input_ids=changed)
    assert (replayer.replayed_tokens, replayer.fallback_tokens) == (5, 3)
    original, mixed = rows(tmp_path / "original"), rows(tmp_path / "mixed")
    shared = mixed[mixed["prefix"].map(len) <= 5].reset_index(drop=True)
    pd.testing.assert_frame_equal(shared, original[original["prefix"].map(len) <= 5].reset_index(drop=True))


def test_no_hooks_left_after_an_error_inside_the_block(tiny_model, tmp_path):
    model = tiny_model("mixtral")
    with torch.no_grad(), rs.record(model, tmp_path / "original"):
        model(input_ids=batch())
    assert hook_count(model) == 0
    with pytest.raises(KeyError), rs.replay(model, tmp_path / "original"):
        assert hook_count(model) > 0
        raise KeyError("user code failed")
    assert hook_count(model) == 0
    with pytest.raises(rs.RouteScopeError), torch.no_grad(), rs.replay(model, tmp_path / "original"):
        model(input_ids=batch(seed=9))  # unknown tokens: the error comes from inside a hook
    assert hook_count(model) == 0
    with torch.no_grad(), rs.replay(model, tmp_path / "original"):  # and the model replays again after
        model(input_ids=batch())


@pytest.mark.slow
def test_generate_follows_the_recorded_decode_steps(tiny_model, tmp_path):
    model = tiny_model("deepseek_v3")
    ids = batch(rows=2, length=6)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad(), rs.record(model, tmp_path / "original"):
        original = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings)
    perturb_routers(model, seed=3)
    with torch.no_grad(), rs.replay(model, tmp_path / "original") as replayer:
        with rs.record(model, tmp_path / "inside"):
            replayed = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings)
    assert torch.equal(replayed, original)
    assert replayer.replayed_tokens == 2 * (6 + 5)  # the prompt and every fed-back token
    pd.testing.assert_frame_equal(rows(tmp_path / "inside"), rows(tmp_path / "original"))
    with rs.open_run(tmp_path / "inside") as run:
        assert run.sql("SELECT count(*) AS n FROM tokens WHERE phase = 'decode'")["n"][0] == 2 * 5


@pytest.mark.slow
def test_a_vllm_routed_experts_import_drives_replay(tiny_model, tmp_path):
    """A rollout's routing from vLLM (ids only) forced into a transformers forward: the ids
    the experts see are the file's, not what the tiny model's router would pick."""
    model = tiny_model("deepseek_v3")  # MoE layers 1 and 2 (layer 0 is dense), 8 experts, k = 2
    rng = np.random.default_rng(0)
    prompt, completion = rng.integers(1, 100, 5), rng.integers(1, 100, 4)
    tokens = np.concatenate([prompt, completion])
    experts = np.stack([rng.permutation(8)[:2] for _ in range(len(tokens) * 2)]).reshape(len(tokens), 2, 2)
    np.savez(tmp_path / "rollout.npz", req0=experts, req0_token_ids=tokens, req0_prompt_len=np.array([5]))
    imported = import_vllm(tmp_path / "rollout.npz", moe_layers=[1, 2], num_experts=8)
    write_imported_run(imported, tmp_path / "vllm")
    ids = torch.tensor(tokens).unsqueeze(0)
    with pytest.raises(rs.RouteScopeError, match="no combine weights.*weights='router'"):
        with rs.replay(model, tmp_path / "vllm", weights="recorded"):
            pass
    model.train()
    with rs.replay(model, tmp_path / "vllm", weights="router"):
        with rs.record(model, tmp_path / "inside"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    model.eval()
    with rs.open_run(tmp_path / "inside") as run:
        got = run.sql("SELECT pos, layer, slot, expert FROM routing ORDER BY pos, layer, slot")
    np.testing.assert_array_equal(got["expert"].to_numpy().reshape(experts.shape), experts)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers(model).values())

    # the same file numbered by MoE index (0, 1) does not fit a model whose MoE layers are 1, 2
    write_imported_run(import_vllm(tmp_path / "rollout.npz"), tmp_path / "vllm_moe_index")
    with pytest.raises(rs.RouteScopeError, match="--moe-layers"):
        with rs.replay(model, tmp_path / "vllm_moe_index", weights="router"):
            pass


def test_an_sglang_per_token_dump_drives_replay(tiny_model, tmp_path):
    """SGLang's expert-distribution recorder (per_token mode) as written in
    tests/test_importers_sglang.py: requests batched into EXTEND, DECODE and MIXED passes,
    physical expert slots mapped back to logical ids. Replaying it in one padded batch gives
    every token the experts SGLang routed it to."""
    from routescope.importers.sglang import import_sglang
    from tests.test_importers_sglang import SCHEDULE, make_truth, per_token_record, save_dump

    truth = make_truth()
    records = [per_token_record(fid, mode, batch, truth) for fid, (mode, batch) in enumerate(SCHEDULE)]
    write_imported_run(import_sglang([save_dump(tmp_path / "dump.pt", records)]), tmp_path / "sglang")
    # three layers with a dense first one: MoE layers 1 and 2, four experts, top-2 (as the dump)
    model = tiny_model("deepseek_v3", vocab_size=512, n_routed_experts=4, n_group=1, topk_group=1)
    sequences = [[tok["token_id"] for tok in tokens] for tokens in truth.values()]
    ids = torch.zeros(len(sequences), max(map(len, sequences)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq), 1
    with torch.no_grad(), rs.replay(model, tmp_path / "sglang", weights="router") as replayer:
        with rs.record(model, tmp_path / "inside"):
            model(input_ids=ids, attention_mask=mask)
    assert replayer.replayed_tokens == int(mask.sum())
    got = rows(tmp_path / "inside")
    truth_rows = {
        (tuple(seq[: tok["pos"] + 1]), layer, slot): e
        for seq, tokens in zip(sequences, truth.values(), strict=True)
        for tok in tokens
        for layer in (1, 2)
        for slot, e in enumerate(tok["experts"][layer])
    }
    recorded = {(r.prefix, r.layer, r.slot): r.expert for r in got.itertuples()}
    assert len(got) == len(truth_rows) and recorded == truth_rows


def test_bad_runs_and_arguments_are_named(tiny_model, tmp_path):
    model = tiny_model("mixtral")
    with torch.no_grad(), rs.record(model, tmp_path / "mixtral"):
        model(input_ids=batch())
    other = tiny_model("mixtral", num_local_experts=8, num_experts=8)
    with pytest.raises(rs.RouteScopeError, match="layer 0 has 4 experts and top-k 2.*8 experts"):
        with rs.replay(other, tmp_path / "mixtral"):
            pass
    deeper = tiny_model("mixtral", num_hidden_layers=3)
    with pytest.raises(rs.RouteScopeError, match=r"MoE layers \[0, 1\], this model has \[0, 1, 2\]"):
        with rs.replay(deeper, tmp_path / "mixtral"):
            pass
    counts = ImportedRun(
        engine="sglang",
        mode="stat",
        num_hidden_layers=2,
        num_experts={0: 4, 1: 4},
        top_k={0: 2, 1: 2},
        expert_counts={
            "step": np.zeros(8, dtype=np.int32),
            "layer": np.repeat(np.arange(2, dtype=np.int16), 4),
            "expert": np.tile(np.arange(4, dtype=np.int16), 2),
            "tokens": np.ones(8, dtype=np.int64),
        },
    )
    write_imported_run(counts, tmp_path / "counts")
    with pytest.raises(rs.RouteScopeError, match="no per-token routing"):
        with rs.replay(model, tmp_path / "counts"):
            pass
    with pytest.raises(ValueError, match="weights='soft' is not allowed; use one of recorded, router"):
        rs.replay(model, tmp_path / "mixtral", weights="soft")
    with pytest.raises(ValueError, match="missing='skip' is not allowed"):
        rs.replay(model, tmp_path / "mixtral", missing="skip")
    with pytest.raises(FileNotFoundError):
        rs.replay(model, tmp_path / "nowhere").__enter__()
    with pytest.raises(rs.RouteScopeError, match="input_ids"):
        with torch.no_grad(), rs.replay(model, tmp_path / "mixtral"):
            model(inputs_embeds=torch.zeros(1, 3, 32))
    assert hook_count(model) == hook_count(other) == hook_count(deeper) == 0


@pytest.mark.parametrize("model_type", ["llama4", "jetmoe"])
def test_router_kinds_that_cannot_be_replayed_say_so(tiny_model, tmp_path, model_type):
    model = tiny_model(model_type)
    with torch.no_grad(), rs.record(model, tmp_path / "run"):
        model(input_ids=batch())
    with pytest.raises(rs.RouteScopeError, match="cannot force router kind .*docs/models.md"):
        with rs.replay(model, tmp_path / "run"):
            pass
    assert hook_count(model) == 0


def test_router_weights_without_a_known_rule_say_so(tiny_model, tmp_path):
    """PhiMoE's sparsemixer weights match none of the rules: weights='recorded' still works."""
    model = tiny_model("phimoe")
    ids = batch()
    with torch.no_grad(), rs.record(model, tmp_path / "run"):
        original = model(input_ids=ids).logits
    with pytest.raises(rs.RouteScopeError, match="no known weight rule .*PhimoeTopKRouter"):
        with torch.no_grad(), rs.replay(model, tmp_path / "run", weights="router"):
            model(input_ids=ids)
    with torch.no_grad(), rs.replay(model, tmp_path / "run"):
        assert torch.equal(model(input_ids=ids).logits, original)


@pytest.mark.slow
def test_left_padded_generate_replays_every_row(tiny_model, tmp_path):
    """Decode steps extend each row's history under a growing 2-D attention mask."""
    model = tiny_model("mixtral")
    ids = batch(rows=2, length=7, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :3], ids[1, :3] = 0, 0  # row 1: 4 real prompt tokens, left-padded
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad(), rs.record(model, tmp_path / "original"):
        original = model.generate(input_ids=ids, attention_mask=mask, **settings)
    perturb_routers(model)
    with torch.no_grad(), rs.replay(model, tmp_path / "original") as replayer:
        with rs.record(model, tmp_path / "inside"):
            replayed = model.generate(input_ids=ids, attention_mask=mask, **settings)
    assert torch.equal(replayed, original)
    assert replayer.replayed_tokens == (7 + 4) + 2 * 5
    pd.testing.assert_frame_equal(rows(tmp_path / "inside"), rows(tmp_path / "original"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model_type", "cache"),
    [("qwen3_moe", "static"), ("qwen3_next", None), ("jamba", None), ("nemotron_h", None)],
)
def test_generate_on_static_and_hybrid_caches(tiny_model, tmp_path, model_type, cache):
    """A static cache hands the model a 4-D mask (padding read from it, as rs.record does);
    linear-attention hybrids' caches may report no length (the 2-D mask gives it)."""
    model = tiny_model(model_type)
    ids = batch(rows=2, length=7, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :3], ids[1, :3] = 0, 0
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation=cache)
    with torch.no_grad(), rs.record(model, tmp_path / "original"):
        original = model.generate(input_ids=ids, attention_mask=mask, **settings)
    with torch.no_grad(), rs.replay(model, tmp_path / "original") as replayer:
        with rs.record(model, tmp_path / "inside"):
            replayed = model.generate(input_ids=ids, attention_mask=mask, **settings)
    assert torch.equal(replayed, original)
    assert replayer.replayed_tokens == (7 + 4) + 2 * 3 and replayer.fallback_tokens == 0
    pd.testing.assert_frame_equal(rows(tmp_path / "inside"), rows(tmp_path / "original"))


@pytest.mark.slow
def test_generate_rows_that_finish_early_are_not_missing(tiny_model, tmp_path):
    """generate feeds pad tokens to a row after its EOS; rs.record skips them, so replay must
    let the model route them instead of calling them unknown."""
    model = tiny_model("qwen3_moe")
    ids = batch(rows=2, length=5, seed=0)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        free = model.generate(input_ids=ids, **settings)
    eos = int(free[0, 5 + 1])  # row 0's second new token ends row 0
    assert not (free[1, 5:] == eos).any() and not (free[0, 5:6] == eos).any(), "pick another seed"
    model.generation_config.eos_token_id = eos
    with torch.no_grad(), rs.record(model, tmp_path / "original"):
        original = model.generate(input_ids=ids, **settings)
    assert (original[0, 5 + 2 :] == 0).all() and (original[1, 5 + 2 :] != 0).any()
    perturb_routers(model)
    with torch.no_grad(), rs.replay(model, tmp_path / "original") as replayer:
        replayed = model.generate(input_ids=ids, **settings)
    assert torch.equal(replayed, original)
    assert replayer.fallback_tokens == 0
    with rs.open_run(tmp_path / "original") as run:
        assert replayer.replayed_tokens == run.manifest["tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", installed_moe_types())
def test_every_installed_moe_type_replays_or_says_why(tiny_model, tmp_path, model_type):
    """weights='recorded' gives the recorded forward exactly; weights='router' finds the weight
    rule of the family (same logits, routers unchanged) or names why not."""
    model = tiny_model(model_type)
    ids = batch()
    with torch.no_grad(), rs.record(model, tmp_path / "run"):
        original = model(input_ids=ids).logits
    if model_type in NOT_REPLAYABLE:
        with pytest.raises(
            rs.RouteScopeError, match=f"cannot force router kind {NOT_REPLAYABLE[model_type]}"
        ):
            with rs.replay(model, tmp_path / "run"):
                pass
        return
    with torch.no_grad(), rs.replay(model, tmp_path / "run"):
        assert torch.equal(model(input_ids=ids).logits, original)
    if model_type in ROUTER_WEIGHT_GAPS:
        with pytest.raises(rs.RouteScopeError, match="no known weight rule"):
            with torch.no_grad(), rs.replay(model, tmp_path / "run", weights="router"):
                model(input_ids=ids)
        return
    with torch.no_grad(), rs.replay(model, tmp_path / "run", weights="router") as replayer:
        torch.testing.assert_close(model(input_ids=ids).logits, original, rtol=1e-5, atol=1e-6)
    assert set(replayer.rules) == set(rs.open_run(tmp_path / "run").moe_layers)


def test_docs_list_every_replay_gap():
    text = DOCS.read_text(encoding="utf-8")
    section = text[text.index("## Replay") :]
    for model_type in [*NOT_REPLAYABLE, *ROUTER_WEIGHT_GAPS]:
        assert f"`{model_type}`" in section, model_type

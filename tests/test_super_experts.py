"""Super Expert calibration and expert pruning on tiny real models (no mocks, no downloads).

Planted Super Experts must rank first; max_abs_output must equal an independent reference
(plain matmuls over the tokens the model's own router chose, captured with forward hooks);
pruning must restore bit for bit and change only the tokens routed to the pruned expert.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import routescope as rs
from routescope.capture.calibration.activations import MedianSample, calibrate, massive_layer_count
from tests import analysis_reference as ref

BEAM = dict(num_hidden_layers=3, mlp_layer_types=["dense", "sparse", "sparse"], n_group=2, topk_group=1)

# (model type, config overrides, planted (layer, expert, shared), super under the default layers)
PLANTS = [
    ("mixtral", {}, (0, 2, False), True),
    ("qwen2_moe", {}, (1, 1, False), True),
    ("qwen2_moe", {}, (0, 0, True), True),
    ("deepseek_v3", {}, (1, 5, False), True),
    ("deepseek_v3", {}, (1, 0, True), True),
    ("deepseek_v3", {}, (2, 3, False), False),  # layer 2 of 3 is past round(0.75 * 3) = 2 layers
    ("olmoe", {}, (1, 3, False), True),
    ("gpt_oss", {}, (0, 1, False), True),  # transposed, biased, interleaved gate/up
    ("beam", BEAM, (1, 6, False), True),  # undecorated experts behind a separate router module
]


def make_batches(vocab: int = 128, seed: int = 0, n: int = 2, rows: int = 3, length: int = 12) -> list[dict]:
    """Left-padded batches: every second row has 4 padding tokens (attention_mask 0)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (rows, length), generator=gen)
        mask = torch.ones(rows, length, dtype=torch.long)
        mask[1::2, :4] = 0
        out.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask})
    return out


def shared_module(mlp: nn.Module) -> nn.Module:
    return getattr(mlp, "shared_expert", None) or mlp.shared_experts


def plant(model: nn.Module, layer: int, expert: int, shared: bool, factor: float = 50.0) -> None:
    mlp = model.model.layers[layer].mlp
    with torch.no_grad():
        if shared:
            shared_module(mlp).down_proj.weight.mul_(factor)
        else:
            mlp.experts.down_proj[expert].mul_(factor)


@pytest.mark.slow
@pytest.mark.parametrize(("model_type", "overrides", "planted", "is_super"), PLANTS)
def test_planted_super_expert_ranks_first(tiny_model, model_type, overrides, planted, is_super):
    model = tiny_model(model_type, **overrides)
    layer, expert, shared = planted
    plant(model, layer, expert, shared)
    df = rs.find_super_experts(model, make_batches(), progress=False)
    top = df.iloc[0]
    assert (int(top.layer), int(top.expert), bool(top.shared)) == planted
    assert top.tokens_seen > 0
    assert bool(top.is_super) is is_super
    if is_super:
        assert int(df["is_super"].sum()) == 1
    else:
        # The planted giant is outside the searched layers, so it sets no threshold (paper
        # code): the searched pool's own top expert may be flagged, never an unsearched one.
        searched = df.attrs["thresholds"]["layers"]
        assert df.loc[df["is_super"], "layer"].isin(searched).all()
        assert int(df["is_super"].sum()) <= 1
    assert top.max_abs_output > 10 * df["max_abs_output"].iloc[1]
    assert top.ratio_to_median > 10


def test_planted_outside_default_layers_found_when_layers_given(tiny_model):
    model = tiny_model("deepseek_v3")
    plant(model, 2, 3, False)
    df = rs.find_super_experts(model, make_batches(), layers=[1, 2], progress=False)
    assert df.loc[df["is_super"], ["layer", "expert"]].values.tolist() == [[2, 3]]
    assert df.attrs["thresholds"]["layers"] == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model_type", "overrides"), [("qwen2_moe", {}), ("deepseek_v3", {}), ("beam", BEAM)]
)
def test_every_expert_is_covered(tiny_model, model_type, overrides):
    model = tiny_model(model_type, **overrides)
    df = rs.find_super_experts(model, make_batches(), progress=False)
    expected = set()
    for site in rs.find_routers(model):
        expected |= {(site.layer, e, False) for e in range(site.num_experts)}
        mlp = model.model.layers[site.layer].mlp
        if hasattr(mlp, "shared_expert") or hasattr(mlp, "shared_experts"):
            expected.add((site.layer, 0, True))
    got = set(zip(df["layer"].astype(int), df["expert"].astype(int), df["shared"].astype(bool)))
    assert got == expected
    assert list(df.columns[:5]) == ["layer", "expert", "shared", "max_abs_output", "channel"]
    assert df["max_abs_output"].is_monotonic_decreasing


# -- reference values ----------------------------------------------------------------------
def _matmul_expert(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Standard layout [E, 2I, H] / [E, H, I]: act(x Wg^T) * (x Wu^T), then W_down^T."""
    gate, up = (x @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
    return (experts.act_fn(gate) * up) @ experts.down_proj[e].T


def _module_expert(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """The model's own experts forward with every token sent to `e` at weight 1."""
    n = x.shape[0]
    return experts(x, torch.full((n, 1), e, dtype=torch.long), torch.ones(n, 1, dtype=x.dtype))


def _matmul_shared(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    s = shared_module(mlp)
    return (s.act_fn(x @ s.gate_proj.weight.T) * (x @ s.up_proj.weight.T)) @ s.down_proj.weight.T


def reference(model: nn.Module, batches: list[dict], router_attr: str, expert_fn) -> dict:
    """{(layer, expert, shared): (max |out|, channel, tokens)} from hooks on each MoE block."""
    captured: dict[int, dict] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        if not hasattr(mlp, "experts"):
            continue
        handles.append(
            mlp.register_forward_pre_hook(lambda m, a, i=i: captured.setdefault(i, {}).update(x=a[0]))
        )
        router = getattr(mlp, router_attr)
        handles.append(router.register_forward_hook(lambda m, a, o, i=i: captured[i].update(idx=o[2])))
    best: dict = {}

    def account(key, out):
        if out.shape[0] == 0:
            return
        per_channel = out.abs().amax(dim=0)
        value, channel = float(per_channel.max()), int(per_channel.argmax())
        old = best.get(key, (0.0, -1, 0))
        best[key] = (max(old[0], value), channel if value > old[0] else old[1], old[2] + out.shape[0])

    try:
        with torch.no_grad():
            for batch in batches:
                captured.clear()
                model(**batch)
                valid = batch["attention_mask"].reshape(-1).bool()
                for i, c in captured.items():
                    mlp = model.model.layers[i].mlp
                    x = c["x"].reshape(-1, c["x"].shape[-1])
                    idx = c["idx"].reshape(x.shape[0], -1)
                    for e in range(mlp.experts.down_proj.shape[0]):
                        tokens = ((idx == e).any(dim=-1) & valid).nonzero().squeeze(1)
                        account((i, e, False), expert_fn(mlp.experts, e, x[tokens]))
                    if hasattr(mlp, "shared_expert") or hasattr(mlp, "shared_experts"):
                        account((i, 0, True), _matmul_shared(mlp, x[valid]))
    finally:
        for h in handles:
            h.remove()
    return best


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model_type", "overrides", "router_attr", "expert_fn"),
    [
        ("mixtral", {}, "gate", _matmul_expert),
        ("qwen2_moe", {}, "gate", _matmul_expert),
        ("deepseek_v3", {}, "gate", _matmul_expert),
        ("qwen3_moe", {}, "gate", _matmul_expert),
        ("gpt_oss", {}, "router", _module_expert),
        ("beam", BEAM, "gate", _matmul_expert),
    ],
)
def test_max_abs_output_matches_reference(tiny_model, model_type, overrides, router_attr, expert_fn):
    model = tiny_model(model_type, **overrides)
    batches = make_batches(seed=3)
    df = rs.find_super_experts(model, batches, progress=False)
    ref = reference(model, batches, router_attr, expert_fn)
    assert ref, "reference saw no expert"
    for row in df.itertuples():
        key = (int(row.layer), int(row.expert), bool(row.shared))
        value, channel, tokens = ref.get(key, (0.0, -1, 0))
        torch.testing.assert_close(float(row.max_abs_output), value, rtol=1e-5, atol=1e-7, msg=str(key))
        assert (int(row.channel), int(row.tokens_seen)) == (channel, tokens), key
    # padding does not count: the valid tokens, each seen by every shared expert once
    valid = sum(int(b["attention_mask"].sum()) for b in batches)
    assert all(t == valid for t in df.loc[df["shared"], "tokens_seen"])
    k = rs.find_routers(model)[0].top_k
    per_layer = df[~df["shared"]].groupby("layer")["tokens_seen"].sum()
    assert (per_layer == valid * k).all()


@pytest.mark.slow
def test_hidden_stats_match_reference(tiny_model):
    model = tiny_model("qwen2_moe")
    plant(model, 0, 0, True, factor=400.0)
    batches = make_batches(seed=5)
    result = calibrate(model, batches, progress=False)
    outputs: dict[int, list[torch.Tensor]] = {}
    handles = [
        layer.register_forward_hook(lambda m, a, o, i=i: outputs.setdefault(i, []).append(o))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    hidden = result.hidden.set_index("layer")
    assert list(hidden.index) == list(range(len(model.model.layers)))
    for i, outs in outputs.items():
        rows, values, where = [], [], None
        best = -1.0
        for b, (out, batch) in enumerate(zip(outs, batches)):
            mask = batch["attention_mask"].bool()
            a = out.abs().float()
            values.append(a[mask].reshape(-1))
            for r in range(a.shape[0]):
                pos = -1
                for s in range(a.shape[1]):
                    if not mask[r, s]:
                        continue
                    pos += 1
                    m = float(a[r, s].max())
                    if m > best:
                        best, where = m, (b * a.shape[0] + r, pos, int(a[r, s].argmax()))
        rows = hidden.loc[i]
        assert float(rows.max_abs) == pytest.approx(best, rel=1e-6)
        assert (int(rows.seq_id), int(rows.pos), int(rows.channel)) == where
        assert float(rows.median_abs) == pytest.approx(float(torch.cat(values).median()), rel=1e-6)


@pytest.mark.slow
def test_massive_activation_flagged(tiny_model):
    model = tiny_model("mixtral")
    # a massive value in the residual stream: one channel of layer 0's experts scaled far up
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[:, 5, :].mul_(5e6)
    result = calibrate(model, make_batches(), progress=False)
    row = result.hidden.set_index("layer").loc[0]
    assert row.channel == 5 and row.max_abs > 100 and bool(row.is_massive)
    assert row.ratio_to_median > 1000


@pytest.mark.slow
def test_median_sample_exact_below_cap():
    values = torch.arange(1000, dtype=torch.float32).flip(0)
    exact = MedianSample(cap=2000)
    for chunk in values.split(37):
        exact.add(chunk)
    assert exact.exact and exact.kept == 1000
    assert exact.median() == float(values.median())


@pytest.mark.slow
def test_median_sample_is_not_channel_aliased():
    """Hidden size 64 (a multiple of 8) with channels 0, 8, 16, ... scaled down: a stride
    sample keeps those channels only; the median must stay near the exact one."""
    hidden, tokens, cap = 64, 20_000, 4096
    gen = torch.Generator().manual_seed(3)
    h = 1.0 + torch.rand(tokens, hidden, generator=gen)
    h[:, ::8] *= 0.01
    sample = MedianSample(cap=cap)
    for chunk in h.split(97):  # one hook call per small batch of tokens
        sample.add(chunk.reshape(-1))
    truth = float(np.median(h.numpy()))
    assert not sample.exact and cap <= sample.kept <= 2 * cap
    assert abs(sample.median() - truth) < 0.05
    # every channel is kept about equally often (channel = flat index mod hidden)
    tagged = torch.arange(tokens * hidden, dtype=torch.float64).reshape(tokens, hidden)
    counter = MedianSample(cap=cap)
    for chunk in tagged.split(97):
        counter.add(chunk.reshape(-1))
    channels = (torch.cat(counter.values).long() % hidden).numpy()
    per_channel = np.bincount(channels, minlength=hidden)
    expected = counter.kept / hidden
    assert per_channel.min() > 0.5 * expected and per_channel.max() < 1.5 * expected


@pytest.mark.slow
def test_round_of_massive_layers():
    # Python's round, halves to even, as the paper code's round(total_layers * 0.75)
    assert [massive_layer_count(n) for n in (1, 2, 3, 4, 6, 10, 14, 48)] == [1, 2, 2, 3, 4, 8, 10, 36]
    assert all(massive_layer_count(n) == round(n * 0.75) for n in range(1, 200))


def _planted_frame(num_layers: int, experts: int, plants: dict[tuple[int, int], float], seed: int = 0):
    rng = np.random.default_rng(seed)
    layer = np.repeat(np.arange(num_layers), experts)
    expert = np.tile(np.arange(experts), num_layers)
    value = rng.uniform(1.0, 3.0, size=layer.size)
    for (lyr, e), factor in plants.items():
        value[(layer == lyr) & (expert == e)] *= factor
    return pd.DataFrame(
        {"layer": layer, "expert": expert, "shared": False, "max_abs_output": value, "tokens_seen": 5}
    )


@pytest.mark.slow
@pytest.mark.parametrize("giant", [200.0, 1100.0])
def test_late_giant_does_not_hide_searched_super_expert(giant):
    # 4 layers: the paper searches layers 0..2; a giant in layer 3 must not raise the thresholds
    acts = _planted_frame(4, 16, {(2, 9): 60.0, (3, 4): giant})
    out = rs.classify_super_experts(acts, num_hidden_layers=4)
    flagged = set(np.flatnonzero(out["is_super"].to_numpy()))
    truth = ref.super_experts_reference(acts["layer"].to_numpy(), acts["max_abs_output"].to_numpy(), 4)
    assert flagged == truth
    assert out.loc[out["is_super"], ["layer", "expert"]].values.tolist() == [[2, 9]]
    pool = acts.loc[acts["layer"] < 3, "max_abs_output"].to_numpy()
    th = out.attrs["thresholds"]
    assert th["percentile_threshold"] == pytest.approx(np.percentile(pool, 99.5))
    assert th["max_threshold"] == pytest.approx(pool.max() / 10)
    assert th["pooled_experts"] == 48
    assert out.loc[out["is_super"], "ratio_to_median"].iloc[0] == pytest.approx(pool.max() / np.median(pool))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_classifier_equals_paper_code_on_random_pools(seed):
    rng = np.random.default_rng(seed)
    layers = int(rng.integers(2, 15))
    plants = {
        (int(rng.integers(0, layers)), int(rng.integers(0, 8))): float(rng.choice([20, 80, 400]))
        for _ in range(3)
    }
    acts = _planted_frame(layers, 8, plants, seed=seed)
    acts["max_abs_output"] *= 10.0  # values >> 10, so the paper's max // 10 and our max / 10 agree
    out = rs.classify_super_experts(acts, num_hidden_layers=layers)
    truth = ref.super_experts_reference(acts["layer"].to_numpy(), acts["max_abs_output"].to_numpy(), layers)
    assert set(np.flatnonzero(out["is_super"].to_numpy())) == truth


@pytest.mark.slow
def test_planted_super_expert_beside_late_giant_in_a_real_model(tiny_model):
    model = tiny_model("mixtral", num_hidden_layers=4)
    plant(model, 2, 3, False, factor=50.0)
    plant(model, 3, 1, False, factor=1100.0)
    df = rs.find_super_experts(model, make_batches(), progress=False)
    assert df.attrs["thresholds"]["layers"] == [0, 1, 2]
    assert df.loc[df["is_super"], ["layer", "expert"]].values.tolist() == [[2, 3]]
    # independent NumPy: SPEC 4.6 over the searched layers' experts that saw a token
    seen = df[df["tokens_seen"] > 0].reset_index(drop=True)
    values = seen["max_abs_output"].to_numpy(dtype=np.float64)
    searched = seen["layer"].to_numpy() < 3
    pool = values[searched]
    expected = set(
        np.flatnonzero(searched & (values > np.percentile(pool, 99.5)) & (values > pool.max() / 10))
    )
    flagged = set(np.flatnonzero(seen["is_super"].to_numpy()))
    assert flagged == expected


def test_empty_calibration_data(tiny_model):
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="calibration data is empty"):
        rs.find_super_experts(model, [], progress=False)
    padding_only = [{"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.zeros(2, 4)}]
    with pytest.raises(ValueError, match="calibration data is empty"):
        rs.find_super_experts(model, iter(padding_only), progress=False)


def test_text_without_tokenizer(tiny_model):
    with pytest.raises(ValueError, match="tokenizer"):
        rs.find_super_experts(tiny_model("mixtral"), ["some text"], progress=False)


def test_dense_model_is_unsupported():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(rs.UnsupportedModelError, match="llama"):
        rs.find_super_experts(model, make_batches(), progress=False)
    with pytest.raises(rs.UnsupportedModelError):
        with rs.prune_experts(model, [(0, 0)]):
            pass


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _assert_same(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    now = dict(model.named_parameters())
    assert set(now) == set(before)
    for name, value in before.items():
        assert torch.equal(now[name], value), name


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        ([(0, 1), (1, 1)], "layer 0 is not a MoE layer"),  # deepseek_v3: layer 0 is dense
        ([(1, 8)], "layer 1 has no expert 8"),
        ([(1, -1)], "no expert -1"),
        ([(3, 0)], "layer 3 is not a MoE layer"),
        ([(1, "shared"), (2, "routed")], "no expert 'routed'"),
        ([(1,)], "pairs"),
    ],
)
def test_prune_unknown_expert_leaves_model_unchanged(tiny_model, targets, message):
    model = tiny_model("deepseek_v3")
    before = _params(model)
    with pytest.raises(ValueError, match=message) as info:
        with rs.prune_experts(model, targets):
            pytest.fail("the block must not run")
    assert '1: experts 0..7 or "shared"' in str(info.value)
    _assert_same(model, before)


def test_prune_shared_on_model_without_shared(tiny_model):
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="no shared expert"):
        with rs.prune_experts(model, [(0, "shared")]):
            pass


# -- pruning ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model_type", "targets"),
    [("mixtral", [(0, 1), (1, 3)]), ("deepseek_v3", [(1, 2), (2, "shared")]), ("gpt_oss", [(1, 0)])],
)
def test_prune_restores_exactly(tiny_model, model_type, targets):
    model = tiny_model(model_type)
    before = _params(model)
    batch = make_batches(n=1)[0]
    with torch.no_grad():
        reference_logits = model(**batch).logits
    with rs.prune_experts(model, targets) as pruned:
        assert pruned is model
        for layer, expert in targets:
            mlp = model.model.layers[layer].mlp
            if expert == "shared":
                assert not shared_module(mlp).down_proj.weight.any()
            else:
                assert not mlp.experts.down_proj[expert].any()
                if getattr(mlp.experts, "has_bias", False):
                    assert not mlp.experts.down_proj_bias[expert].any()
        with torch.no_grad():
            assert not torch.equal(model(**batch).logits, reference_logits)
    _assert_same(model, before)
    with pytest.raises(RuntimeError, match="boom"):
        with rs.prune_experts(model, targets):
            raise RuntimeError("boom")
    _assert_same(model, before)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference_logits)


def _block_outputs(model: nn.Module, layer: int, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    got = {}
    mlp = model.model.layers[layer].mlp
    handles = [
        mlp.register_forward_hook(lambda m, a, o: got.update(out=o[0] if isinstance(o, tuple) else o)),
        mlp.gate.register_forward_hook(lambda m, a, o: got.update(idx=o[2])),
    ]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return got["out"].reshape(-1, got["out"].shape[-1]), got["idx"]


@pytest.mark.parametrize(
    ("model_type", "layer", "expert"), [("mixtral", 0, 2), ("qwen2_moe", 1, 0), ("deepseek_v3", 1, 6)]
)
def test_prune_changes_only_tokens_routed_to_the_expert(tiny_model, model_type, layer, expert):
    model = tiny_model(model_type)
    batch = {"input_ids": torch.randint(1, 128, (4, 16), generator=torch.Generator().manual_seed(1))}
    base, idx = _block_outputs(model, layer, batch)
    with rs.prune_experts(model, [(layer, expert)]):
        pruned, idx_pruned = _block_outputs(model, layer, batch)
    assert torch.equal(idx, idx_pruned)  # the block's input, hence the routing, is unchanged
    routed = (idx == expert).any(dim=-1)
    assert routed.any() and (~routed).any()
    assert torch.equal(pruned[~routed], base[~routed])
    assert not torch.isclose(pruned[routed], base[routed]).all(dim=-1).any()


def test_prune_shared_changes_every_token(tiny_model):
    model = tiny_model("qwen2_moe")
    batch = {"input_ids": torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(2))}
    base, _ = _block_outputs(model, 0, batch)
    with rs.prune_experts(model, [(0, "shared")]):
        pruned, _ = _block_outputs(model, 0, batch)
    assert not torch.isclose(pruned, base).all(dim=-1).any()


# -- storage, text input, progress -----------------------------------------------------------
def test_out_writes_tables_readable_by_open_run(tiny_model, tmp_path):
    model = tiny_model("qwen2_moe")
    plant(model, 1, 2, False)
    out = tmp_path / "calib"
    df = rs.find_super_experts(model, make_batches(), out=out, progress=False)
    run = rs.open_run(out)
    assert run.complete and run.manifest["tokens"] == 0
    assert run.moe_layers == [0, 1] and run.num_experts(1) == 4 and run.top_k(1) == 2
    assert run.manifest["super_experts"]["super_experts"] == [[1, 2]]
    acts = run.sql("select * from expert_activations order by max_abs_output desc, layer, shared, expert")
    assert len(acts) == len(df) == 10
    for col in ("layer", "expert", "shared", "channel", "tokens_seen"):
        assert acts[col].tolist() == df[col].tolist(), col
    np.testing.assert_array_equal(
        acts["max_abs_output"].to_numpy(np.float32), df["max_abs_output"].to_numpy(np.float32)
    )
    hidden = run.sql("select * from hidden_stats order by layer")
    assert hidden["layer"].tolist() == [0, 1]
    expected = pd.DataFrame(df.attrs["hidden_stats"])
    assert hidden["channel"].tolist() == expected["channel"].tolist()
    assert hidden["seq_id"].tolist() == expected["seq_id"].tolist()
    run.close()
    # a second calibration replaces the first one's rows
    rs.find_super_experts(model, make_batches(seed=9), out=out, progress=False)
    with rs.open_run(out) as again:
        assert int(again.sql("select count(*) as n from expert_activations")["n"][0]) == 10
        assert int(again.sql("select count(*) as n from hidden_stats")["n"][0]) == 2


def test_out_into_recorded_run_keeps_its_manifest(tiny_model, tmp_path):
    model = tiny_model("mixtral")
    out = tmp_path / "run"
    batch = make_batches(n=1)[0]
    with rs.record(model, out):
        model(**batch)
    tokens = rs.open_run(out).manifest["tokens"]
    rs.find_super_experts(model, make_batches(), out=out, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokens"] == tokens == int(batch["attention_mask"].sum())
    assert manifest["super_experts"]["tokens"] == sum(int(b["attention_mask"].sum()) for b in make_batches())
    with rs.open_run(out) as run:
        assert len(run.sql("select * from routing")) == tokens * 2 * 2  # 2 MoE layers, top-2
        assert len(run.sql("select * from expert_activations")) == 8


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "fast", "slow", "and"]
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", padding_side="left"
    )


def test_strings_with_tokenizer_and_progress_bar(tiny_model, capsys):
    model = tiny_model("mixtral")
    texts = ["the cat sat on the mat", ["a dog ran", "the cat and the dog ran fast on a mat"]]
    df = rs.find_super_experts(model, texts, tokenizer=tiny_tokenizer())
    valid = 6 + 3 + 10
    k = 2
    assert int(df.groupby("layer")["tokens_seen"].sum().iloc[0]) == valid * k
    assert df.attrs["tokens"] == valid
    assert "calibrating" in capsys.readouterr().err


def test_super_experts_command(tiny_model, tmp_path, capsys):
    import argparse

    from routescope.commands.super_experts import add_super_experts_arguments, super_experts_command

    model = tiny_model("qwen2_moe")
    plant(model, 0, 3, False)
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text(
        "\n".join(json.dumps({"text": t}) for t in ["the cat sat", "a dog ran on the mat", "the mat"])
    )
    parser = argparse.ArgumentParser()
    add_super_experts_arguments(parser)
    args = parser.parse_args(
        ["--model", str(tmp_path / "model"), "--data", str(data), "--out", str(tmp_path / "run")]
    )
    assert super_experts_command(args) == 0
    printed = capsys.readouterr().out
    assert "Super Experts" in printed and "massive" in printed.lower()
    with rs.open_run(tmp_path / "run") as run:
        top = run.sql(
            "select layer, expert, shared from expert_activations order by max_abs_output desc limit 1"
        )
        assert top.values.tolist() == [[0, 3, False]]


def test_hidden_median_past_the_cap_is_not_channel_aliased(tiny_model, monkeypatch):
    """A real model with hidden size 64 (a multiple of 8) whose embedding channels 0, 8, 16, ...
    are scaled ×1000: with the cap far below the values seen, median_abs must stay near the
    exact median of |h| (a stride-8 sample would keep only the scaled channels)."""
    from routescope.capture.calibration import activations

    model = tiny_model("mixtral", hidden_size=64, head_dim=16)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, ::8] *= 1000.0
    batches = make_batches(seed=7, n=3, rows=4, length=16)
    monkeypatch.setattr(activations, "MEDIAN_SAMPLE_CAP", 256)
    result = calibrate(model, batches, progress=False)
    outputs: dict[int, list[torch.Tensor]] = {}
    handles = [
        layer.register_forward_hook(lambda m, a, o, i=i: outputs.setdefault(i, []).append(o))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    hidden = result.hidden.set_index("layer")
    for i, outs in outputs.items():
        values = torch.cat(
            [o.abs().float()[b["attention_mask"].bool()].reshape(-1) for o, b in zip(outs, batches)]
        ).numpy()
        assert values.size > 4 * 2 * 256  # far past the cap: the sample is in use
        exact = float(np.median(values))
        scaled_only = float(np.median(values.reshape(-1, 64)[:, ::8]))
        got = float(hidden.loc[i, "median_abs"])
        # within the sample's quantile error, and far from the aliased answer
        lo, hi = np.quantile(values, [0.4, 0.6])
        assert lo <= got <= hi
        assert abs(got - exact) < abs(scaled_only - exact) / 10

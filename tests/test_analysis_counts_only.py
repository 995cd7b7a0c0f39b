"""Counts-only runs (imported per-expert counters): load and balance from `expert_counts`, clear errors elsewhere."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import routescope as rs
from routescope.importers import ImportedRun, counts_to_table, write_imported_run
from tests import analysis_reference as ref

LAYERS = [1, 3]
E, K = 6, 2


def expand(loads: np.ndarray) -> np.ndarray:
    """Expert ids with the given per-expert loads, for the reference functions."""
    return np.repeat(np.arange(len(loads)), loads).reshape(-1, K)


@pytest.fixture(scope="module")
def counts(tmp_path_factory):
    """[steps, layers, experts] routing rows; every step routes 10 tokens × top-2 per layer."""
    rng = np.random.default_rng(3)
    steps = 5
    arr = np.zeros((steps, len(LAYERS), E), dtype=np.int64)
    for s in range(steps):
        for li in range(len(LAYERS)):
            probs = np.array([6, 3, 1, 1, 1, 0], dtype=float) if li == 0 else np.ones(E)
            arr[s, li] = rng.multinomial(10 * K, probs / probs.sum())
    return arr


@pytest.fixture(scope="module")
def run(tmp_path_factory, counts):
    imported = ImportedRun(
        engine="sglang",
        mode="stat",
        num_hidden_layers=4,
        num_experts={layer: E for layer in LAYERS},
        top_k={layer: K for layer in LAYERS},
        expert_counts=counts_to_table(counts, LAYERS),
    )
    path = write_imported_run(imported, tmp_path_factory.mktemp("counts") / "run")
    with rs.open_run(path) as opened:
        assert opened.manifest["counts_only"] is True
        yield opened


def test_expert_load_sums_counts_over_steps(run, counts):
    df = run.expert_load()
    assert list(df.columns) == ["layer", "expert", "tokens", "share"]
    for li, layer in enumerate(LAYERS):
        want = counts[:, li].sum(axis=0)
        got = df[df.layer == layer]
        assert got["expert"].tolist() == list(range(E))
        assert got["tokens"].tolist() == want.tolist()
        np.testing.assert_allclose(got["share"], want / want.sum())
    assert df[(df.layer == 1) & (df.expert == 5)]["tokens"].item() == 0  # zero-load expert kept


def test_balance_matches_numpy_reference(run, counts):
    df = run.balance().set_index("layer")
    assert "aux_loss" not in df.columns
    for li, layer in enumerate(LAYERS):
        want = ref.balance(expand(counts[:, li].sum(axis=0)), E)
        for key, value in want.items():
            assert df.loc[layer, key] == pytest.approx(value), key


def test_where_selects_steps(run, counts):
    df = run.expert_load(where="step >= 2 AND step < 4")
    got = df[df.layer == 3]["tokens"].to_numpy()
    np.testing.assert_array_equal(got, counts[2:4, 1].sum(axis=0))
    bal = run.balance(where="step = 0").set_index("layer")
    want = ref.balance(expand(counts[0, 0]), E)
    assert bal.loc[1, "cv"] == pytest.approx(want["cv"])
    assert bal.loc[1, "tokens"] == want["tokens"] == 10


def test_dead_and_hot_experts(run, counts):
    dead = run.dead_experts()
    loads = counts.sum(axis=0)
    want_dead = [(layer, e) for li, layer in enumerate(LAYERS) for e in range(E) if loads[li, e] == 0]
    assert list(zip(dead["layer"], dead["expert"])) == want_dead
    assert (dead["tokens_seen"] == loads[0].sum() // K).all()
    hot = run.hot_experts(factor=2.0)
    want_hot = [
        (layer, e)
        for li, layer in enumerate(LAYERS)
        for e in range(E)
        if loads[li, e] / loads[li].sum() >= 2.0 / E
    ]
    assert list(zip(hot["layer"], hot["expert"])) == want_hot


@pytest.mark.parametrize("where", ["phase = 'prefill'", "layer = 1", "seq_id < 3", "step >"])
def test_where_may_only_read_step(run, where):
    with pytest.raises(ValueError, match=r"expert counts only.*may only reference step"):
        run.expert_load(where=where)


@pytest.mark.parametrize(
    "name, call",
    [
        ("coactivation", lambda r: r.coactivation(1)),
        ("entanglement", lambda r: r.entanglement()),
        ("transition", lambda r: r.transition(1, 3)),
        ("pathways", lambda r: r.pathways()),
        ("specialization", lambda r: r.specialization(by="domain")),
        ("vocab_specialization", lambda r: r.vocab_specialization()),
        ("repetition_rate", lambda r: r.repetition_rate()),
    ],
)
def test_routing_metrics_say_counts_only(run, name, call):
    message = rf"this run holds expert counts only \(imported from sglang, mode stat\); {name} needs per-token routing"
    with pytest.raises(ValueError, match=message):
        call(run)


def test_compare_two_counts_only_runs(run):
    result = rs.compare(run, run)
    assert (result.load["tokens_delta"] == 0).all()
    assert result.saturation.empty
    assert any("expert counts only" in note for note in result.notes)
    assert isinstance(result.balance, pd.DataFrame) and len(result.balance) == len(LAYERS)


def test_ep_balancedness_from_counts(run, counts):
    # SGLang's own counters: ep_balancedness per GPU works on a counts-only run, where= on step
    bal = run.balance(ep_size=3, where="step >= 2").set_index("layer")
    for li, layer in enumerate(LAYERS):
        gpu = counts[2:, li].sum(0).reshape(3, E // 3).sum(1)
        assert bal.loc[layer, "ep_balancedness"] == pytest.approx(gpu.mean() / gpu.max())


def test_ep_balancedness_step_mean_from_counts(run, counts):
    bal = run.balance(ep_size=2).set_index("layer")
    for li, layer in enumerate(LAYERS):
        per_step = []
        for s in range(counts.shape[0]):
            gpu = counts[s, li].reshape(2, E // 2).sum(1)
            per_step.append(gpu.mean() / gpu.max())
        assert bal.loc[layer, "ep_balancedness_step_mean"] == pytest.approx(np.mean(per_step))

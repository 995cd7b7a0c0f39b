"""rs.compare: load and balance deltas, experts that died or became hot, router saturation."""

from __future__ import annotations

import json

import numpy as np
import pytest

import routescope as rs
from routescope.analysis.compare import Comparison
from tests import analysis_reference as ref
from tests.synthetic import sample_topk, write_run

E, K, T = 6, 2, 300


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    rng = np.random.default_rng(3)
    root = tmp_path_factory.mktemp("compare")
    uniform = np.full((T, E), 1 / E)
    a = {layer: sample_topk(rng, uniform, K) for layer in (0, 1)}
    # B: in layer 1 expert 5 dies and expert 0 becomes hot; layer 0 keeps half of A's choices
    b = {0: a[0].copy(), 1: sample_topk(rng, np.tile([0.5, 0.125, 0.125, 0.125, 0.125, 0.0], (T, 1)), K)}
    b[0][T // 2 :] = sample_topk(rng, uniform[T // 2 :], K)
    tokens_a = rng.integers(0, 50, T)
    tokens_b = tokens_a.copy()
    tokens_b[:30] += 1  # 30 tokens differ: excluded from saturation
    path_a = write_run(root / "a", a, E, seq_len=30, token_id=tokens_a, router_probs={0: uniform, 1: uniform})
    path_b = write_run(root / "b", b, E, seq_len=30, token_id=tokens_b, router_probs={0: uniform, 1: uniform})
    return path_a, path_b, a, b, tokens_a != tokens_b


def test_compare_paths(pair):
    path_a, path_b, a, b, differ = pair
    result = rs.compare(path_a, path_b)
    assert isinstance(result, Comparison)
    load = result.load
    assert load[["layer", "expert"]].values.tolist() == [[layer, e] for layer in (0, 1) for e in range(E)]
    for layer in (0, 1):
        rows = load[load["layer"] == layer]
        la, lb = ref.load(a[layer], E), ref.load(b[layer], E)
        np.testing.assert_array_equal(rows["tokens_delta"], lb - la)
        np.testing.assert_allclose(rows["share_delta"], lb / lb.sum() - la / la.sum())
    bal = result.balance.set_index("layer")
    assert bal.loc[1, "cv_delta"] == pytest.approx(ref.balance(b[1], E)["cv"] - ref.balance(a[1], E)["cv"])
    assert "aux_loss_delta" in bal.columns
    changes = result.expert_changes
    assert [1, 5, "died"] in changes[["layer", "expert", "change"]].values.tolist()
    assert [1, 0, "became_hot"] in changes[["layer", "expert", "change"]].values.tolist()
    sat = result.saturation.set_index("layer")
    same = ~differ
    for layer in (0, 1):
        overlap = [len(set(a[layer][t]) & set(b[layer][t])) / K for t in np.flatnonzero(same)]
        assert sat.loc[layer, "tokens_matched"] == same.sum()
        assert sat.loc[layer, "saturation"] == pytest.approx(np.mean(overlap))
        top1 = np.mean(a[layer][same, 0] == b[layer][same, 0])
        assert sat.loc[layer, "top1_agreement"] == pytest.approx(top1)
    assert sat.loc[0, "saturation"] > sat.loc[1, "saturation"]
    json.dumps(result.to_dict())  # JSON-ready
    assert "Comparison(" in repr(result) and "<h5>" in result._repr_html_()


def test_compare_runs_and_where(pair):
    path_a, path_b, a, _, differ = pair
    with rs.open_run(path_a) as run_a, rs.open_run(path_b) as run_b:
        result = rs.compare(run_a, run_b, where="pos < 10")
        assert run_a.expert_load() is not None  # Run objects given are left open
    pos = np.arange(T) % 30
    mask = pos < 10
    rows = result.load[result.load["layer"] == 0]
    np.testing.assert_array_equal(rows["tokens_a"], ref.load(a[0][mask], E))
    assert result.saturation["tokens_matched"].iloc[0] == (mask & ~differ).sum()


def test_compare_with_itself_changes_nothing(pair):
    path_a, *_ = pair
    result = rs.compare(path_a, path_a)
    assert (result.load["share_delta"] == 0).all() and result.expert_changes.empty
    assert (result.saturation["saturation"] == 1).all()


def test_compare_missing_run(pair, tmp_path):
    with pytest.raises(FileNotFoundError):
        rs.compare(pair[0], tmp_path / "missing")

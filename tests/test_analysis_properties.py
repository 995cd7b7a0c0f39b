"""Hypothesis properties of the metrics on small random runs written in the SPEC format."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import routescope as rs
from tests import analysis_reference as ref
from tests.synthetic import sample_topk, write_run

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def runs(draw):
    """(experts per layer, E, k): random skewed routing, or a perfectly uniform load."""
    num_layers = draw(st.integers(1, 3))
    e = draw(st.integers(2, 6))
    k = draw(st.integers(1, min(3, e)))
    uniform = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if uniform:  # token t takes experts t, t+1, ..., t+k-1 (mod E): every expert equally often
        t = e * draw(st.integers(1, 6))
        base = np.arange(t)[:, None] + np.arange(k)[None, :]
        experts = {2 * i: (base + i) % e for i in range(num_layers)}
    else:
        t = draw(st.integers(1, 40))
        skew = draw(st.floats(0.0, 3.0))
        experts = {}
        for i in range(num_layers):
            probs = rng.dirichlet(np.full(e, 1.0 / (1.0 + skew)))
            experts[2 * i] = sample_topk(rng, np.tile(probs, (t, 1)), k)
    return experts, e, k


def open_synthetic(tmp: str, experts, e: int) -> rs.Run:
    path = write_run(Path(tmp) / "run", experts, e, seq_len=7)
    return rs.open_run(path)


@pytest.mark.slow
@SETTINGS
@given(runs())
def test_load_and_balance_properties(case):
    experts, e, _ = case
    with tempfile.TemporaryDirectory() as tmp, open_synthetic(tmp, experts, e) as run:
        load = run.expert_load()
        for _, grp in load.groupby("layer"):
            assert len(grp) == e
            assert abs(grp["share"].sum() - 1.0) < 1e-12
        bal = run.balance()
        for row in bal.itertuples():
            loads = ref.load(experts[row.layer], e)
            assert 0 < row.balancedness <= 1
            assert -1e-12 <= row.norm_entropy <= 1 + 1e-12
            assert row.cv >= 0
            assert (row.cv == 0) == bool((loads == loads[0]).all())
            assert (row.balancedness == 1) == (row.cv == 0)
            assert row.max_violation >= 0
            assert row.tokens == len(experts[row.layer])


@pytest.mark.slow
@SETTINGS
@given(runs())
def test_mutual_information_bounds(case):
    experts, e, _ = case
    with tempfile.TemporaryDirectory() as tmp, open_synthetic(tmp, experts, e) as run:
        ent = run.entanglement()
        assert len(ent) == len(experts) - 1
        for row in ent.itertuples():
            for mi in (row.mutual_info_bits, row.baseline_mutual_info_bits):
                assert 0 <= mi <= min(row.entropy_a_bits, row.entropy_b_bits) + 1e-9
            assert 0 <= row.norm_mutual_info <= 1 + 1e-9
            assert row.cond_entropy_bits >= 0
            assert 0 < row.top1_predictability <= 1
            table = ref.contingency(experts[row.layer][:, 0], experts[row.next_layer][:, 0], e, e)
            assert abs(row.mutual_info_bits - ref.information(table)["mutual_info_bits"]) < 1e-9


@pytest.mark.slow
@SETTINGS
@given(runs())
def test_coactivation_rows_sum_to_k_minus_one(case):
    experts, e, k = case
    with tempfile.TemporaryDirectory() as tmp, open_synthetic(tmp, experts, e) as run:
        layer = min(experts)
        co = run.coactivation(layer)
        loads = ref.load(experts[layer], e)
        sums = co.groupby("expert_a")["p_b_given_a"].sum(min_count=1)
        for expert, total in sums.items():
            if loads[expert]:
                assert abs(total - (k - 1)) < 1e-9
        assert co["count"].sum() == len(experts[layer]) * k * (k - 1)

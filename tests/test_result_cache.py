"""Per-step expert loads (steps x layers x experts rows) are computed once per run snapshot
and selection, and shared by the doctor and the EP balance of the Overview: a cached copy must
equal a fresh computation, survive a caller's changes, follow `without_rollups()` and the
run's new parts."""

from __future__ import annotations

import numpy as np
import pandas as pd

import routescope as rs
from routescope.analysis import metrics
from routescope.analysis.querying import query
from routescope.analysis.rollups import without_rollups
from tests.synthetic import write_run


def make_run(path, seed: int = 0, first_seq: int = 0):
    rng = np.random.default_rng(seed)
    experts = {layer: np.stack([rng.choice(8, 2, replace=False) for _ in range(300)]) for layer in (0, 1)}
    index = np.arange(300)
    return write_run(
        path, experts, 8, seq_id=first_seq + index // 30, pos=index % 30, step=index // 60, parts=3
    )


def test_step_loads_are_cached_per_selection_and_rollup_state(tmp_path):
    with rs.open_run(make_run(tmp_path / "run")) as run:
        run.build_rollups()
        first = metrics.step_expert_loads(run)
        first["tokens"] = -1  # the caller's copy: the cache keeps its own
        again = metrics.step_expert_loads(run)
        assert (again["tokens"] > 0).all()
        pd.testing.assert_frame_equal(again, query(run, "step_expert_load"))
        with without_rollups():  # its own entry, read from routing: the same numbers
            routing = metrics.step_expert_loads(run)
        pd.testing.assert_frame_equal(routing, again, check_dtype=False)
        steps = metrics.step_expert_loads(run, where="step <= 1")
        assert set(steps["step"]) == {0, 1} and steps["tokens"].sum() == 120 * 2 * 2


def test_new_parts_are_not_hidden_by_the_cache(tmp_path):
    path = make_run(tmp_path / "run")
    with rs.open_run(path) as run:
        before = metrics.step_expert_loads(run)["tokens"].sum()
        more = make_run(tmp_path / "more", seed=1, first_seq=100)  # other sequences, as a 2nd rank
        for table in ("tokens", "routing"):
            for part in sorted((more / table / "rank=0").glob("*.parquet")):
                target = path / table / "rank=1" / part.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(part.read_bytes())
        run.refresh()
        assert metrics.step_expert_loads(run)["tokens"].sum() == 2 * before

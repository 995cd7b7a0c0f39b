"""The bounded routing sample (analysis/sampling.py) behind the two dashboard figures no
rollup answers: pathways, and co-activation under a step filter. The sample is whole
recording parts, evenly spaced among those holding selected tokens; a metric on the sampled
run must equal the same metric on the full run restricted to the sampled parts' tokens, and
the page must say it was sampled. Runs: synthetic SPEC runs in 8 parts (tests/synthetic.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import routescope as rs
from routescope.analysis.rollups import without_rollups
from routescope.analysis.sampling import SampledRun, answers_from_rollups, choose_parts
from tests.synthetic import write_run

T, SEQ_LEN, PARTS, E, K = 800, 40, 8, 8, 2
PER_PART = T // PARTS  # tokens per part: part i holds token indices [100 i, 100 i + 100)
LAYERS = (0, 1, 2)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    rng = np.random.default_rng(3)
    experts = {
        layer: np.stack(
            [
                rng.choice(E, K, replace=False, p=np.linspace(2, 1, E) / np.linspace(2, 1, E).sum())
                for _ in range(T)
            ]
        )
        for layer in LAYERS
    }
    seq_id = np.arange(T) // SEQ_LEN
    path = write_run(
        tmp_path_factory.mktemp("sampling") / "run",
        experts,
        E,
        seq_len=SEQ_LEN,
        step=seq_id // 2,  # 10 steps, 2 sequences each
        labels={"domain": ["code" if s % 2 else "math" for s in seq_id]},
        parts=PARTS,
    )
    with rs.open_run(path) as run:
        run.build_rollups()
    return path


def rows_per_part() -> int:
    return PER_PART * len(LAYERS) * K


def in_parts(parts: tuple[str, ...]) -> str:
    """`where=` selecting the tokens of the named parts (token index = seq_id · SEQ_LEN + pos)."""
    index = sorted(int(p.split("part-")[1].split(".")[0]) for p in parts)
    return f"(seq_id * {SEQ_LEN} + pos) // {PER_PART} IN ({', '.join(map(str, index))})"


def test_a_run_within_the_budget_is_read_whole(run_dir):
    with rs.open_run(run_dir) as run:
        sample = choose_parts(run, max_rows=T * len(LAYERS) * K)
    assert sample.complete and len(sample.parts) == PARTS
    assert sample.rows == sample.total_rows == T * len(LAYERS) * K
    assert sample.describe() == f"all {sample.total_rows:,} routing rows"


def test_parts_are_evenly_spaced_within_the_budget(run_dir):
    with rs.open_run(run_dir) as run:
        sample = choose_parts(run, max_rows=int(2.5 * rows_per_part()))
    assert sample.parts == ("rank=0/part-00002.parquet", "rank=0/part-00006.parquet")
    assert sample.rows == 2 * rows_per_part() and sample.total_parts == PARTS
    assert "2 of 8 recording parts" in sample.describe() and "25%" in sample.describe()
    with rs.open_run(run_dir) as run:  # at least one part, however small the budget
        assert len(choose_parts(run, max_rows=1).parts) == 1


def test_a_filter_samples_only_parts_that_hold_its_tokens(run_dir):
    with rs.open_run(run_dir) as run:
        # steps 0-3 are sequences 0-7, token indices 0-319: parts 0 to 3
        sample = choose_parts(run, max_rows=10**9, where="step BETWEEN ? AND ?", params=[0, 3])
        assert sample.parts == tuple(f"rank=0/part-0000{i}.parquet" for i in range(4))
        assert sample.complete and sample.total_rows == 4 * rows_per_part()
        late = choose_parts(run, max_rows=rows_per_part(), where="step >= ?", params=[8])
        assert late.total_parts == 2 and len(late.parts) == 1  # token indices 640-799: parts 6, 7


@pytest.mark.slow
def test_metrics_on_the_sample_equal_the_full_run_over_its_tokens(run_dir):
    with rs.open_run(run_dir) as run:
        sample = choose_parts(run, max_rows=3 * rows_per_part())
        assert len(sample.parts) == 3
        with without_rollups():
            paths = run.pathways(top=10, where=in_parts(sample.parts))
            co = run.coactivation(1, where=f"step <= 6 AND {in_parts(sample.parts)}")
        with SampledRun(run, sample) as part:
            assert not part.rollups  # no rollup view: every metric reads the sampled routing
            got_paths = part.pathways(top=10)
            got_co = part.coactivation(1, where="step <= 6")
            assert part.sql("SELECT count(*) AS n FROM routing")["n"].iloc[0] == sample.rows
    pd.testing.assert_frame_equal(
        got_paths.assign(path=got_paths["path"].map(tuple)), paths.assign(path=paths["path"].map(tuple))
    )
    pd.testing.assert_frame_equal(got_co, co)
    assert paths["count"].sum() > 0 and co["count"].sum() > 0


def test_only_a_filter_the_rollups_cannot_answer_reads_routing(run_dir):
    with rs.open_run(run_dir) as run:
        assert answers_from_rollups(run, "coactivation")
        assert answers_from_rollups(run, "coactivation", "domain = 'code' AND phase = 'prefill'")
        assert not answers_from_rollups(run, "coactivation", "step <= 3")  # no step in rollup_coactivation
        assert not answers_from_rollups(run, "pathways")


@pytest.mark.slow
def test_the_page_says_when_it_shows_a_sample(run_dir, monkeypatch):
    from routescope.dashboard import sampled as dashboard_sample
    from routescope.dashboard.app import create_app
    from routescope.dashboard.pages import entanglement, load
    from routescope.dashboard.runs import get_registry

    create_app([run_dir])
    state = {"run": "0", "version": None}
    whole = entanglement.update_pathways(state, 10)
    assert whole.layout.title.text == "Most frequent top-1 pathways"
    monkeypatch.setattr(dashboard_sample, "SAMPLE_ROWS", 2 * rows_per_part())
    get_registry().clear_cache()
    sampled = entanglement.update_pathways(state, 10)
    assert "a sample: 2 of 8 recording parts, evenly spaced" in sampled.layout.title.text
    # co-activation: the rollups answer a label filter whole; a step range is sampled
    by_label = load.update_coactivation(state, "all", "domain", "code", None, 1)
    assert "sample" not in by_label.layout.title.text
    by_steps = load.update_coactivation(state, "all", "domain", "code", [0, 3], 1)
    assert (
        "domain = code, steps 0–3: counted over a sample: 2 of 4 recording parts"
        in by_steps.layout.title.text
    )

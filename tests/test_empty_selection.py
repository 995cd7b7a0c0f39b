"""A `where=` that selects no token warns, once per call, naming the call and the predicate
(issue 26, item 4): every metric of METRICS, the placement plan and loads, compare, report."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import routescope as rs
from routescope.analysis import metrics
from routescope.analysis.placement import step_loads
from routescope.cli import main
from tests.synthetic import write_run

NOTHING = "step >= 40"
# extra arguments of the metrics that take more than a run and where=
ARGS = {"coactivation": (1,), "transition": (1, 2), "specialization": ("domain",)}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    n = 48
    experts = {layer: np.stack([rng.permutation(4)[:2] for _ in range(n)]) for layer in (1, 2)}
    return write_run(
        tmp_path_factory.mktemp("empty") / "run",
        experts,
        4,
        seq_len=8,
        step=np.arange(n) // 8,
        labels={"domain": ["code", "math"] * (n // 2)},
        num_hidden_layers=3,
    )


@pytest.fixture(scope="module")
def run(run_dir):
    with rs.open_run(run_dir) as opened:
        yield opened


def calls(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, rs.EmptySelectionWarning)]


@pytest.mark.parametrize("name", sorted(metrics.METRICS))
def test_every_metric_warns_once_when_where_selects_nothing(run, name):
    method = getattr(run, name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        method(*ARGS.get(name, ()), where=NOTHING)
    found = calls(caught)
    assert len(found) == 1, found
    assert f"{name}(): where='{NOTHING}' selects no token" in found[0] and "(48 tokens)" in found[0]
    assert caught[0].filename == __file__  # points at the caller's line


@pytest.mark.parametrize("name", sorted(metrics.METRICS))
def test_a_selection_that_matches_says_nothing(run, name):
    with warnings.catch_warnings():
        warnings.simplefilter("error", rs.EmptySelectionWarning)
        getattr(run, name)(*ARGS.get(name, ()), where="step < 3")
        getattr(run, name)(*ARGS.get(name, ()))


def test_placement_plans_and_loads_warn(run):
    with pytest.warns(rs.EmptySelectionWarning, match=r"placement\(\): where='step >= 40'"):
        run.placement(2, where=NOTHING)
    with pytest.warns(rs.EmptySelectionWarning, match=r"step_loads\(\)"):
        step_loads(run, where=NOTHING)


@pytest.mark.slow
def test_compare_warns_per_run_and_notes_it(run_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = rs.compare(run_dir, run_dir, where=NOTHING)
    found = calls(caught)
    assert len(found) == 2 and "compare() run A" in found[0] and "compare() run B" in found[1]
    assert sum("selects no token" in note for note in result.notes) == 2


@pytest.mark.slow
def test_commands_say_it_on_one_line_each(run_dir, capsys):
    assert main(["report", str(run_dir), "--where", NOTHING]) == 0
    captured = capsys.readouterr()
    assert "No token matches --where" in captured.out and "warning" not in captured.err
    assert main(["placement", str(run_dir), "--ep-size", "2", "--where", NOTHING]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("routescope: warning: ") for line in err)
    assert len(err) == len(set(err))


def test_counts_only_runs_warn_on_steps_that_do_not_exist(tmp_path):
    from routescope.importers import ImportedRun, counts_to_table, write_imported_run

    counts = np.ones((3, 1, 4), dtype=np.int64)
    imported = ImportedRun(
        engine="sglang",
        mode="stat",
        num_hidden_layers=2,
        num_experts={1: 4},
        top_k={1: 2},
        expert_counts=counts_to_table(counts, [1]),
    )
    with rs.open_run(write_imported_run(imported, tmp_path / "run")) as counted:
        with pytest.warns(rs.EmptySelectionWarning, match="balance"):
            counted.balance(where="step > 5")
        with warnings.catch_warnings():
            warnings.simplefilter("error", rs.EmptySelectionWarning)
            counted.balance(where="step > 1")

"""`routescope report` and `routescope compare` on synthetic runs: tables, --json, exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from routescope.cli import COMMANDS, main
from tests.synthetic import write_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    experts = {1: np.stack([rng.permutation(4)[:2] for _ in range(40)])}
    experts[1][:, 0] = np.where(experts[1][:, 1] == 3, 0, 3)  # expert 3 is slot 0 or 1 of every token: hot
    experts[2] = np.stack([rng.choice([0, 1, 3], 2, replace=False) for _ in range(40)])  # expert 2 is dead
    acts = {
        "layer": np.array([0, 0, 1, 1, 1]),
        "expert": np.array([0, 1, 0, 1, 2]),
        "shared": np.array([False, False, False, False, True]),
        "max_abs_output": np.array([1.0, 900.0, 2.0, 1.5, 3.0], dtype=np.float32),
        "channel": np.array([1, 7, 2, 3, 4]),
        "tokens_seen": np.array([10, 10, 10, 10, 10]),
    }
    hidden = {  # layer 1 holds a massive activation: 5000 > 100 and > 1000 x 2.0
        "layer": np.array([0, 1, 2, 3], dtype=np.int16),
        "max_abs": np.array([50.0, 5000.0, 900.0, 40.0], dtype=np.float32),
        "median_abs": np.array([1.0, 2.0, 3.0, 1.0], dtype=np.float32),
        "channel": np.array([3, 7, 7, 1]),
        "seq_id": np.array([0, 1, 1, 2]),
        "pos": np.array([0, 0, 0, 4]),
    }
    return write_run(
        tmp_path_factory.mktemp("cli") / "run",
        experts,
        4,
        seq_len=8,
        labels={"domain": ["code"] * 20 + ["math"] * 20},
        extra_tables={"expert_activations": acts, "hidden_stats": hidden},
        num_hidden_layers=4,
    )


@pytest.mark.slow
def test_report_prints_tables(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    for title in ("Balance per MoE layer", "Dead experts", "Hot experts", "entanglement", "Super Experts"):
        assert title in out
    assert "INCOMPLETE" not in out


def test_report_json(run_dir, capsys):
    assert main(["report", str(run_dir), "--json", "--where", "domain = 'math'"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["run"]["complete"] is True and doc["run"]["where"] == "domain = 'math'"
    assert [row["layer"] for row in doc["balance"]] == [1, 2]
    assert all(row["tokens"] == 20 for row in doc["balance"])
    assert {(row["layer"], row["expert"]) for row in doc["dead_experts"]} == {(2, 2)}
    assert (1, 3) in {(row["layer"], row["expert"]) for row in doc["hot_experts"]}
    assert len(doc["entanglement"]) == 1
    assert [(row["layer"], row["expert"]) for row in doc["super_experts"]] == [(0, 1)]


@pytest.mark.slow
def test_report_shows_ep_balancedness_and_super_expert_evidence(run_dir, capsys):
    assert main(["report", str(run_dir), "--json", "--ep-size", "2"]) == 0
    doc = json.loads(capsys.readouterr().out)
    loads = {1: np.zeros(4), 2: np.zeros(4)}
    for row in doc["balance"]:
        assert row["ep_size"] == 2
    import routescope as rs

    with rs.open_run(run_dir) as run:
        for row in run.expert_load().itertuples():
            loads[row.layer][row.expert] = row.tokens
    for row in doc["balance"]:
        gpu = loads[row["layer"]].reshape(2, 2).sum(1)
        assert row["ep_balancedness"] == pytest.approx(gpu.mean() / gpu.max())
    (se,) = doc["super_experts"]
    th = doc["super_expert_thresholds"]
    pool = np.array([1.0, 900.0, 2.0, 1.5, 3.0])  # layers 0..2 of 4 are searched: all rows here
    assert se["ratio_to_median"] == pytest.approx(900.0 / np.median(pool))
    assert th["percentile_threshold"] == pytest.approx(np.percentile(pool, 99.5))
    assert th["layers"] == [0, 1, 2] and th["pooled_experts"] == 5
    massive = {row["layer"]: row["is_massive"] for row in doc["massive_activations"]}
    assert massive == {0: False, 1: True, 2: False, 3: False}
    assert main(["report", str(run_dir), "--ep-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "ep_balancedness" in out and "ratio_to_median" in out and "is_massive" in out
    assert main(["report", str(run_dir), "--ep-size", "3"]) == 2
    assert "does not split the experts" in capsys.readouterr().err


def test_report_marks_incomplete_runs(tmp_path, capsys):
    experts = {0: np.array([[0, 1], [1, 0]]), 1: np.array([[1, 0], [0, 1]])}
    path = write_run(tmp_path / "partial", experts, 2, complete=False)
    assert main(["report", str(path)]) == 0
    assert capsys.readouterr().out.count("INCOMPLETE") >= 2


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["report", "{missing}"], "does not exist"),
        (["report", "{run}", "--where", "foo bar"], "invalid where clause"),
        (["report", "{not_a_run}"], "is not a routescope run"),
        (["report"], "required: RUN"),
        (["compare", "{run}", "{missing}"], "does not exist"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(run_dir, tmp_path, capsys, argv, fragment):
    paths = {"missing": tmp_path / "missing", "run": run_dir, "not_a_run": tmp_path}
    assert main([a.format(**paths) for a in argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("routescope: error:") and fragment in lines[0]
    assert captured.out == ""


@pytest.mark.slow
def test_compare_command(run_dir, capsys):
    assert main(["compare", str(run_dir), str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "Router saturation" in out and "Balance per MoE layer" in out
    assert "exact_match" in out and "any_layer_differs" in out and "missing_routes" in out
    assert main(["compare", str(run_dir), str(run_dir), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert all(row["saturation"] == 1.0 and row["exact_match"] == 1.0 for row in doc["saturation"])
    (agreement,) = doc["token_agreement"]  # a run against itself: every token agrees in every layer
    assert agreement["any_layer_differs"] == 0.0 and agreement["missing_routes"] == 0.0
    assert agreement["tokens_matched"] == doc["saturation"][0]["tokens_matched"]


def test_command_table_and_help(capsys):
    assert {"report", "compare"} <= set(COMMANDS)
    assert all(callable(add) and callable(run) for add, run in COMMANDS.values())
    assert main(["--help"]) == 0
    assert "report" in capsys.readouterr().out


@pytest.mark.slow
def test_report_says_when_where_matches_no_token_and_explains_the_metrics(run_dir, capsys):
    assert main(["report", str(run_dir), "--where", "domain = 'nothing'"]) == 0
    out = capsys.readouterr().out
    assert "No token matches --where" in out and "Balance per MoE layer" not in out
    assert main(["report", str(run_dir), "--json", "--where", "domain = 'math'"]) == 0
    assert json.loads(capsys.readouterr().out)["run"]["tokens_matched"] == 20
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "lower is better" in out and "higher is better" in out
    assert "top-k = 2 under uniform routing" in out

"""Reading commands as a new user meets them (issue 26): counts-only reports, corrupt parts
(`--skip-corrupt` and the one consistent view behind it), files written, pipes closed early."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

import routescope as rs
from routescope.cli import main
from routescope.importers import ImportedRun, counts_to_table, write_imported_run
from tests.synthetic import write_run

LAYERS = [1, 3]
E, K = 6, 2
STEPS, PER_STEP = 4, 10


@pytest.fixture(scope="module")
def counts_run(tmp_path_factory):
    """A counts-only run, as `routescope import sglang stat.pt` writes it."""
    rng = np.random.default_rng(0)
    arr = np.stack([[rng.multinomial(PER_STEP * K, np.ones(E) / E) for _ in LAYERS] for _ in range(5)])
    imported = ImportedRun(
        engine="sglang",
        mode="stat",
        num_hidden_layers=4,
        num_experts={layer: E for layer in LAYERS},
        top_k={layer: K for layer in LAYERS},
        expert_counts=counts_to_table(arr, LAYERS),
    )
    return write_imported_run(imported, tmp_path_factory.mktemp("counts") / "run")


def partial_run(path, corrupt: str | None):
    """4 steps of 10 tokens, one part per step (router_stats too); part 0 of `corrupt` truncated."""
    rng = np.random.default_rng(1)
    n = STEPS * PER_STEP
    experts = {layer: np.stack([rng.permutation(E)[:K] for _ in range(n)]) for layer in LAYERS}
    probs = {layer: rng.dirichlet(np.ones(E), size=n) for layer in LAYERS}
    run = write_run(
        path,
        experts,
        E,
        seq_len=PER_STEP,
        step=np.arange(n) // PER_STEP,
        router_probs=probs,
        parts=STEPS,
        num_hidden_layers=4,
    )
    if corrupt:
        part = run / corrupt / "rank=0" / "part-00000.parquet"
        part.write_bytes(part.read_bytes()[:40])
    return run


# -- 1: counts-only runs ----------------------------------------------------------------
def test_report_on_a_counts_only_run_prints_what_it_can_and_names_what_it_skipped(counts_run, capsys):
    assert main(["report", str(counts_run)]) == 0
    out = capsys.readouterr().out
    assert "Balance per MoE layer" in out and "Dead experts" in out and "Hot experts" in out
    assert "Skipped entanglement" in out and "per-token routing" in out
    assert main(["report", str(counts_run), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["entanglement"] is None and "entanglement" in doc["skipped"]
    assert len(doc["balance"]) == len(LAYERS)


@pytest.mark.slow
def test_html_report_on_a_counts_only_run_names_the_file(counts_run, tmp_path, capsys):
    target = tmp_path / "r.html"
    assert main(["report", str(counts_run), "--html", str(target)]) == 0
    captured = capsys.readouterr()
    assert f"wrote {target}" in captured.err
    text = target.read_text(encoding="utf-8")
    assert "Skipped entanglement" in text and "Balance per MoE layer" in text


# -- 2, 3: corrupt parts ------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("command", [["report"], ["placement", "--ep-size", "2"]])
def test_reading_commands_take_skip_corrupt(command, tmp_path, capsys):
    run = partial_run(tmp_path / "run", "routing")
    argv = [command[0], str(run), *command[1:]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "part-00000.parquet" in err and "--skip-corrupt" in err
    assert main([*argv, "--skip-corrupt"]) == 0
    err = capsys.readouterr().err
    assert "routescope: warning: skipped 1 corrupt part(s)" in err and "routing/rank=0/part-00000" in err


@pytest.mark.slow
def test_compare_takes_skip_corrupt(tmp_path, capsys):
    run = partial_run(tmp_path / "run", "tokens")
    other = partial_run(tmp_path / "other", None)
    assert main(["compare", str(run), str(other)]) == 2
    capsys.readouterr()
    assert main(["compare", str(run), str(other), "--skip-corrupt", "--json"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert any("corrupt part(s) skipped" in note for note in doc["notes"])
    assert {row["tokens_a"] for row in doc["balance"]} == {(STEPS - 1) * PER_STEP}


@pytest.mark.slow
@pytest.mark.parametrize("corrupt", ["tokens", "routing", "router_stats"])
def test_skipping_a_part_leaves_one_consistent_view_and_says_so(corrupt, tmp_path):
    run_dir = partial_run(tmp_path / "run", corrupt)
    with pytest.warns(RuntimeWarning, match=f"skipped 1 corrupt part.*{corrupt}/rank=0/part-00000"):
        run = rs.open_run(run_dir, skip_corrupt=True)
    with run:
        kept = (STEPS - 1) * PER_STEP
        tokens = run.sql("SELECT count(*) AS n FROM tokens").n[0]
        routing = run.sql("SELECT count(*) AS n FROM routing").n[0]
        steps = set(run.sql("SELECT DISTINCT step FROM router_stats").step)
        assert tokens == kept and routing == kept * K * len(LAYERS)
        assert steps == set(run.sql("SELECT DISTINCT step FROM tokens").step) == {1, 2, 3}
        # every way of counting agrees with the manifest view and the repr
        assert run.balance()["tokens"].tolist() == [kept] * len(LAYERS)
        assert run.balance(where="1=1")["tokens"].tolist() == [kept] * len(LAYERS)
        assert run.token_count() == run.manifest["tokens"] == kept
        assert run.manifest["tokens_recorded"] == STEPS * PER_STEP
        assert run.manifest["complete"] is False and run.complete is False
        assert run.manifest["skipped_corrupt_parts"] == [f"{corrupt}/rank=0/part-00000.parquet"]
        assert "PARTIAL: 1 corrupt part(s) skipped" in repr(run) and f"tokens={kept}" in repr(run)
        assert np.isfinite(run.balance()["aux_loss"]).all()  # router_stats of the same steps only


@pytest.mark.slow
def test_report_of_a_partial_run_says_which_parts_it_skipped(tmp_path, capsys):
    run = partial_run(tmp_path / "run", "routing")
    assert main(["report", str(run), "--skip-corrupt"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "PARTIAL RUN: 1 corrupt part(s)" in out and "routing/rank=0/part-00000.parquet" in out


def test_a_run_without_corrupt_parts_reads_as_before(tmp_path):
    run_dir = partial_run(tmp_path / "run", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with rs.open_run(run_dir, skip_corrupt=True) as run:
            assert run.skipped == [] and run.complete
            assert "raw_tokens" not in set(run.sql("SELECT view_name FROM duckdb_views()").view_name)


# -- 6: files written, pipes -------------------------------------------------------------
def test_placement_engine_format_without_a_file_is_refused(tmp_path, capsys):
    run = partial_run(tmp_path / "run", None)
    assert main(["placement", str(run), "--ep-size", "2", "--format", "sglang"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--out FILE" in err and "--loads-out FILE" in err


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_report_piped_into_head_exits_0_quietly(extra, tmp_path):
    run = partial_run(tmp_path / "run", None)
    code = (
        "import subprocess, sys\n"
        f"p = subprocess.Popen([sys.executable, '-m', 'routescope.cli', 'report', {str(run)!r}, *{extra!r}],"
        " stdout=subprocess.PIPE, stderr=subprocess.PIPE)\n"
        "p.stdout.readline(); p.stdout.close()\n"
        "err = p.stderr.read().decode(); print(p.wait()); print(err)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    rc, _, err = done.stdout.partition("\n")
    assert rc.strip() == "0", done.stdout + done.stderr
    assert "Traceback" not in err and "BrokenPipe" not in err


@pytest.mark.slow
def test_dashboard_takes_skip_corrupt(tmp_path, capsys):
    from routescope.dashboard.command import check_runs
    from routescope.dashboard.runs import RunRegistry

    run = partial_run(tmp_path / "run", "routing")
    assert main(["dashboard", str(run), "--port", "0"]) == 2  # bad port: refused before any run opens
    capsys.readouterr()
    problem = check_runs([str(run)])
    assert problem and "part-00000.parquet" in problem and "--skip-corrupt" in problem
    with pytest.warns(RuntimeWarning, match="skipped 1 corrupt part"):
        assert check_runs([str(run)], skip_corrupt=True) is None
        opened = RunRegistry([run], skip_corrupt=True).run("0")
    assert opened.skipped and opened.token_count() == (STEPS - 1) * PER_STEP

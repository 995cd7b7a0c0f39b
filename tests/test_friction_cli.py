"""Issue 38 on the command line: exit codes, `--wait` messages, `profile`'s counts and limits.

Real runs from the bundled model and real locks; each test names the item it covers.
"""

from __future__ import annotations

import os

import pytest

import routescope as rs
from routescope.cli import EXIT_BUSY, main
from routescope.store.rundir import RunDirectory


def ours(stderr: str) -> list[str]:
    """routescope's lines of stderr (transformers' weight-loading bar writes there too)."""
    return [line for line in stderr.splitlines() if line.startswith("routescope")]


@pytest.mark.slow
def test_busy_run_exits_4_and_wait_says_whom_it_waits_for(tmp_path, capsys) -> None:
    """Item 11: a run held by another writer exits 4 (not 2, bad input); with --wait the
    command first says, on stderr, that it waits and for whom."""
    out = tmp_path / "run"
    holder = RunDirectory(out)
    holder.lock()
    try:
        argv = ["profile", "--out", str(out), "--append", "--max-tokens", "10", "--no-router-stats"]
        assert main(argv) == EXIT_BUSY == 4
        err = ours(capsys.readouterr().err)
        assert len(err) == 1 and err[0].startswith("routescope: error:") and f"pid {os.getpid()}" in err[0]
        assert "waiting" not in err[0]
        assert main([*argv, "--wait", "0.3"]) == 4
        err = ours(capsys.readouterr().err)
        assert any("waiting for it (up to 0.3 s)" in line and f"pid {os.getpid()}" in line for line in err)
        assert err[-1].startswith("routescope: error:") and "after waiting" in err[-1]
    finally:
        holder.close()
    assert main(["profile", "--out", str(out), "--bad-option"]) == 2  # bad input stays 2


@pytest.mark.slow
def test_wait_message_in_python_names_the_holder(tmp_path, tiny_model) -> None:
    """Item 11: rs.record(..., wait=) warns once that it waits, naming the holder, then fails."""
    model = tiny_model("mixtral")
    out = tmp_path / "run"
    with rs.record(model, out):
        with pytest.warns(RuntimeWarning, match="waiting for it"):
            with pytest.raises(rs.RunBusyError, match="after waiting"):
                with rs.record(model, out, mode="append", wait=0.2):
                    pass


@pytest.fixture
def corpus(tmp_path):
    """Twelve records of the bundled corpus, one label value (so batches are full)."""
    import json
    from pathlib import Path

    sample = Path(__file__).resolve().parent.parent / "data" / "sample.jsonl"
    rows = [json.loads(line) for line in sample.read_text(encoding="utf-8").splitlines()][:12]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": r["text"]}) for r in rows), encoding="utf-8")
    return path


@pytest.mark.slow
def test_profile_max_tokens_is_honoured_and_counts_are_right(corpus, tmp_path, capsys) -> None:
    """Item 2: --max-tokens T records exactly T prompt tokens (the last batch is cut), the number
    of batches not recorded is counted by the command (not tqdm's lagging bar.n), and --append
    prints what this command recorded, with the run's total beside it."""
    out = tmp_path / "run"
    base = ["profile", "--data", str(corpus), "--out", str(out), "--max-length", "16", "--batch-size", "2"]
    base += ["--no-router-stats"]
    assert main([*base, "--max-tokens", "37"]) == 0  # 6 batches of 2 rows, <= 32 tokens per batch
    captured = capsys.readouterr()
    run = rs.open_run(out)
    assert run.manifest["tokens"] == 37 == run.token_count()
    assert run.verify().ok
    batches_run = int(run.sql("SELECT count(DISTINCT step) AS n FROM tokens").n[0])
    said = captured.out + captured.err
    assert f"{6 - batches_run} batches not recorded" in said and "cut to" in said, said
    assert "recorded 37 tokens into" in captured.out
    assert main([*base, "--append", "--max-tokens", "20"]) == 0
    said = capsys.readouterr().out
    assert "recorded 20 tokens into" in said and "(the run now holds 57)" in said
    run = rs.open_run(out)
    assert run.manifest["tokens"] == 57 and run.verify().ok


@pytest.mark.slow
def test_profile_append_line_names_this_commands_tokens(corpus, tmp_path, capsys) -> None:
    """Item 2: `recorded N` is this command's tokens; the run's total is said separately."""
    out = tmp_path / "run"
    base = ["profile", "--data", str(corpus), "--out", str(out), "--max-length", "8", "--batch-size", "4"]
    base += ["--no-router-stats", "--max-tokens", "30"]
    assert main(base) == 0
    first = capsys.readouterr().out
    assert main([*base, "--append"]) == 0
    second = capsys.readouterr().out
    assert "recorded 30 tokens into" in first and "recorded 30 tokens into" in second
    assert "(the run now holds 60)" in second

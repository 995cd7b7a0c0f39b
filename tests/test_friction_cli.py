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


def test_wait_message_in_python_names_the_holder(tmp_path, tiny_model) -> None:
    """Item 11: rs.record(..., wait=) warns once that it waits, naming the holder, then fails."""
    model = tiny_model("mixtral")
    out = tmp_path / "run"
    with rs.record(model, out):
        with pytest.warns(RuntimeWarning, match="waiting for it"):
            with pytest.raises(rs.RunBusyError, match="after waiting"):
                with rs.record(model, out, mode="append", wait=0.2):
                    pass

"""Issue 27: two writers of one run at once. Real processes, started together; the writer lock
(store/lock.py) makes one refuse with RunBusyError or wait, and a dead writer's lock does not
block the next one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

import routescope as rs
from routescope.store.layout import lock_path
from routescope.store.lock import ExclusiveFileLock
from routescope.store.manifest import write_manifest

pytestmark = pytest.mark.slow  # README's test command leaves this file out (-m 'not slow')

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

# Waits for a go file, then appends 4 flushed forwards to the run, slowly enough that a
# second writer started at the same moment finds the lock held. Exit 3: RunBusyError.
WRITER = textwrap.dedent(
    """
    import sys, time, warnings
    from pathlib import Path
    import torch
    import routescope as rs
    from tests.tiny_models import build_tiny_model

    out, go, wait = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "wait"
    warnings.simplefilter("ignore")
    model = build_tiny_model("mixtral")
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    print("loaded", flush=True)
    while not go.exists():
        time.sleep(0.005)
    try:
        with rs.record(model, out, mode="append", wait=wait) as rec, torch.no_grad():
            print("recording", flush=True)
            for _ in range(4):
                model(input_ids=ids)
                rec.flush()
                time.sleep(0.4)  # hold the lock ~2 s: the other writer, started with it, finds it held
    except rs.RunBusyError as exc:
        print("busy:", exc, flush=True)
        sys.exit(3)
    print("tokens", rec.tokens - rec._tokens_before, flush=True)
    """
)
TOKENS_PER_WRITER = 4 * 2 * 6


def start_writers(out: Path, go: Path, wait: bool, n: int = 2) -> list[subprocess.Popen]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(out), str(go), "wait" if wait else "fail"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
            cwd=ROOT,
        )
        for _ in range(n)
    ]
    for proc in procs:
        assert proc.stdout.readline().strip() == "loaded", proc.stderr.read()
    go.touch()  # both are loaded and polling: they reach rs.record within milliseconds
    return procs


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        results.append((proc.returncode, out + err))
    return results


def assert_consistent(out: Path, tokens: int) -> None:
    """Unique keys, the manifest equal to the rows, and check() clean."""
    with rs.open_run(out) as run:
        rows = run.sql("SELECT count(*) AS n, count(DISTINCT (seq_id, pos)) AS k FROM tokens").iloc[0]
        assert rows.n == rows.k == tokens == run.manifest["tokens"]
        assert run.complete
        result = run.verify()
        assert result.ok, str(result)
    assert not lock_path(out, 0).exists()  # released at exit


def test_second_writer_at_once_is_refused_and_the_run_is_the_firsts(tmp_path):
    out = tmp_path / "run"
    results = finish(start_writers(out, tmp_path / "go", wait=False))
    codes = sorted(code for code, _ in results)
    assert codes == [0, 3], results
    refused = next(text for code, text in results if code == 3)
    assert "is being written by pid" in refused and str(out) in refused
    winner = next(text for code, text in results if code == 0)
    assert f"tokens {TOKENS_PER_WRITER}" in winner
    assert_consistent(out, TOKENS_PER_WRITER)


def test_a_killed_writers_lock_is_taken_over(tmp_path, tiny_model):
    out = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import time, torch, routescope as rs
        from tests.tiny_models import build_tiny_model
        model = build_tiny_model("mixtral")
        with rs.record(model, {str(out)!r}, handle_sigterm=False) as rec:
            model(input_ids=torch.randint(1, 100, (2, 6)))
            rec.flush()
            print("ready", flush=True)
            time.sleep(120)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=ENV, cwd=ROOT
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGKILL)  # no cleanup at all: the lock file stays, naming a dead pid
    proc.wait(timeout=30)
    assert f'"pid": {proc.pid}' in lock_path(out, 0).read_text()

    model = tiny_model("mixtral")
    started = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with rs.record(model, out, mode="append") as rec, torch.no_grad():
            model(input_ids=torch.randint(1, 100, (2, 6)))
    assert time.monotonic() - started < 30
    took_over = [str(w.message) for w in caught if "took over the lock" in str(w.message)]
    assert took_over and f"pid {proc.pid}" in took_over[0]
    assert rec.tokens == 24
    assert_consistent(out, 24)


def test_busy_error_names_the_holder_and_wait_times_out(tmp_path, tiny_model):
    """In one process too: a second recorder of the same run and rank is refused at once."""
    model = tiny_model("mixtral")
    out = tmp_path / "run"
    with rs.record(model, out):
        with pytest.raises(rs.RunBusyError, match=f"pid {os.getpid()}") as info:
            with rs.record(model, out, mode="append"):
                pass
        assert info.value.holder.pid == os.getpid() and info.value.lock_path == lock_path(out, 0)
        started = time.monotonic()
        with pytest.raises(rs.RunBusyError, match="after waiting"):
            with rs.record(model, out, mode="append", wait=0.3):
                pass
        assert time.monotonic() - started >= 0.3
        # another rank of a distributed job locks its own fragment: it is not refused
        with rs.record(model, out, rank=1, world_size=2):
            model(input_ids=torch.randint(1, 100, (1, 4)))
        # a calibration into the run being recorded is refused too (after its pass)
        batches = [{"input_ids": torch.randint(1, 100, (1, 4))}]
        with pytest.raises(rs.RunBusyError):
            rs.find_super_experts(model, batches, out=out, progress=False)
        # readers never see the lock: not a table, not a part
        with rs.open_run(out) as run:
            assert lock_path(out, 0).exists() and all(not t.startswith(".") for t in run.tables)
            assert "expert_activations" not in run.tables
    assert not list(out.glob(".lock*"))
    with rs.open_run(out) as run:
        # both recorders hooked the model: the rank-1 and calibration forwards landed in rank 0 too
        assert run.manifest["tokens"] == int(run.sql("SELECT count(*) AS n FROM tokens").n[0]) == 12
        assert run.verify().ok


def test_fallback_lock_without_flock_refuses_and_takes_over_from_a_dead_pid(tmp_path):
    """Where a filesystem refuses flock: an O_EXCL lock file, stale once its pid is gone."""
    path = tmp_path / ".lock"
    first = ExclusiveFileLock(path)
    first.acquire()
    with pytest.raises(rs.RunBusyError, match=f"pid {os.getpid()}"):
        ExclusiveFileLock(path).acquire()
    first.release()
    assert not path.exists()
    script = (
        f"from routescope.store.lock import ExclusiveFileLock; import time; "
        f"ExclusiveFileLock({str(path)!r}).acquire(); print('ready', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "ready"
    with pytest.raises(rs.RunBusyError, match=f"pid {proc.pid}"):
        ExclusiveFileLock(path).acquire()  # alive: busy
    proc.kill()
    proc.wait(timeout=30)
    with pytest.warns(RuntimeWarning, match=f"took over the lock .* pid {proc.pid}"):
        previous = ExclusiveFileLock(path).acquire()
    assert previous is not None and previous.pid == proc.pid


def test_profile_cli_twice_at_once_with_wait(tmp_path):
    """The issue's reproduction: two `routescope profile --append` at the same moment. With
    --wait the second waits for the first, so both land: unique keys, the manifest equal to
    the rows, and twice the tokens of one."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "routescope.cli", "profile", "--out", str(out), "--append", "--wait"]
    cmd += ["--max-tokens", "100", "--batch-size", "4", "--no-router-stats"]
    procs = [
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path
        )
        for _ in range(2)
    ]
    results = finish(procs)
    assert [code for code, _ in results] == [0, 0], results
    said = [int(text.split("recorded ")[1].split()[0]) for _, text in results]
    held = sorted(int(text.split("now holds ")[1].split(")")[0]) for _, text in results)
    assert said[0] == said[1]  # each printed what it recorded ...
    assert held == [said[0], 2 * said[0]]  # ... and the run's total after it
    assert_consistent(out, held[1])


def test_append_after_a_crash_between_parts_and_manifest_continues_from_the_parts(tmp_path, tiny_model):
    """A writer killed after a flush's parts landed but before its manifest update leaves a
    manifest behind its parts; the next writer (taking the lock over) must not hand out the
    parts' seq ids again."""
    model = tiny_model("mixtral")
    out = tmp_path / "run"
    ids = torch.randint(1, 100, (2, 6))
    with rs.record(model, out) as rec, torch.no_grad():
        model(input_ids=ids)
        rec.flush()
        stale = dict(rec.manifest)  # the manifest after the first flush ...
        model(input_ids=ids)  # ... and a second flush whose manifest update never happened
    write_manifest(out, {**stale, "complete": False})
    with pytest.warns(RuntimeWarning, match="continuing from the parts"):
        with rs.record(model, out, mode="append"), torch.no_grad():
            model(input_ids=ids)
    assert_consistent(out, 36)

"""`routescope report` latency: the torch-free reading path against the old one, side by side.

Records the bundled model on part of the bundled corpus (with a Super Expert calibration,
as `routescope demo` does) into a temporary run, then times fresh processes, interleaved
round by round in a shuffled order:

- `report RUN` (and `report /nonexistent`, the bad-input path) as the CLI runs it now;
- the same with the capture layer imported first (`routescope.capture.recording.recorder` and
  `.activations`, i.e. torch and its model code), which is what every `import routescope`
  did before capture was made lazy: the old path;
- `import routescope` alone, both ways.

    python benchmarks/report_latency.py [--rounds 7 --per-domain 16]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OLD_IMPORTS = "import routescope.capture.recording.recorder, routescope.capture.calibration.activations; "
CLI = "import sys; from routescope.cli import main; code = main(sys.argv[1:]); sys.exit(code)"


def variants(run: Path) -> dict[str, list[str]]:
    py = [sys.executable, "-c"]
    return {
        "report RUN (now)": [*py, CLI, "report", str(run)],
        "report RUN (old: torch first)": [*py, OLD_IMPORTS + CLI, "report", str(run)],
        "report /nonexistent (now)": [*py, CLI, "report", "/nonexistent"],
        "report /nonexistent (old)": [*py, OLD_IMPORTS + CLI, "report", "/nonexistent"],
        "import routescope (now)": [*py, "import routescope"],
        "import routescope (old)": [*py, OLD_IMPORTS + "import routescope"],
    }


def record_run(out: Path, per_domain: int) -> None:
    cmd = [sys.executable, "-m", "routescope.cli", "demo", "--no-dashboard", "--per-domain", str(per_domain)]
    subprocess.run([*cmd, "--out", str(out)], check=True, cwd=REPO, capture_output=True, env=env())


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def time_once(cmd: list[str], expect_ok: bool) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env())
    elapsed = time.perf_counter() - start
    if (proc.returncode == 0) != expect_ok:
        raise SystemExit(f"{cmd[-2:]} exited {proc.returncode}: {proc.stderr[-500:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--per-domain", type=int, default=16, help="bundled-corpus records per domain")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="routescope-report-latency-"))
    try:
        run = tmp / "run"
        start = time.perf_counter()
        record_run(run, args.per_domain)
        print(f"recorded the bundled run in {time.perf_counter() - start:.1f} s: {run}")
        cmds = variants(run)
        times: dict[str, list[float]] = {name: [] for name in cmds}
        rng = random.Random(args.seed)
        for name, cmd in cmds.items():  # warm the page cache once; not counted
            time_once(cmd, expect_ok="nonexistent" not in name)
        for _ in range(args.rounds):
            order = list(cmds)
            rng.shuffle(order)
            for name in order:
                times[name].append(time_once(cmds[name], expect_ok="nonexistent" not in name))
        load = os.getloadavg()[0]
        print(f"rounds={args.rounds} per_domain={args.per_domain} cpus={os.cpu_count()} load1={load:.1f}")
        print(f"{'variant':34s} {'median s':>9s} {'min s':>7s}")
        for name, values in times.items():
            print(f"{name:34s} {statistics.median(values):9.3f} {min(values):7.3f}")
        for what in ("report RUN", "report /nonexistent", "import routescope"):
            new = statistics.median(times[f"{what} (now)"])
            old_name = next(n for n in times if n.startswith(what) and "old" in n)
            old = statistics.median(times[old_name])
            print(f"{what}: now / old = {new / old:.2f} ({old - new:.2f} s saved per call)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""The metrics that read either `routing` or the rollups (specialization, transition,
co-activation, repetition rate, top-1 pair counts), timed both ways on one run, and optionally
side by side with another checkout of routescope (`--baseline DIR`, e.g. `git archive` of the
commit before a change): the two trees take turns, one subprocess a round each, so both see
the same load. Each round opens the run, warms it with one call per metric, then times
`--repeats` calls per metric and source; the figure is the median over rounds of the round's
median. `--check` also asserts that both trees return the same frames (bit for bit).

    python benchmarks/metric_sources.py --run /tmp/rollbench/run100m [--baseline /tmp/base]
        [--rounds 3] [--repeats 3] [--no-routing] [--check]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _calls(run, label: str | None) -> dict:
    """name -> zero-argument call of each metric that has a rollup twin."""
    layers = sorted(run.moe_layers)
    calls = {
        "transition": lambda: run.transition(layers[0], layers[1]),
        "coactivation": lambda: run.coactivation(layers[0]),
        "repetition_rate": lambda: run.repetition_rate(),
        "entanglement": lambda: run.entanglement(),
    }
    if label is not None:
        calls["specialization"] = lambda: run.specialization(label)
    return calls


def worker(run_dir: str, repeats: int, routing: bool, dump: str | None) -> dict:
    """Times of every metric from rollups and (with `routing`) from routing, in this process."""
    import routescope as rs
    from routescope.analysis.rollups import without_rollups

    run = rs.open_run(run_dir)
    labels = list(run.manifest.get("labels") or [])
    calls = _calls(run, labels[0] if labels else None)
    out: dict[str, float] = {}
    frames = {}
    for source in ("rollup", "routing") if routing else ("rollup",):
        for name, call in calls.items():
            if source == "routing":
                with without_rollups():
                    frames[f"{source}/{name}"] = call()  # warm
                    times = []
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        call()
                        times.append(time.perf_counter() - t0)
            else:
                frames[f"{source}/{name}"] = call()
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - t0)
            out[f"{source}/{name}"] = statistics.median(times)
    if dump:
        import pickle

        with open(dump, "wb") as f:
            pickle.dump(frames, f)
    return out


def _round(tree: Path, args: argparse.Namespace, dump: str | None) -> dict:
    code = (
        f"import sys, json; sys.path.insert(0, {str(tree)!r}); sys.path.insert(0, {str(ROOT / 'benchmarks')!r});"
        "import metric_sources as m;"
        f"print(json.dumps(m.worker({args.run!r}, {args.repeats}, {not args.no_routing}, {dump!r})))"
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=tempfile.gettempdir(),
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--baseline", help="another routescope checkout to time side by side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-routing", action="store_true", help="time the rollup source only")
    parser.add_argument("--check", action="store_true", help="assert both trees return equal frames")
    args = parser.parse_args(argv)
    trees = {"this": ROOT} | ({"baseline": Path(args.baseline).resolve()} if args.baseline else {})
    results: dict[str, list[dict]] = {t: [] for t in trees}
    dumps = {t: os.path.join(tempfile.mkdtemp(), f"{t}.pkl") for t in trees}
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    for r in range(args.rounds):
        for tree, path in list(trees.items()) if r % 2 == 0 else list(trees.items())[::-1]:
            results[tree].append(_round(path, args, dumps[tree] if args.check and r == 0 else None))
            print(f"round {r + 1} {tree}: done (load {os.getloadavg()[0]:.2f})", flush=True)
    keys = list(results["this"][0])
    header = f"{'metric (source)':34s}" + "".join(f"{t:>12s}" for t in trees)
    print(header + ("  this/baseline" if args.baseline else ""))
    for key in keys:
        med = {t: statistics.median(r[key] for r in results[t]) for t in trees}
        ratio = f"  {med['this'] / med['baseline']:.2f}x" if args.baseline else ""
        print(f"{key:34s}" + "".join(f"{med[t]:11.3f}s" for t in trees) + ratio)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.check and args.baseline:
        import pickle

        import pandas as pd

        with open(dumps["this"], "rb") as f:
            mine = pickle.load(f)
        with open(dumps["baseline"], "rb") as f:
            theirs = pickle.load(f)
        for key in mine:
            pd.testing.assert_frame_equal(mine[key], theirs[key], check_exact=True)
            print(f"{key}: equal to the baseline, bit for bit")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The metrics that read either `routing` or the rollups (transition, co-activation, repetition
rate, top-1 pair counts, specialization, per-step loads), timed from each source on one run.

Without `--baseline`: each metric through the public API, from the rollups and from routing
(`without_rollups()`), medians of `--repeats` calls after one warm call.

With `--baseline DIR` (another checkout of routescope, e.g. `git archive` of the commit before a
change): each tree composes its SQL for every (metric, source) in a subprocess of its own; then
one process, on one connection to the run, executes the two trees' SQL in turns (ABAB..., the
order swapped every round) and reports the medians side by side with their ratio, so both see
the same load and the same warm caches. It also compares the two trees' frames exactly and
says, where they differ, how much the baseline differs from itself over 10 more runs (3 for a slow query) of its own
SQL (DuckDB's parallel float sums do not keep one order).

    python benchmarks/metric_sources.py --run /tmp/rollbench/run100m [--baseline /tmp/base]
        [--repeats 5] [--no-routing] [--only routing/transition ...]
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

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
# metric -> (named query, uses, extra parameters); layer and label are filled from the run
METRICS = {
    "transition": ("transition", (), ("layer", "next_layer")),
    "coactivation": ("coactivation", (), ("layer",)),
    "repetition_rate": ("repetition_rate", ("top1_paths",), ()),
    "top1_pair_counts": ("top1_pair_counts", ("top1_paths",), ()),
    "specialization": ("specialization", (), ("label",)),
    "step_expert_load": ("step_expert_load", (), ()),
}


def compose_all(run_dir: str, routing: bool) -> dict[str, tuple[str, dict]]:
    """'<source>/<metric>' -> (SQL, bound parameters) as the routescope on sys.path composes it."""
    import routescope as rs
    from routescope.analysis import querying

    run = rs.open_run(run_dir)
    layers = sorted(run.moe_layers)
    values = {
        **querying.layer_params(run),
        "layer": layers[0],
        "next_layer": layers[1],
        "label": (run.labels or ["phase"])[0],
    }
    out = {}
    for metric, (name, uses, _) in METRICS.items():
        twin = querying.rollup_twin(run, name, None)
        if twin is not None:
            if isinstance(twin, tuple):  # before one query per metric: (twin query, rollup CTEs)
                sql, needed = querying.build_query(twin[0], None, (), {}, twin[1])
            else:
                sql, needed = querying.build_query(name, None, (), {}, twin)
            out[f"rollup/{metric}"] = (sql, {k: values[k] for k in needed})
        if routing:
            sql, needed = querying.build_query(name, None, uses)
            out[f"routing/{metric}"] = (sql, {k: values[k] for k in needed})
    return out


def _composed(tree: Path, run_dir: str, routing: bool) -> dict[str, tuple[str, dict]]:
    code = (
        f"import sys, json; sys.path.insert(0, {str(tree)!r}); sys.path.insert(0, {str(ROOT / 'benchmarks')!r});"
        "import metric_sources as m;"
        f"print(json.dumps(m.compose_all({run_dir!r}, {routing})))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tempfile.gettempdir()
    )
    return {k: (sql, params) for k, (sql, params) in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def _max_rel_diff(a: pd.DataFrame, b: pd.DataFrame) -> float:
    worst = 0.0
    for column in a.columns:
        x, y = a[column].to_numpy(), b[column].to_numpy()
        if x.dtype.kind == "f":
            both = ~(np.isnan(x) & np.isnan(y))
            scale = np.maximum(np.abs(x[both]), np.abs(y[both]))
            diff = np.abs(x[both] - y[both])
            rel = np.divide(diff, scale, out=np.zeros_like(diff), where=scale > 0)
            worst = max(worst, float(rel.max(initial=0.0)))
    return worst


def side_by_side(args: argparse.Namespace) -> int:
    import routescope as rs

    trees = {"this": ROOT, "baseline": Path(args.baseline).resolve()}
    sqls = {t: _composed(p, args.run, not args.no_routing) for t, p in trees.items()}
    run = rs.open_run(args.run)
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    print(f"{'metric (source)':32s}{'this':>10s}{'baseline':>10s}  this/baseline  results")
    for key in [k for k in sqls["this"] if not args.only or k in args.only]:
        times: dict[str, list[float]] = {t: [] for t in trees}
        frames = {}
        for r in range(args.repeats + 1):
            for tree in list(trees) if r % 2 == 0 else list(trees)[::-1]:
                sql, params = sqls[tree][key]
                t0 = time.perf_counter()
                df = run.con.execute(sql, params).df()
                if r > 0:  # the first round warms
                    times[tree].append(time.perf_counter() - t0)
                frames.setdefault(tree, df)
        a, b = frames["this"], frames["baseline"]
        if a.equals(b):
            verdict = "equal, bit for bit"
        else:
            pd.testing.assert_frame_equal(a, b, check_dtype=True, rtol=1e-12, atol=0)
            # DuckDB sums floats in parallel, in an order that may change from one run to the next
            runs = 10 if statistics.median(times["baseline"]) < 1 else 3
            spread = [_max_rel_diff(run.con.execute(*sqls["baseline"][key]).df(), b) for _ in range(runs)]
            verdict = (
                f"equal to {_max_rel_diff(a, b):.1e} relative (the baseline against itself over {runs} runs:"
                f" up to {max(spread):.1e}, {sum(x > 0 for x in spread)} of {runs} not bit for bit)"
            )
        med = {t: statistics.median(v) for t, v in times.items()}
        print(
            f"{key:32s}{med['this']:9.3f}s{med['baseline']:9.3f}s  {med['this'] / med['baseline']:12.2f}x  {verdict}",
            flush=True,
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


def by_source(args: argparse.Namespace) -> int:
    import routescope as rs
    from routescope.analysis.metrics import step_expert_loads
    from routescope.analysis.rollups import without_rollups

    run = rs.open_run(args.run)
    layers = sorted(run.moe_layers)
    calls = {
        "transition": lambda: run.transition(layers[0], layers[1]),
        "coactivation": lambda: run.coactivation(layers[0]),
        "repetition_rate": lambda: run.repetition_rate(),
        "entanglement": lambda: run.entanglement(),
        "specialization": lambda: run.specialization((run.labels or ["phase"])[0]),
        "step_expert_loads": lambda: step_expert_loads(run),
    }
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    for name, call in calls.items():
        row = []
        for source in ("rollup", "routing")[: 1 if args.no_routing else 2]:
            with without_rollups() if source == "routing" else _nothing():
                call()
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - t0)
            row.append(f"{source} {statistics.median(times):8.3f}s")
        print(f"{name:20s}" + "  ".join(row), flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument(
        "--baseline", help="another routescope checkout: its SQL side by side with this one's"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-routing", action="store_true", help="the rollup source only")
    parser.add_argument("--only", nargs="*", help="these '<source>/<metric>' keys only (with --baseline)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    return side_by_side(args) if args.baseline else by_source(args)


if __name__ == "__main__":
    raise SystemExit(main())

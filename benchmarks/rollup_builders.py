"""Rollup builders side by side (issue 33 item 1): `routescope index --engine numpy | duckdb | spark`
on the same run, interleaved in one process.

The run: synthetic steps (benchmarks/writer_throughput.py: 48 MoE layers x 128 experts, top-8,
tokens with a `domain` label) written by PartWriter without rollups. Each round rebuilds every
rollup table (`build_rollups(force=True)`) with each builder in turn; Spark runs on a local
session made once before the rounds (its start is not timed; the JVM's first query is, in the
first round: the median hides it). The time includes reading routing, computing and writing
the parts and compacting the pair tables.

    python benchmarks/rollup_builders.py [--steps 8] [--tokens 4096] [--rounds 3] [--spark-master local[2]]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from writer_throughput import make_step  # noqa: E402 (benchmarks/: the same synthetic steps)

import routescope as rs  # noqa: E402
from routescope import schema  # noqa: E402
from routescope.store.manifest import write_manifest  # noqa: E402
from routescope.store.rundir import base_manifest  # noqa: E402
from routescope.store.writer import PartWriter  # noqa: E402


def write_run(out: Path, steps: int, tokens: int) -> int:
    rng = np.random.default_rng(0)
    w = PartWriter(out, labels=("domain",), rollups=False, flush_seconds=1e9)
    for s in range(steps):
        w.submit(make_step(rng, s, tokens, 48, 8, 128))
    w.close()
    layers = range(48)
    manifest = base_manifest(
        model_type="synthetic",
        num_hidden_layers=48,
        moe_layers=list(layers),
        num_experts=dict.fromkeys(layers, 128),
        top_k=dict.fromkeys(layers, 8),
        labels=["domain"],
        tokens=steps * tokens,
        complete=True,
    )
    write_manifest(out, manifest)
    return steps * tokens * 48 * 8


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--spark-master", default="local[2]")
    ap.add_argument("--no-spark", action="store_true")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore", FutureWarning)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        rows = write_run(run_dir, args.steps, args.tokens)
        runs = {"numpy": rs.open_run(run_dir), "duckdb": rs.open_run(run_dir)}
        if not args.no_spark:
            from routescope.analysis.cluster import spark_session

            session = spark_session(
                master=args.spark_master,
                conf={"spark.sql.shuffle.partitions": "8", "spark.driver.memory": "3g"},
            )
            runs["spark"] = rs.open_run(run_dir, engine="spark", spark=session)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                t0 = time.perf_counter()
                written = run.build_rollups(force=True, builder="numpy" if name == "numpy" else "sql")
                times[name].append(time.perf_counter() - t0)
                assert all(written[t] > 0 for t in schema.ROLLUP_TABLES), written
        load = os.getloadavg()
        print(
            f"{rows / 1e6:.1f} M routing rows ({args.steps} parts of {args.tokens} tokens, 48 x 128, top-8), "
            f"{args.rounds} rounds interleaved; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
            f"on {os.cpu_count()} CPUs"
        )
        base = statistics.median(times["numpy"])
        for name, values in times.items():
            med = statistics.median(values)
            print(
                f"  index --engine {name:<6}: median {med:6.2f} s  ({rows / med / 1e6:5.2f} M rows/s)  "
                f"ratio to numpy {med / base:5.2f}x  rounds {', '.join(f'{v:.2f}' for v in values)}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

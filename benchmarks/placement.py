"""Expert-parallel placement: max / mean GPU load of contiguous, lpt and eplb plans, in and out of sample.

Two runs: the bundled model recorded on the bundled corpus with `routescope profile` (into a
temporary folder), and a generated large run (benchmarks/analysis_scale.py's generator: Zipf
expert preferences, 48 layers x 128 experts, top-8; reused from benchmarks/data/ when it is
there). A plan is built on one window of forward steps and evaluated on it (in sample) and on
another (out of sample: what the plan is worth on future traffic). Two splits: the first half
of the steps then the second (the bundled corpus is ordered by domain, so this is traffic that
drifts), and even steps then odd steps (the same mix). Numbers are max / mean GPU load (1.0 = even):
for the step (`model_imbalance`: Σ over layers of each layer's busiest GPU ÷ Σ of the means; layers
run one after another, so loads are never added across layers) and at the worst layer; also the
time to build each plan. For
comparison at R = 0, the round-robin "greedy" of plumb-moe 0.1.0, re-implemented here.

    python benchmarks/placement.py                 # bundled run + 20M-row generated run
    python benchmarks/placement.py --rows 1e8      # the 100M-row run of analysis_scale.py
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

import routescope as rs  # noqa: E402
from routescope.analysis.expert_parallel import model_imbalance  # noqa: E402
from routescope.analysis.placement import build_plan, evaluate_placement  # noqa: E402

METHODS = ("contiguous", "lpt", "eplb")


def record_bundled(out: Path) -> Path:
    """`routescope profile` with the bundled model and corpus (its defaults)."""
    cmd = [sys.executable, "-m", "routescope.cli", "profile", "--out", str(out), "--overwrite"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def generated_run(rows: int, data: Path) -> Path:
    """The analysis_scale.py run of `rows` routing rows (generated once, then reused)."""
    from analysis_scale import generate

    layers, experts, k = 48, 128, 8
    path = data / f"analysis_{rows}_{layers}x{experts}k{k}"
    if not (path / "manifest.json").exists():
        print(f"generating {rows:,} routing rows into {path} ...", flush=True)
        generate(path, rows, layers, experts, k, seq_len=512, zipf=0.8, coupling=2.0, seed=0)
    return path


def round_robin_plan(loads: pd.DataFrame, ep_size: int) -> pd.DataFrame:
    """The "greedy" of plumb-moe 0.1.0 (`plumb/analysis/placement.py`, `_greedy`), for comparison:
    experts hottest first, the i-th onto GPU i mod ep_size. Redundant slots: not supported there."""
    frames = []
    for layer, rows in loads.groupby("layer"):
        order = rows.sort_values("tokens", ascending=False, kind="stable")["expert"].to_numpy()
        gpu = np.arange(len(order)) % ep_size
        plan = pd.DataFrame({"layer": layer, "gpu": gpu, "expert": order}).sort_values(["gpu", "expert"])
        frames.append(plan.assign(slot=plan.groupby("gpu").cumcount())[["layer", "gpu", "slot", "expert"]])
    return pd.concat(frames, ignore_index=True)


def splits(run: rs.Run) -> dict[str, tuple[str, str]]:
    """Named (build, evaluate) `where=` pairs over the forward steps: the first half then the second
    (traffic that drifts: the bundled corpus is ordered by domain), and even then odd steps (the same mix)."""
    steps = run.sql("SELECT DISTINCT step FROM tokens ORDER BY step")["step"].to_numpy()
    if len(steps) < 2:
        raise SystemExit(f"{run.path}: needs at least two forward steps to split")
    cut = int(steps[len(steps) // 2])
    return {
        "next half": (f"step < {cut}", f"step >= {cut}"),
        "odd steps": ("step % 2 = 0", "step % 2 = 1"),
    }


def measure(path: Path, name: str, configs: list[tuple[int, int]]) -> pd.DataFrame:
    rows = []
    with rs.open_run(path) as run:
        for split, (first, second) in splits(run).items():
            train, test = run.expert_load(where=first), run.expert_load(where=second)
            for ep_size, redundant in configs:
                for method in METHODS if redundant else ("round robin (plumb-moe)", *METHODS):
                    t0 = time.perf_counter()
                    if method in METHODS:
                        plan = build_plan(train, ep_size, redundant, method)
                    else:
                        plan = round_robin_plan(train, ep_size)
                    build_s = time.perf_counter() - t0
                    inside = evaluate_placement(train, plan)
                    outside = evaluate_placement(test, plan)
                    rows.append(
                        {
                            "run": name,
                            "evaluated on": split,
                            "ep_size": ep_size,
                            "R": redundant,
                            "method": method,
                            "in_step": model_imbalance(inside)["imbalance"],
                            "in_worst": inside["imbalance"].max(),
                            "out_step": model_imbalance(outside)["imbalance"],
                            "out_worst": outside["imbalance"].max(),
                            "build_s": build_s,
                        }
                    )
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame) -> str:
    cells = [
        [f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in df.itertuples(index=False)
    ]
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--rows", type=float, default=20e6, help="routing rows of the generated run (default 2e7)"
    )
    ap.add_argument("--data", type=Path, default=ROOT / "data", help="folder for generated runs")
    ap.add_argument("--skip-bundled", action="store_true")
    ap.add_argument("--skip-generated", action="store_true")
    args = ap.parse_args(argv)

    results = []
    if not args.skip_bundled:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            path = record_bundled(Path(tmp) / "bundled")
            print(f"recorded the bundled run in {time.perf_counter() - t0:.0f} s", flush=True)
            results.append(
                measure(path, "bundled (4 layers x 16 experts, top-2)", [(4, 0), (4, 4), (8, 0), (8, 8)])
            )
    if not args.skip_generated:
        path = generated_run(int(args.rows), args.data)
        name = f"generated {int(args.rows) / 1e6:g}M"
        results.append(measure(path, name, [(8, 0), (8, 8), (16, 0), (16, 16)]))
    table = pd.concat(results, ignore_index=True)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print()
    print(markdown(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

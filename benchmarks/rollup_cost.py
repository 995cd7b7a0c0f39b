"""Rollup cost (issue 33 item 5): bytes the rollup tables add to a run, and the time they add.

1. Bytes: every rollup table's bytes over tokens + routing bytes of a run (the dashboard
   benchmark's 100M-row run by default; `--run RUN`).
2. Writer: PartWriter writing the same steps (48 MoE layers x 128 experts, top-8, tokens
   with a label) with rollups and without, interleaved in one process; wall time until the
   parts are on disk. With rollups each step brings its dense expert ids, as the recorder's
   steps do, and the writer counts and sums them (store/step_rollups.py): every bit of the
   rollup work is inside the timed writer run (the model thread only waits on the writer
   when its queue is full).
3. Recording: `rs.record` of the bundled model, `rollups=True` and `rollups=False`,
   interleaved, same process: wall time of the recorded forwards including the final flush.

    python benchmarks/rollup_cost.py [--run RUN] [--write-results]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from writer_throughput import Step, make_step  # noqa: E402 (benchmarks/: the same synthetic steps)

from routescope import schema  # noqa: E402
from routescope.store.writer import PartWriter  # noqa: E402

SECTION = "## Rollup cost"


def write_all(steps: list[Step], rollups: bool, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    for step in steps:
        step.rollups = rollups  # the step's counts are made in its to_tables, on the writer thread
    t0 = time.perf_counter()
    w = PartWriter(out, labels=("domain",), rollups=rollups, flush_seconds=1e9)
    for s in steps:
        w.submit(s)
    w.close()
    return time.perf_counter() - t0


def bytes_of(run: Path) -> dict[str, int]:
    from routescope.store.layout import list_parts

    names = [schema.TOKENS, schema.ROUTING, *schema.ROLLUP_TABLES]
    return {t: sum(p.stat().st_size for p in list_parts(run, t)) for t in names}


def record_time(rollups: bool, repeats: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    import routescope as rs
    from routescope.bundled import model_path

    model = AutoModelForCausalLM.from_pretrained(model_path()).eval()
    ids = torch.randint(1, 1000, (8, 256))
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            t0 = time.perf_counter()
            with (
                rs.record(model, Path(tmp) / f"r{i}", labels={"domain": "code"}, rollups=rollups) as rec,
                torch.no_grad(),
            ):
                for _ in range(4):
                    model(input_ids=ids)
            times.append(time.perf_counter() - t0)
            assert bool(rec.writer.rollup_parts_counted) == rollups  # the recorder's path was taken
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a run with rollups (e.g. the dashboard benchmark's, indexed)")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-record", action="store_true")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args(argv)
    lines = []
    if args.run:
        sizes = bytes_of(args.run)
        base = sizes[schema.TOKENS] + sizes[schema.ROUTING]
        extra = sum(sizes[t] for t in schema.ROLLUP_TABLES)
        detail = ", ".join(f"{t} {sizes[t] / 1e6:.1f} MB" for t in schema.ROLLUP_TABLES)
        lines.append(
            f"- Bytes, {args.run.name}: rollups {extra / 1e6:.1f} MB over tokens + routing {base / 1e6:.0f} MB = "
            f"**{100 * extra / base:.2f} %** ({detail})."
        )
    rng = np.random.default_rng(0)
    steps = [make_step(rng, i, args.tokens, 48, 8, 128) for i in range(args.steps)]
    rows = args.steps * args.tokens * 48 * 8
    with_r, without = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):  # interleaved
            without.append(write_all(steps, False, Path(tmp) / "off"))
            with_r.append(write_all(steps, True, Path(tmp) / "on"))
        written = bytes_of(Path(tmp) / "on")
    ratio = statistics.median(with_r) / statistics.median(without)
    lines.append(
        f"- Writer, {rows / 1e6:.0f}M routing rows in {args.steps} steps of {args.tokens} tokens (48 x 128, top-8): "
        f"{statistics.median(without):.2f} s without rollups, {statistics.median(with_r):.2f} s with "
        f"(median of {args.rounds}, interleaved): **{ratio:.3f}x** writer wall time; rollup bytes "
        f"{100 * sum(written[t] for t in schema.ROLLUP_TABLES) / (written['tokens'] + written['routing']):.2f} % "
        "of this run's (one part per flush, uncompacted per-part pairs compacted at close)."
    )
    if not args.skip_record:
        on, off = [], []
        for _ in range(args.rounds):
            off.append(record_time(False, 1))
            on.append(record_time(True, 1))
        lines.append(
            f"- Recording (bundled model, 4 forwards of 8 x 256 tokens, CPU): {statistics.median(off):.2f} s "
            f"without rollups, {statistics.median(on):.2f} s with: "
            f"**{statistics.median(on) / statistics.median(off):.3f}x** capture time."
        )
    load = f"load average {os.getloadavg()[0]:.1f} (2 cores shared with other work)"
    body = "\n".join([*lines, f"- Machine: {os.cpu_count()} cores, {load}."])
    print(body)
    if args.write_results:
        results = ROOT / "RESULTS.md"
        text = results.read_text(encoding="utf-8")
        block = f"{SECTION}\n\n`python benchmarks/rollup_cost.py --run RUN --write-results`\n\n{body}\n"
        if SECTION in text:
            start = text.index(SECTION)
            end = text.find("\n## ", start + len(SECTION))
            text = text[:start] + block + (text[end:] if end >= 0 else "")
        else:
            text = text.rstrip("\n") + "\n\n" + block
        results.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

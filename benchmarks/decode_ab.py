"""This tree's recorder against another commit's, side by side in one process, per decode step.

On the 2-core CPU machine the recorder's cost per decode step moves by a factor of two from
one moment to the next (benchmarks/RESULTS.md, round 15): two benchmark runs minutes apart
compare moments, not code. Here both versions record at once. The other commit's `routescope`
package is extracted with `git archive` into a temporary folder and imported under another
name (`routescope_base`, its own imports renamed), each version records its own copy of one
model (the same weights), and every round runs one `generate` call of each configuration and
version in a shuffled order, at a random caller depth (decode_overhead.py's `at_depth`).
Each call gives the recorder's step start and end, on the model thread's CPU clock, per
decode step (the manifest's `overhead`, decode_bookkeeping.py); the table has the medians,
their ratio, and the median of the paired differences (each round's this - base) with its
interquartile range. An A/A run (`--against` the commit this tree is at, no change) reads
ratios of 0.93-1.04 on this machine: a difference smaller than that is within its noise.

    python benchmarks/decode_ab.py [--against HEAD] [--rounds 16] [--configs c:2:1 c:16:8 e:2:1]

A configuration is path:MoE layers:batch, path `c` (transformers' static-cache `generate`
with a `compile_config`, inductor) or `e` (eager, dynamic cache); 48 new tokens, an
`eos_token_id` given.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import random
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import routescope as rs
from benchmarks.decode_bookkeeping import setup
from benchmarks.decode_overhead import DEPTH_SPAN, at_depth
from routescope.capture.recording import recorder

ROOT = Path(__file__).resolve().parent.parent
BASE = "routescope_base"


def extract(rev: str, into: Path) -> None:
    """`rev`'s routescope package under `into`/routescope_base, its imports renamed."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "routescope"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    (into / "routescope").rename(into / BASE)
    for path in (into / BASE).rglob("*.py"):
        path.write_text(re.sub(r"\broutescope\b", BASE, path.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="HEAD", help="the commit to compare with")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--configs", nargs="+", default=["c:2:1", "c:16:8", "e:2:1"])
    args = parser.parse_args(argv)
    configs = []
    for text in args.configs:
        path, layers, batch = text.split(":")
        if path not in ("c", "e"):
            parser.error(f"--configs {text}: the path is c (compiled) or e (eager), not {path!r}")
        configs.append((path, int(layers), int(batch)))
    torch.set_num_threads(1)  # the writer threads keep the other core
    tmp = Path(tempfile.mkdtemp(prefix="rs-decode-ab-"))
    try:
        try:
            extract(args.against, tmp)
        except subprocess.CalledProcessError as error:
            parser.error(f"--against {args.against}: {error.stderr.decode(errors='replace').strip()}")
        sys.path.insert(0, str(tmp))
        base = importlib.import_module(BASE)
        base_recorder = importlib.import_module(f"{BASE}.capture.recording.recorder")
        clock = types.SimpleNamespace(perf_counter=time.thread_time, monotonic=time.monotonic)
        recorder.time = base_recorder.time = clock  # both time their steps on the thread's CPU clock
        per_step: dict[tuple, list[float]] = {}
        runs = {}
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for path, layers, batch in configs:
                model, kwargs = setup(layers, batch, compiled=path == "c")  # the bookkeeping benchmark's
                kwargs.update(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens + 2)
                for name, package in (("this", rs), ("base", base)):
                    copied = copy.deepcopy(model)
                    rec = stack.enter_context(
                        package.record(copied, tmp / f"run-{path}{layers}-{batch}-{name}")
                    )
                    for _ in range(2):  # compile, warm up
                        copied.generate(**kwargs)
                    runs[path, layers, batch, name] = (copied, kwargs, rec)
                    per_step[path, layers, batch, name] = []
            rng = random.Random(0)
            keys = list(runs)
            for _ in range(args.rounds):
                rng.shuffle(keys)
                depth = rng.randrange(DEPTH_SPAN)
                for key in keys:
                    model, kwargs, rec = runs[key]
                    spent, steps = rec._overhead, rec.steps
                    at_depth(depth, model.generate, **kwargs)
                    per_step[key].append(1e6 * (rec._overhead - spent) / (rec.steps - steps))
        print(
            f"recorder step start + end, model-thread CPU us per decode step, this tree against "
            f"{args.against}, {args.rounds} rounds, {args.new_tokens} new tokens"
        )
        print("| path | MoE layers | batch | this | base | ratio | paired difference (IQR) |")
        print("|---|---|---|---|---|---|---|")
        for path, layers, batch in configs:
            this, base_ = per_step[path, layers, batch, "this"], per_step[path, layers, batch, "base"]
            diff = [a - b for a, b in zip(this, base_)]
            q = statistics.quantiles(diff, n=4)
            print(
                f"| {'compiled' if path == 'c' else 'eager'} | {layers} | {batch} | "
                f"{statistics.median(this):.1f} | {statistics.median(base_):.1f} | "
                f"{statistics.median(this) / statistics.median(base_):.3f} | "
                f"{statistics.median(diff):+.1f} ({q[2] - q[0]:.1f}) |"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

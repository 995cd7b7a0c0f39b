"""The recorder's own work per decode step, timed in-process on the model thread.

SPEC 7's decode goal (a <= 0.1 ms per step, b <= 0.01 ms per MoE layer on the 2-core CPU
machine) is measured by `decode_overhead.py` as recorded - plain over whole steps. On this
machine whole compiled steps cannot resolve a: their A/A fits spread about +-0.1 ms
(benchmarks/RESULTS.md, rounds 13 and 14). This benchmark times what recording adds to a
step directly instead: the model thread's CPU time inside the recorder's step start and
end (`Recorder._begin_step` / `_end_step`, the calls the manifest's `overhead` sums), over
real `generate` calls, compiled or eager, at random caller depths. It leaves out the
per-layer writes (eager: one call per MoE layer, the b that `decode_overhead.py
--interleave` resolves; compiled: two graph ops per layer inside the graph).

Each `generate` call gives one figure (its recorder time / its steps); the table has their
median and interquartile range over the rounds, and the fit a + b x MoE layers of the medians.
Every configuration records at once (a record block each) and the rounds run one call of each
in a shuffled order, so this machine's drift (tens of percent within seconds) spreads over all.

    python benchmarks/decode_bookkeeping.py [--layers 2 16] [--batches 1 8] [--rounds 12]
        [--new-tokens 48] [--paths compiled eager]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import routescope as rs
from benchmarks.decode_overhead import DEPTH_SPAN, at_depth, build, fit
from routescope.capture.recording import recorder


def thread_clock() -> None:
    """The recorder times its step calls with `time.perf_counter`; here with the model
    thread's CPU clock (on a shared 2-core machine elapsed time mostly measures waiting)."""
    recorder.time = types.SimpleNamespace(perf_counter=time.thread_time, monotonic=time.monotonic)


def setup(layers: int, batch: int, compiled: bool) -> tuple[torch.nn.Module, dict]:
    from transformers import CompileConfig

    model = build(layers=layers, hidden=256, experts=8, top_k=2, moe_width=128, device="cpu")
    prompt = torch.randint(3, 4000, (batch, 16))
    kwargs = {
        "input_ids": prompt,
        "attention_mask": torch.ones_like(prompt),
        "do_sample": False,
        "pad_token_id": 0,
        "eos_token_id": 2,  # the end-of-text check runs, as with a real model's generation config
    }
    if compiled:
        config = CompileConfig(fullgraph=True, backend="inductor")
        config._compile_all_devices = True  # transformers compiles on CUDA only by default
        kwargs.update(cache_implementation="static", compile_config=config)
    return model, kwargs


def measure(paths: list[str], args: argparse.Namespace, tmp: Path) -> list[dict]:
    """Every (path, batch, layers) recorded in its own record block, all open at once, one
    `generate` call of each per round in a shuffled order: the machine's drift spreads over
    all of them alike."""
    configs = [(p, b, n) for p in paths for b in args.batches for n in args.layers]
    per_step: dict[tuple, list[float]] = {c: [] for c in configs}
    rng = random.Random(0)
    new = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens + 2}
    with torch.no_grad(), contextlib.ExitStack() as stack:
        runs = {}
        for i, (path, batch, layers) in enumerate(configs):
            model, kwargs = setup(layers, batch, path == "compiled")
            rec = stack.enter_context(rs.record(model, tmp / f"run{i}", flush_seconds=1e9))
            for _ in range(2):  # compile, warm up
                model.generate(**kwargs, **new)
            runs[path, batch, layers] = (model, kwargs, rec)
        for _ in range(args.rounds):
            rng.shuffle(configs)
            depth = rng.randrange(DEPTH_SPAN)
            for config in configs:
                model, kwargs, rec = runs[config]
                spent, steps = rec._overhead, rec.steps
                at_depth(depth, model.generate, **kwargs, **new)
                per_step[config].append(1000 * (rec._overhead - spent) / (rec.steps - steps))
    rows = []
    for (path, batch, layers), values in sorted(per_step.items()):
        quartiles = statistics.quantiles(values, n=4)
        median = statistics.median(values)
        rows.append(
            {
                "path": path,
                "batch": batch,
                "layers": layers,
                "added": median,
                "iqr": quartiles[2] - quartiles[0],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 16])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--paths", nargs="+", choices=["compiled", "eager"], default=["compiled", "eager"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the writer thread keeps the other core
    thread_clock()
    tmp = Path(tempfile.mkdtemp(prefix="rs-bookkeeping-"))
    print(
        f"recorder step start + end, model-thread CPU ms per decode step, {args.new_tokens} new "
        f"tokens, {args.rounds} generate calls each (median, IQR)"
    )
    print("| path | batch | MoE layers | ms/step | IQR |")
    print("|---|---|---|---|---|")
    try:
        rows = measure(args.paths, args, tmp)
        for path in args.paths:
            for batch in args.batches:
                group = [r for r in rows if r["path"] == path and r["batch"] == batch]
                for r in group:
                    print(f"| {path} | {batch} | {r['layers']} | {r['added']:.4f} | {r['iqr']:.4f} |")
                if len(group) >= 2:
                    a, b = fit(group, "", "added")
                    print(f"  {path} batch {batch}: a = {a:.4f} ms/step, b = {b:.5f} ms/MoE layer")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

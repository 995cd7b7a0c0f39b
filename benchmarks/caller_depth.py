"""Caller depth: one unrecorded model's decode step, timed from several Python stack depths.

On CPython 3.11 a thread's frame stack grows in 16 KB chunks: a chunk is mapped when a call
crosses into it and unmapped as soon as that call returns. A decode loop whose hot calls (the
Python wrappers inside a model's forward, or a compiled graph's custom ops) straddle a chunk
boundary maps and unmaps pages on every call, and its step costs more. Recording puts a frame
or two between the caller and the model, so a recorded-against-plain comparison made at one
fixed depth measures this as well as the recording; `decode_overhead.py --depth` chooses the
depth for that reason. This script shows the effect without routescope: the step time (model
thread CPU, median) and the minor page faults per step (`RUSAGE_THREAD`) at each depth.

    python benchmarks/caller_depth.py [--layers 16] [--depths 24] [--steps 60] [--eager]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_overhead import at_depth, build  # the same model as the decode benchmark


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--depths", type=int, default=24)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eager", action="store_true", help="the eager model (default: model.compile())")
    args = parser.parse_args(argv)
    from transformers import StaticCache

    torch.set_num_threads(1)
    model = build(layers=args.layers, hidden=64, experts=8, top_k=2, moe_width=32, device="cpu")
    if not args.eager:
        model.compile(fullgraph=True)
    prompt = torch.randint(1, 4000, (1, 16))
    print(
        f"python {sys.version.split()[0]}, torch {torch.__version__}, {args.layers} MoE layers, "
        f"{'eager' if args.eager else 'compiled'}, static cache, batch 1, {args.steps} steps per depth"
    )
    print("| extra caller frames | ms per step | minor page faults per step |")
    print("|---|---|---|")
    with torch.no_grad():
        length = 16 + args.steps + 4
        for n, depth in enumerate([0, *range(args.depths)]):  # the first pass warms (compiles) only
            cache = StaticCache(config=model.config, max_cache_len=length)
            out = model(
                input_ids=prompt, past_key_values=cache, cache_position=torch.arange(16), use_cache=True
            )
            token = out.logits[:, -1:].argmax(-1)
            times: list[float] = []
            before = resource.getrusage(resource.RUSAGE_THREAD)
            for i in range(args.steps):
                step: dict[str, Any] = {"past_key_values": cache, "cache_position": torch.tensor([16 + i])}
                start = time.thread_time()
                out = at_depth(depth, model, input_ids=token, use_cache=True, **step)
                times.append(time.thread_time() - start)
                token = out.logits[:, -1:].argmax(-1)
            after = resource.getrusage(resource.RUSAGE_THREAD)
            faults = (after.ru_minflt - before.ru_minflt) / args.steps
            if n:
                print(f"| {depth} | {1000 * statistics.median(times[3:]):.3f} | {faults:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

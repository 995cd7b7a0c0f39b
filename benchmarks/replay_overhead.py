"""Replay overhead: forward time under rs.replay / without, interleaved in one process.

Same model and batch as `capture_overhead.py` (its `build`). The run is recorded once from
the same batch; then each round times, in a shuffled order, a plain forward, a forward
under `rs.replay(weights="recorded")` and one under `weights="router"`, each replay entered
once per round (so its cost includes matching the batch's tokens, not loading the run).
Loading the run (`__enter__`) is timed on its own, and so is a greedy `generate` under replay.

    python benchmarks/replay_overhead.py [--device cuda] [--layers 8 --experts 64 --top-k 8]
        [--decode-steps 16]
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import routescope as rs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from capture_overhead import build, timed  # the same setup as the capture benchmark


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--decode-steps", type=int, default=16)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    model = build(args)
    ids = torch.randint(1, 4000, (args.batch, args.seq), device=args.device)
    tmp = Path(tempfile.mkdtemp(prefix="rs-replay-bench-"))

    def plain():
        model(input_ids=ids)

    for _ in range(2):  # warm-up
        plain()
    with rs.record(model, tmp / "run"):
        plain()
    run = rs.open_run(tmp / "run")

    def replayed(weights: str):
        def variant() -> float:
            with rs.replay(model, run, weights=weights):
                return timed(plain, args.device)

        return variant

    variants = {"none": lambda: timed(plain, args.device), "recorded": replayed("recorded")}
    variants["router"] = replayed("router")
    results: dict[str, list[float]] = {name: [] for name in variants}
    order, rng = list(variants), random.Random(0)
    for _ in range(args.rounds):
        rng.shuffle(order)  # machine-load drift hits every variant alike
        for name in order:
            results[name].append(variants[name]())
    base = statistics.median(results["none"])
    rows = int(run.sql("SELECT count(*) AS n FROM routing").n[0])
    print(
        f"device={args.device} layers={args.layers} experts={args.experts} top_k={args.top_k} "
        f"hidden={args.hidden} batch={args.batch}x{args.seq} rounds={args.rounds} run rows={rows}"
    )
    print(f"{'variant':<22}{'median s':>10}{'ratio':>8}")
    for name, times in results.items():
        med = statistics.median(times)
        print(f"{name:<22}{med:>10.4f}{med / base:>8.3f}")

    enter = []
    for _ in range(3):
        start = time.perf_counter()
        with rs.replay(model, run):
            enter.append(time.perf_counter() - start)
    print(
        f"entering replay (load {rows} routing rows, build the content index): {statistics.median(enter):.3f}s"
    )

    if args.decode_steps:
        prompt = ids[:, :32]
        settings = dict(max_new_tokens=args.decode_steps, min_new_tokens=args.decode_steps, do_sample=False)

        def gen():
            return model.generate(input_ids=prompt, pad_token_id=0, **settings)

        gen()
        with rs.record(model, tmp / "gen"):
            gen()
        gen_run = rs.open_run(tmp / "gen")
        g_plain, g_replay = [], []
        for _ in range(max(2, args.rounds // 2)):
            g_plain.append(timed(gen, args.device))
            with rs.replay(model, gen_run):
                g_replay.append(timed(gen, args.device))
        ratio = statistics.median(g_replay) / statistics.median(g_plain)
        print(
            f"generate {args.decode_steps} tokens: none {statistics.median(g_plain):.4f}s, "
            f"replay {statistics.median(g_replay):.4f}s, ratio {ratio:.3f}"
        )
        gen_run.close()
    run.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

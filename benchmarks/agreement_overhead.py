"""Cost of R3 agreement (exact_match, any_layer_differs) in rs.compare's NumPy pass.

`saturation.agreement_table` compares two [pairs, layers, k] arrays of expert ids chunk by
chunk. Before issue 34 the pass counted the overlap |topk_A ∩ topk_B| and slot-0 agreement;
now the same overlap also gives the exact agreement of the sets and the tokens that differ
in any layer. This times both versions of the pass on the same arrays, interleaved (order
shuffled per round), and prints the median of each and their ratio. Arrays only: the scan
of the routing (benchmarks/compare_scale.py) is the same for both.

    python benchmarks/agreement_overhead.py [--pairs 200000 --layers 48 --experts 128 --top-k 8]
        [--rounds 7]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np

from routescope.analysis.saturation import CHUNK_PAIRS


def before(a: np.ndarray, b: np.ndarray) -> tuple:
    """The pass as it was: overlap and slot-0 agreement."""
    shared = np.zeros(a.shape[1], dtype=np.int64)
    top1 = np.zeros(a.shape[1], dtype=np.int64)
    for start in range(0, len(a), CHUNK_PAIRS):
        ca, cb = a[start : start + CHUNK_PAIRS], b[start : start + CHUNK_PAIRS]
        shared += (ca[..., :, None] == cb[..., None, :]).sum(axis=(0, 2, 3))
        top1 += (ca[..., 0] == cb[..., 0]).sum(axis=0)
    return shared, top1


def now(a: np.ndarray, b: np.ndarray) -> tuple:
    """The pass of `agreement_table` (the same arithmetic, copied to time it alone)."""
    shared = np.zeros(a.shape[1], dtype=np.int64)
    top1 = np.zeros(a.shape[1], dtype=np.int64)
    same_set = np.zeros(a.shape[1], dtype=np.int64)
    differing = 0
    slots = a.shape[-1]
    filled = bool((a >= 0).all() and (b >= 0).all())
    for start in range(0, len(a), CHUNK_PAIRS):
        ca, cb = a[start : start + CHUNK_PAIRS], b[start : start + CHUNK_PAIRS]
        overlap = (ca[..., :, None] == cb[..., None, :]).sum(axis=(2, 3))
        shared += overlap.sum(axis=0)
        top1 += (ca[..., 0] == cb[..., 0]).sum(axis=0)
        if filled:
            equal = overlap == slots
        else:
            size_a, size_b = (ca >= 0).sum(axis=-1), (cb >= 0).sum(axis=-1)
            equal = (overlap == size_a) & (overlap == size_b) & (size_a > 0)
        same_set += equal.sum(axis=0)
        differing += int((~equal).any(axis=1).sum())
    return shared, top1, same_set, differing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200_000)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shape = (args.pairs, args.layers)
    # distinct ids per (pair, layer): the first k of a random permutation key
    a = np.argsort(rng.random((*shape, args.experts)), axis=-1)[..., : args.top_k].astype(np.int16)
    b = a.copy()
    flip = rng.random(shape) < 0.1  # about 10 % of decisions differ (the R3 paper's figure)
    b[flip, -1] = (b[flip, -1] + 1) % args.experts
    assert (before(a, b)[0] == now(a, b)[0]).all()
    times: dict[str, list[float]] = {"before": [], "now": []}
    for _ in range(args.rounds):
        order = list(times)
        random.shuffle(order)
        for name in order:
            start = time.perf_counter()
            (before if name == "before" else now)(a, b)
            times[name].append(time.perf_counter() - start)
    rows = args.pairs * args.layers * args.top_k
    print(f"pairs={args.pairs:,} layers={args.layers} k={args.top_k} ({rows:,} routing rows a side)")
    for name, values in times.items():
        print(f"{name:<8} {statistics.median(values):8.3f} s (median of {args.rounds})")
    print(f"ratio now / before  {statistics.median(times['now']) / statistics.median(times['before']):.3f}")


if __name__ == "__main__":
    main()

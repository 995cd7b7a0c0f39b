"""What a compiled graph's write of each layer's choice costs, by the buffer's capacity.

A compiled recording writes each MoE layer's expert ids (+1) and weights into its rows of a
group buffer [layers, capacity, k] (capture/recording/sink.py). Inductor functionalizes those
slice writes: the graph rewrites the group's whole buffer once, every element choosing among
the layers' writes, so the write costs about layers x layers x capacity x k, not layers x
tokens x k. Until round 13 a compiled decode step wrote buffers of 64 rows (or more); a
compiled CPU step now writes a set of a ring whose capacity is its token count rounded up to
a power of two (capture/recording/rows.py).

This times one compiled function of L router-like layers (matmul, softmax, top-k) side by
side, in one process, min over repeats (thread CPU time): `returned` gives every layer's ids
and weights back as outputs (what materialising them costs anyway); `rows64` writes them into
[L, 64, k] buffers as the recording did; `rows_tokens` into [L, tokens rounded up, k] buffers
as it does now. Each figure is us per call; `- returned` is the write's own cost.

    python benchmarks/compiled_write.py [--layers 16 48] [--top-k 2 8] [--tokens 1 8] [--repeat 7]
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any

import torch

HIDDEN = 64


def make(layers: int, top_k: int, tokens: int, capacity: int | None) -> Any:
    """The compiled function; `capacity` None: the choices are returned, not written."""
    weights = [torch.randn(HIDDEN, HIDDEN) for _ in range(layers)]
    rows = max(capacity or 1, tokens)
    ids_buffer = torch.zeros(layers, rows, top_k, dtype=torch.int16)
    weight_buffer = torch.zeros(layers, rows, top_k)

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        returned = []
        for i in range(layers):
            logits = x @ weights[i]
            chosen, ids = torch.topk(logits.softmax(-1), top_k)
            if capacity is None:
                returned += [ids, chosen]
            else:  # as RoutingSink.write traces it
                ids_buffer[i][: ids.shape[0]].copy_(ids + 1)
                weight_buffer[i][: chosen.shape[0]].copy_(chosen)
            x = x + logits * 0.01
        return x, returned

    return torch.compile(forward, fullgraph=True)


def per_call(fn: Any, x: torch.Tensor, repeat: int, number: int = 100) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.thread_time()
        for _ in range(number):
            fn(x)
        best = min(best, (time.thread_time() - start) / number)
    return best * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[16, 48])
    parser.add_argument("--top-k", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(
        "| layers | k | tokens | returned us | rows64 us | rows_tokens us | rows64 - returned | rows_tokens - returned |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for layers, top_k, tokens in itertools.product(args.layers, args.top_k, args.tokens):
        torch._dynamo.reset()  # the three functions share one code object: a few graphs per shape
        x = torch.randn(tokens, HIDDEN)
        capacity = 1 << (tokens - 1).bit_length()
        fns = {
            "returned": make(layers, top_k, tokens, None),
            "rows64": make(layers, top_k, tokens, 64),
            "rows_tokens": make(layers, top_k, tokens, capacity),
        }
        for fn in fns.values():
            for _ in range(3):
                fn(x)  # compile, warm up
        best = {name: float("inf") for name in fns}
        for _ in range(3):  # alternating rounds: the machine's drift reaches each alike
            for name, fn in fns.items():
                best[name] = min(best[name], per_call(fn, x, args.repeat))
        base = best["returned"]
        print(
            f"| {layers} | {top_k} | {tokens} | {base:.0f} | {best['rows64']:.0f} | {best['rows_tokens']:.0f} "
            f"| {best['rows64'] - base:+.0f} | {best['rows_tokens'] - base:+.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

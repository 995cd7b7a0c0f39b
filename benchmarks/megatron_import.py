"""How fast `routescope import megatron` reads a router-trace directory, beside the floor of
parsing the same JSON lines (what Megatron's own tools/moe_routing scripts do).

A synthetic trace is written as the merged tracer writes it (json.dumps per record, keys in
its order, ascending ids as routing_map.nonzero() gives them; with --logits the bf16
sidecar). Each round times, in a shuffled order: `json` (json.loads of every line),
`parse` (import_megatron: parse, check, rank, build the tables) and `import` (parse plus
write_imported_run, the Parquet parts). Medians over the rounds and the ratio to `json`.

    python benchmarks/megatron_import.py --ranks 2 --steps 8 --layers 8 --tokens 4096 --logits
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from routescope.importers.core.tables import write_imported_run
from routescope.importers.megatron import import_megatron


def write_trace(
    root: Path, ranks: int, steps: int, layers: int, tokens: int, experts: int, k: int, logits: bool
) -> int:
    rng = np.random.default_rng(0)
    rows = 0
    for rank in range(ranks):
        offset = 0
        with (
            open(root / f"router_trace_rank{rank}.jsonl", "w") as trace,
            open(root / f"logits_rank{rank}.bin", "wb") as side,
        ):
            for step in range(steps):
                for layer in range(layers):
                    scores = rng.standard_normal((tokens, experts)).astype(np.float32)
                    top = np.sort(np.argsort(-scores, axis=1)[:, :k], axis=1)
                    record = {"step": step, "stage": "pre_dispatch", "block": "decoder", "layer": layer,
                              "rank": rank, "num_tokens": tokens, "topk": k}  # fmt: skip
                    if logits:
                        raw = (scores.view(np.uint32) >> 16).astype(np.uint16).tobytes()  # bf16 bits
                        side.write(raw)
                        record.update(
                            logit_offset=offset, logit_bytes=len(raw), logit_shape=[tokens, experts]
                        )
                        offset += len(raw)
                    record["top_indices"] = top.tolist()
                    trace.write(json.dumps(record) + "\n")
                    rows += tokens * k
    return rows


def time_json(root: Path) -> None:
    for path in sorted(root.glob("router_trace_rank*.jsonl")):
        with open(path) as f:
            for line in f:
                json.loads(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--logits", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="megatron_trace_"))
    try:
        rows = write_trace(
            root, args.ranks, args.steps, args.layers, args.tokens, args.experts, args.top_k, args.logits
        )
        size = sum(p.stat().st_size for p in root.iterdir())
        out = root.parent / (root.name + "_run")
        variants = {
            "json": lambda: time_json(root),
            "parse": lambda: import_megatron(root, num_experts=args.experts, mode="training"),
            "import": lambda: write_imported_run(
                import_megatron(root, num_experts=args.experts, mode="training"), out, overwrite=True
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        order = list(variants)
        for round_ in range(args.rounds):
            random.Random(round_).shuffle(order)
            for name in order:
                start = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - start)
        print(
            f"ranks={args.ranks} steps={args.steps} layers={args.layers} tokens={args.tokens} "
            f"experts={args.experts} top_k={args.top_k} logits={args.logits} rounds={args.rounds}"
        )
        print(f"trace: {size / 1e6:.1f} MB, {rows:,} routing rows")
        base = statistics.median(times["json"])
        print(f"{'variant':<10}{'median s':>10}{'rows/s':>14}{'ratio':>8}")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"{name:<10}{median:>10.3f}{rows / median:>14,.0f}{median / base:>8.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(root.parent / (root.name + "_run"), ignore_errors=True)


if __name__ == "__main__":
    main()

"""Capture overhead: forward time with recording / without, interleaved in one process.

Compares routescope against a naive hook that calls .tolist() in the hook, and against
`output_router_logits=True` followed by a top-k. Also reports bytes per routing row on disk.

    python benchmarks/capture_overhead.py [--device cuda] [--layers 8 --experts 64 --top-k 8]
        [--decode-steps 16] [--static-steps 16] [--compiled]

`--static-steps N` times `generate(cache_implementation="static")` with and without
recording; `--compiled` times a `torch.compile(fullgraph=True)` forward and transformers'
compiled static-cache `generate` (`--compiled-steps` new tokens, decode steps compiled),
each recorded against unrecorded (capture/recording/compiled.py). Two copies of the model with the
same weights: one recorded inside one long `rs.record` block (entering and leaving a
block recompiles), one never recorded; their calls are interleaved.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from copy import deepcopy
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import routescope as rs
from routescope.capture.adapters import is_fused_experts


def build(args: argparse.Namespace) -> torch.nn.Module:
    config = AutoConfig.for_model(
        "qwen3_moe",
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        moe_intermediate_size=args.hidden // 2,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=args.hidden // 8,
        vocab_size=4096,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    return AutoModelForCausalLM.from_config(config).to(args.device, dtype).eval()


class NaiveRecorder:
    """What one-off scripts do: pull every decision to Python lists inside the hook."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.rows: list = []
        self.handles = [
            m.register_forward_pre_hook(self.hook) for m in model.modules() if is_fused_experts(m)
        ]

    def hook(self, module, args) -> None:
        self.rows.append((args[1].tolist(), args[2].tolist()))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


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
    parser.add_argument(
        "--decode-steps", type=int, default=0, help="also time generate() with this many new tokens"
    )
    parser.add_argument("--static-steps", type=int, default=0, help="also time static-cache generate()")
    parser.add_argument("--compiled", action="store_true", help="also time the compiled paths")
    parser.add_argument("--compiled-steps", type=int, default=16, help="new tokens of compiled generate")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    model = build(args)
    ids = torch.randint(1, 4000, (args.batch, args.seq), device=args.device)
    mask = torch.ones_like(ids)
    tmp = Path(tempfile.mkdtemp(prefix="rs-bench-"))

    def plain():
        model(input_ids=ids, attention_mask=mask)

    def logits_topk():
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
        for logits in out.router_logits:
            torch.topk(logits.softmax(-1), args.top_k, dim=-1)

    for _ in range(2):  # warm-up
        plain()
        logits_topk()

    def recorded():
        with rs.record(model, tmp / "run", mode="append", flush_seconds=1e9):
            return timed(plain, args.device)

    def naive_hook():
        naive = NaiveRecorder(model)
        try:
            return timed(plain, args.device)
        finally:
            naive.close()

    variants = {
        "none": lambda: timed(plain, args.device),
        "routescope": recorded,
        "naive .tolist()": naive_hook,
        "router_logits+topk": lambda: timed(logits_topk, args.device),
    }
    results: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    rng = random.Random(0)
    for _ in range(args.rounds):
        # every round times each variant once, in a shuffled order, so drift in machine
        # load and cache warmth hit all of them alike
        rng.shuffle(order)
        for name in order:
            results[name].append(variants[name]())
    run = rs.open_run(tmp / "run")
    rows = int(run.sql("SELECT count(*) AS n FROM routing").n[0])
    on_disk = sum(p.stat().st_size for p in (tmp / "run" / "routing").rglob("*.parquet"))

    base = statistics.median(results["none"])
    print(
        f"device={args.device} layers={args.layers} experts={args.experts} top_k={args.top_k} "
        f"hidden={args.hidden} batch={args.batch}x{args.seq} rounds={args.rounds}"
    )
    print(f"{'variant':<22}{'median s':>10}{'ratio':>8}")
    for name, times in results.items():
        med = statistics.median(times)
        print(f"{name:<22}{med:>10.4f}{med / base:>8.3f}")

    if args.decode_steps:

        def gen():
            model.generate(
                input_ids=ids[:, :32],
                attention_mask=mask[:, :32],
                max_new_tokens=args.decode_steps,
                do_sample=False,
                pad_token_id=0,
                min_new_tokens=args.decode_steps,
            )

        gen()
        g_plain, g_rec = [], []
        for i in range(max(2, args.rounds // 2)):
            g_plain.append(timed(gen, args.device))
            with rs.record(model, tmp / f"gen{i}", flush_seconds=1e9):
                g_rec.append(timed(gen, args.device))
        print(
            f"generate {args.decode_steps} tokens: none {statistics.median(g_plain):.4f}s, "
            f"routescope {statistics.median(g_rec):.4f}s, ratio {statistics.median(g_rec) / statistics.median(g_plain):.3f}"
        )
    if args.static_steps:
        static_generate(model, ids, mask, args, tmp)
    if args.compiled:
        compiled_paths(model, ids, mask, args, tmp)
    print(f"storage: {rows} routing rows, {on_disk / rows:.3f} bytes/row with float32 weights")
    with rs.record(model, tmp / "noweights", weights=False):
        plain()
    rows2 = int(rs.open_run(tmp / "noweights").sql("SELECT count(*) AS n FROM routing").n[0])
    on_disk2 = sum(p.stat().st_size for p in (tmp / "noweights" / "routing").rglob("*.parquet"))
    print(f"storage: {rows2} routing rows, {on_disk2 / rows2:.3f} bytes/row without weights (weights=False)")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def interleaved(variants: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each variant, timed once per round in a shuffled order."""
    results: dict[str, list[float]] = {name: [] for name in variants}
    order, rng = list(variants), random.Random(1)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            results[name].append(variants[name]())
    return {name: statistics.median(times) for name, times in results.items()}


def static_generate(model, ids, mask, args, tmp: Path) -> None:
    def gen():
        model.generate(
            input_ids=ids[:, :32],
            attention_mask=mask[:, :32],
            max_new_tokens=args.static_steps,
            min_new_tokens=args.static_steps,
            do_sample=False,
            pad_token_id=0,
            cache_implementation="static",
        )

    gen()
    count = iter(range(10**6))

    def recorded():
        with rs.record(model, tmp / f"static{next(count)}", flush_seconds=1e9):
            return timed(gen, args.device)

    med = interleaved({"none": lambda: timed(gen, args.device), "routescope": recorded}, args.rounds)
    print(
        f"static-cache generate {args.static_steps} tokens: none {med['none']:.4f}s, "
        f"routescope {med['routescope']:.4f}s, ratio {med['routescope'] / med['none']:.3f}"
    )


def compiled_paths(model, ids, mask, args, tmp: Path) -> None:
    """Recorded compiled forward and compiled decode against the same, unrecorded."""
    from transformers import CompileConfig

    copy = deepcopy(model)
    plain, recorded = torch.compile(copy, fullgraph=True), torch.compile(model, fullgraph=True)
    config = CompileConfig(fullgraph=True)
    config._compile_all_devices = True  # transformers compiles on CUDA only by default
    prompt = {"input_ids": ids[:, :32], "attention_mask": mask[:, :32]}

    def forward(m):
        return lambda: timed(lambda: m(input_ids=ids, attention_mask=mask), args.device)

    def decode(m):
        def gen():
            m.generate(
                **prompt,
                max_new_tokens=args.compiled_steps,
                min_new_tokens=args.compiled_steps,
                do_sample=False,
                pad_token_id=0,
                cache_implementation="static",
                compile_config=config,
            )

        return lambda: timed(gen, args.device)

    variants = {
        "compiled forward": forward(plain),
        "compiled forward+routescope": forward(recorded),
        "compiled generate": decode(copy),
        "compiled generate+routescope": decode(model),
    }
    with rs.record(recorded, tmp / "compiled", flush_seconds=1e9):
        started = time.perf_counter()
        for _ in range(3):  # compile (decode: a static graph, then a dynamic one) and warm up
            for variant in variants.values():
                variant()
        print(f"compiled paths: compiled and warmed up in {time.perf_counter() - started:.0f}s")
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            med = interleaved(variants, args.rounds)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    for what in ("compiled forward", "compiled generate"):
        base, rec = med[what], med[what + "+routescope"]
        steps = f" {args.compiled_steps} tokens" if "generate" in what else ""
        print(f"{what}{steps}: none {base:.4f}s, routescope {rec:.4f}s, ratio {rec / base:.3f}")
    run = rs.open_run(tmp / "compiled")
    print(
        "compiled run:",
        run.sql("SELECT phase, count(*) AS tokens FROM tokens GROUP BY 1 ORDER BY 1").to_dict("list"),
    )


if __name__ == "__main__":
    sys.exit(main())

"""Training-step overhead of rs.watch: step time with the device counters attached / without.

A training step is forward + backward + AdamW step on a qwen3_moe model built from a config.
Blocks of steps with `rs.watch(model)` and without it alternate in one process (order
shuffled per round). Each watched block ends with one read of the scalars, timed apart: the
one host sync and the host arithmetic a Trainer log costs. Reports the median step time of
each, their ratio, and the ratio with one read every `--log-every` steps (a Trainer's
`logging_steps`). Target (issue 23): <= 1.03.

    python benchmarks/training_overhead.py [--device cuda] [--layers 4 --experts 16 --top-k 2]
        [--batch 4 --seq 128] [--rounds 30 --steps 2] [--log-every 10]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import routescope as rs
from routescope.training import AlertRules


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
    return AutoModelForCausalLM.from_config(config).to(args.device).train()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args()

    model = build(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4096, (args.batch, args.seq), generator=g).to(args.device)
    mask = torch.ones_like(ids)
    mask[0, -args.seq // 4 :] = 0  # some padding, as real batches have

    def step() -> float:
        sync(args.device)
        started = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(args.device)
        return time.perf_counter() - started

    for _ in range(3):  # warm-up
        step()
    times: dict[str, list[float]] = {"plain": [], "watch": [], "read": []}
    rng = random.Random(0)
    for _ in range(args.rounds):
        order = ["plain", "watch"]
        rng.shuffle(order)
        for mode in order:
            if mode == "plain":
                times[mode] += [step() for _ in range(args.steps)]
                continue
            with rs.watch(model, alerts=AlertRules(enabled=False)) as watch:
                for _ in range(args.steps):
                    times[mode].append(step())
                    watch.end_step(read=False)
                started = time.perf_counter()
                watch.scalars()  # what one Trainer log costs: one host sync, then the scalars
                times["read"].append(time.perf_counter() - started)
    plain, watched = statistics.median(times["plain"]), statistics.median(times["watch"])
    read = statistics.median(times["read"])
    amortized = (watched * args.log_every + read) / (plain * args.log_every)
    tokens = int(mask.sum())
    print(
        f"device={args.device} layers={args.layers} experts={args.experts} top_k={args.top_k} "
        f"tokens/step={tokens} steps={len(times['plain'])} each"
    )
    print(f"step without watch  {1000 * plain:8.2f} ms (median)")
    print(f"step with watch     {1000 * watched:8.2f} ms (median)")
    print(f"one read (per log)  {1000 * read:8.2f} ms (median)")
    print(f"ratio, steps only   {watched / plain:8.3f}")
    print(f"ratio, logging every {args.log_every} steps {amortized:8.3f}")


if __name__ == "__main__":
    main()

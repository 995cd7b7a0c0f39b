"""Pruning check of the Super Experts paper on the bundled model: does pruning the detected
Super Experts raise the held-out loss more than pruning as many random experts?

Calibrates on texts spread over data/sample.jsonl, evaluates next-token loss on other
texts of the same file, with `rs.prune_experts` for the Super Experts (or, when none is
flagged, the experts with the largest max |down_proj output|) and for random experts over
several seeds. Prints a table; `--json PATH` also writes the numbers (docs/super_experts.md).

    python scripts/pruning_check.py [--model data/model] [--data data/sample.jsonl]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import routescope as rs
from routescope.commands.inputs import bundled_corpus, bundled_model, read_texts
from routescope.commands.profile import load_model


def split_texts(texts: list[str], calibration: int, evaluation: int) -> tuple[list[str], list[str]]:
    """`calibration` texts spread evenly over the file (every domain), and `evaluation` others, also spread."""
    step = max(2, len(texts) // max(1, calibration))
    chosen = set(range(0, len(texts), step)[:calibration])
    rest = [t for i, t in enumerate(texts) if i not in chosen]
    return [texts[i] for i in sorted(chosen)], rest[:: max(1, len(rest) // max(1, evaluation))][:evaluation]


def held_out_loss(model, tokenizer, texts: list[str], batch_size: int, max_length: int) -> float:
    """Mean next-token cross-entropy over every real (non-padding) target token."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[i : i + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
            targets = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, 1:] == 0, -100)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total += float(loss)
            count += int((targets != -100).sum())
    return total / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: data/model)")
    parser.add_argument("--data", default=None, help="JSONL corpus (default: data/sample.jsonl)")
    parser.add_argument("--calibration", type=int, default=32, help="calibration texts")
    parser.add_argument("--evaluation", type=int, default=96, help="held-out evaluation texts")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=10, help="random-expert draws")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model or bundled_model())
    texts = [r.text for r in read_texts(args.data or bundled_corpus()) if r.text.strip()]
    calib, evaluation = split_texts(texts, args.calibration, args.evaluation)

    found = rs.find_super_experts(
        model, [calib[i : i + 8] for i in range(0, len(calib), 8)], tokenizer=tokenizer
    )
    supers = [
        (int(r.layer), "shared" if r.shared else int(r.expert)) for r in found[found["is_super"]].itertuples()
    ]
    n = max(1, len(supers))
    routed = found[~found["shared"]]
    top = [(int(r.layer), int(r.expert)) for r in routed.head(n).itertuples()]
    targets = {"super experts" if supers else f"top {n} by max |out| (none flagged)": supers or top}
    if supers and top != supers:
        targets[f"top {n} routed by max |out|"] = top

    bar = tqdm(total=1 + len(targets) + 2 * args.seeds, desc="evaluating", unit="eval")

    def loss_with(experts: list) -> float:
        with rs.prune_experts(model, experts):
            loss = held_out_loss(model, tokenizer, evaluation, args.batch_size, args.max_length)
        bar.update()
        return loss

    base = loss_with([])
    rows = [{"pruned": "nothing", "experts": [], "loss": base, "delta": 0.0}]
    for name, experts in targets.items():
        loss = loss_with(experts)
        rows.append({"pruned": name, "experts": experts, "loss": loss, "delta": loss - base})

    chosen = next(iter(targets.values()))
    pool_all = [(int(r.layer), int(r.expert)) for r in routed.itertuples()]
    layers = {layer for layer, _ in chosen}
    pools = {
        "random, any MoE layer": [e for e in pool_all if e not in chosen],
        "random, same layers": [e for e in pool_all if e[0] in layers and e not in chosen],
    }
    for name, pool in pools.items():
        deltas = []
        for seed in range(args.seeds):
            experts = random.Random(seed).sample(pool, min(n, len(pool)))
            deltas.append(loss_with(experts) - base)
        rows.append(
            {
                "pruned": f"{name} ({args.seeds} seeds)",
                "experts": n,
                "loss": base + statistics.mean(deltas),
                "delta": statistics.mean(deltas),
                "delta_std": statistics.stdev(deltas) if len(deltas) > 1 else 0.0,
                "delta_max": max(deltas),
            }
        )

    bar.close()
    eval_tokens = sum(
        min(len(tokenizer(t)["input_ids"]), args.max_length) - 1 for t in evaluation
    )  # targets per text
    summary = {
        "model": str(args.model or bundled_model()),
        "model_type": model.config.model_type,
        "num_hidden_layers": model.config.num_hidden_layers,
        "calibration_texts": len(calib),
        "calibration_tokens": found.attrs["tokens"],
        "evaluation_texts": len(evaluation),
        "evaluation_target_tokens": eval_tokens,
        "thresholds": found.attrs["thresholds"],
        "top_experts": found.head(8)[
            ["layer", "expert", "shared", "max_abs_output", "ratio_to_median", "is_super"]
        ]
        .astype({"max_abs_output": float, "ratio_to_median": float})
        .to_dict("records"),
        "hidden_stats": found.attrs["hidden_stats"],
        "results": rows,
        "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
    }
    print(f"held-out loss on {len(evaluation)} texts ({eval_tokens} target tokens), base {base:.4f}")
    for row in rows:
        extra = f" ± {row['delta_std']:.4f} (max {row['delta_max']:+.4f})" if "delta_std" in row else ""
        print(
            f"  {row['pruned']:<40} loss {row['loss']:.4f}  delta {row['delta']:+.4f}{extra}  {row['experts']}"
        )
    print("top experts:")
    for r in summary["top_experts"]:
        print(f"  {r}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=_json_default) + "\n", encoding="utf-8")
    return 0


def _json_default(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item"):
        return value.item()
    return str(value)


if __name__ == "__main__":
    raise SystemExit(main())

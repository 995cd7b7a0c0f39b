"""Compiled against eager recording: how far the recorded combine weights differ, and whether
the expert ids are equal (docs/capture.md, "Compiled models").

Records the bundled Qwen3-MoE on prompts of the bundled
corpus three ways, on this machine's CPU: eager `generate` (static cache), the same `generate`
with `compile_config` (transformers compiles the decode steps; on CPU only with
`CompileConfig._compile_all_devices = True`, see docs/capture.md), and a `torch.compile`d
forward of the same batch against an eager forward. Prints the largest |weight difference|
and the share of (token, layer, slot) rows whose expert differs.

    python benchmarks/compiled_weights.py [--prompts 8] [--new-tokens 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CompileConfig

import routescope as rs
from routescope import bundled

KEY = ["seq_id", "pos", "layer", "slot"]


def rows(path: Path):
    with rs.open_run(path) as run:
        return run.sql("SELECT seq_id, pos, layer, slot, expert, weight FROM routing ORDER BY ALL")


def compare(a: Path, b: Path) -> dict[str, float]:
    x, y = rows(a), rows(b)
    both = x.merge(y, on=KEY, suffixes=("_eager", "_compiled"))
    assert len(both) == len(x) == len(y), (len(x), len(y), len(both))
    same = both.expert_eager == both.expert_compiled
    diff = (both.weight_eager - both.weight_compiled).abs()[same]
    return {
        "rows": len(both),
        "expert_mismatch_share": float(1 - same.mean()),
        "max_abs_weight_diff": float(diff.max()),
        "mean_abs_weight_diff": float(diff.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(bundled.model_path())
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(bundled.model_path(), dtype=torch.float32).eval()
    texts = [
        json.loads(line)["text"] for line in bundled.corpus_path().read_text().splitlines()[: args.prompts]
    ]
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=32)
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    gen.update(pad_token_id=tokenizer.pad_token_id, cache_implementation="static")
    config = CompileConfig(fullgraph=True, mode="default")
    config._compile_all_devices = True  # without it transformers skips compiling on CPU
    out = Path(tempfile.mkdtemp())
    results = {}
    with torch.no_grad():
        with rs.record(model, out / "eager_gen"):
            model.generate(**enc, **gen)
        with rs.record(model, out / "compiled_gen"):
            model.generate(**enc, **gen, compile_config=config)
            assert "_compiled_call" in vars(model), "generate did not compile"
        del model._compiled_call
        results["generate(compile_config), decode steps"] = compare(out / "eager_gen", out / "compiled_gen")
        with rs.record(model, out / "eager_fwd"):
            model(**enc)
        compiled = torch.compile(model, fullgraph=True)
        with rs.record(compiled, out / "compiled_fwd"):
            compiled(**enc)
        results["torch.compile(model, fullgraph=True) forward"] = compare(
            out / "eager_fwd", out / "compiled_fwd"
        )
    print(f"torch {torch.__version__}, bundled Qwen3-MoE, {args.prompts} prompts, CPU, float32")
    for name, r in results.items():
        print(
            f"{name}: {r['rows']} routing rows, experts differ in {r['expert_mismatch_share']:.2%}, "
            f"max |weight diff| {r['max_abs_weight_diff']:.2e}, mean {r['mean_abs_weight_diff']:.2e}"
        )


if __name__ == "__main__":
    main()

"""Writes tests/data/sglang_rollout.jsonl: what an SGLang server with `return_routed_experts`
returns for two prompts to the bundled model (greedy, 6 new tokens), one /generate record per
line (`input_ids`, `output_ids`, `meta_info.routed_experts` as SGLang's base64 wire encoding of
the [prompt + output - 1, num_hidden_layers, top_k] ids). The routing comes from recording the
same generate with routescope (tests/test_importers_responses.py checks that this encoding
imports row for row). docs/replay.md's R3 snippet reads it (tests/test_doc_snippets.py).

    python tests/data/make_sglang_rollout.py
"""

from __future__ import annotations

import base64
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import routescope as rs

NEW = 6
OUT = Path(__file__).with_name("sglang_rollout.jsonl")


def main() -> None:
    path = rs.bundled.model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    config = model.config
    lines = []
    for i, text in enumerate(["def add(a, b):", "The capital of France is"]):
        prompt = tokenizer(text, return_tensors="pt")["input_ids"]
        run_dir = Path(tempfile.mkdtemp()) / "run"
        with torch.no_grad(), rs.record(model, run_dir):
            out = model.generate(input_ids=prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        ids = out[0].tolist()
        plen = prompt.shape[1]
        with rs.open_run(run_dir) as run:
            routing = run.sql("SELECT pos, layer, slot, expert FROM routing ORDER BY ALL")
        rows = np.zeros((len(ids) - 1, config.num_hidden_layers, config.num_experts_per_tok), dtype=np.uint8)
        rows[routing.pos, routing.layer, routing.slot] = routing.expert
        meta = {
            "id": f"rid-{i}",
            "routed_experts": base64.b64encode(rows.tobytes()).decode("utf-8"),
            "routed_experts_dtype": "uint8",
            "prompt_tokens": plen,
            "completion_tokens": len(ids) - plen,
        }
        lines.append(
            json.dumps({"text": "", "input_ids": ids[:plen], "output_ids": ids[plen:], "meta_info": meta})
        )
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

"""Suggested tests/moe_types.py: also the causal-LM model types that a MoE folder's
configuration defines under another name (aria_text, inkling_text, inkling2_text,
minimax_m3_vl_text), without the *_text twins of types already listed."""

from __future__ import annotations

from pathlib import Path

import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def installed_moe_types() -> list[str]:
    root = Path(transformers.__file__).parent / "models"
    found = set()
    for path in root.glob("*/modeling_*.py"):
        text = path.read_text(encoding="utf-8")
        if '"router_logits"' not in text and "@use_experts_implementation" not in text:
            continue
        folder = path.parent.name
        if folder in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            found.add(folder)
            continue
        configs = "".join(p.read_text(encoding="utf-8") for p in path.parent.glob("configuration_*.py"))
        found.update(
            t
            for t, cls in CONFIG_MAPPING_NAMES.items()
            if t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and f"class {cls}(" in configs
        )
    return sorted(found)

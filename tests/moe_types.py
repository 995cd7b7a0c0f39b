"""The MoE model types of the installed transformers that have a causal-LM class."""

from __future__ import annotations

from pathlib import Path

import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def installed_moe_types() -> list[str]:
    """Model types whose modeling code declares router logits or fused experts."""
    root = Path(transformers.__file__).parent / "models"
    found = set()
    for path in root.glob("*/modeling_*.py"):
        text = path.read_text(encoding="utf-8")
        if '"router_logits"' in text or "@use_experts_implementation" in text:
            found.add(path.parent.name)
    return sorted(t for t in found if t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)

"""Which decoder layers of a model are MoE, read from its config (config.json) alone.

Server responses carry one routing row per decoder layer, dense layers included (their rows
stay zero, and zero is also a valid expert id), so only the model config can say which
rows are routing. The server-response importers (`responses.py`) call `load_layout`. The
family rules are data (`DENSE_RULES`), one row per way a config marks its dense layers;
tests/test_importers_responses.py checks them against the layers `rs.record` finds on
tiny models of those families. No torch: a config file is plain JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routescope.importers.core.errors import ImportFormatError

ConfigDict = Mapping[str, Any]

# Routed experts per MoE layer and experts per token: the first key a config has wins.
EXPERT_KEYS = ("num_local_experts", "n_routed_experts", "num_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k")


def _sparse_step(c: ConfigDict, i: int) -> bool:
    """Qwen2/Qwen3-MoE, Flint, Kolibri: `mlp_only_layers` dense, else every `decoder_sparse_step`-th."""
    step = int(c.get("decoder_sparse_step") or 1)
    return i not in set(c.get("mlp_only_layers") or ()) and (i + 1) % step == 0


def _first_k_dense(c: ConfigDict, i: int) -> bool:
    """DeepSeek-V2/V3, dots1, GLM-4.5, Bailing: the first `first_k_dense_replace` layers are dense."""
    freq = int(c.get("moe_layer_freq") or 1)
    return i >= int(c["first_k_dense_replace"]) and i % freq == 0


def _num_dense(c: ConfigDict, i: int) -> bool:
    """LFM2-MoE: the first `num_dense_layers` layers are dense."""
    return i >= int(c["num_dense_layers"])


def _mlp_layer_types(c: ConfigDict, i: int) -> bool:
    """Kimi-Linear, Beam: `mlp_layer_types[i]` is 'sparse' or 'dense'."""
    return str(c["mlp_layer_types"][i]) in ("sparse", "moe")


def _block_types(c: ConfigDict, i: int) -> bool:
    """Nemotron-H: `layers_block_type[i]` is 'moe' for an MoE block."""
    return str(c["layers_block_type"][i]) == "moe"


def _expert_period(c: ConfigDict, i: int) -> bool:
    """Jamba: MoE where i % expert_layer_period == expert_layer_offset."""
    return i % int(c["expert_layer_period"]) == int(c.get("expert_layer_offset") or 0)


# (config key that selects the rule, is layer i MoE?) - the first row whose key is set applies;
# a config with none of these keys has every decoder layer MoE (Mixtral, OLMoE, GPT-OSS, ...).
DENSE_RULES: list[tuple[str, Callable[[ConfigDict, int], bool]]] = [
    ("mlp_layer_types", _mlp_layer_types),
    ("layers_block_type", _block_types),
    ("first_k_dense_replace", _first_k_dense),
    ("num_dense_layers", _num_dense),
    ("expert_layer_period", _expert_period),
    ("mlp_only_layers", _sparse_step),
    ("decoder_sparse_step", _sparse_step),
]


@dataclass(frozen=True)
class MoELayout:
    """What an importer needs from a model: decoder layers, the MoE ones, experts and top-k."""

    model_type: str
    num_hidden_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    rule: str = "every layer is MoE"


def load_layout(config: str | Path | Mapping[str, Any] | Any) -> MoELayout:
    """The MoE layout of `config`: a config.json path, a model folder holding one, a dict, or a
    transformers PretrainedConfig (anything with `to_dict()`). Multimodal configs use their
    `text_config`. ValueError / FileNotFoundError naming what is missing."""
    data, where = _config_dict(config)
    text = data.get("text_config") if isinstance(data.get("text_config"), Mapping) else None
    c: dict[str, Any] = {**data, **text} if text else dict(data)
    layers = c.get("num_hidden_layers")
    if layers is None and isinstance(c.get("layers_block_type"), list):
        layers = len(c["layers_block_type"])  # Nemotron-H derives the count from the block list
    experts = next((c[k] for k in EXPERT_KEYS if c.get(k)), None)
    top_k = next((c[k] for k in TOP_K_KEYS if c.get(k)), None)
    missing = [
        name
        for name, value in (("num_hidden_layers", layers), ("expert count", experts), ("top-k", top_k))
        if not isinstance(value, int) or isinstance(value, bool) or value < 1
    ]
    if missing:
        raise ImportFormatError(
            f"{where}: no {', '.join(missing)} in the model config (looked for num_hidden_layers, "
            f"{' / '.join(EXPERT_KEYS)}, {' / '.join(TOP_K_KEYS)}); is it an MoE model's config.json?"
        )
    rule_name, is_moe = "every layer is MoE", None
    for key, rule in DENSE_RULES:
        if c.get(key) is not None:
            rule_name, is_moe = key, rule
            break
    try:
        moe = tuple(i for i in range(layers) if is_moe is None or is_moe(c, i))
    except (IndexError, KeyError, TypeError, ValueError) as exc:
        raise ImportFormatError(f"{where}: cannot read the MoE layers from {rule_name!r}: {exc}") from None
    if not moe:
        raise ImportFormatError(f"{where}: {rule_name!r} leaves no MoE layer among {layers} layers")
    return MoELayout(str(c.get("model_type") or ""), int(layers), moe, int(experts), int(top_k), rule_name)


def _config_dict(config: Any) -> tuple[dict[str, Any], str]:
    if isinstance(config, Mapping):
        return dict(config), "the model config"
    if hasattr(config, "to_dict"):
        return dict(config.to_dict()), f"{type(config).__name__}"
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"--model {config}: no such config.json or model folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ImportFormatError(f"--model {path}: not a JSON config ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise ImportFormatError(f"--model {path}: a config.json holds one JSON object")
    return data, str(path)

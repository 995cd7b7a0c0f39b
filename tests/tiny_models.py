"""Tiny configs for every MoE model type the tests use: hidden 32, 2-4 layers, 4-8 experts.

Most fields are shared; TINY_OVERRIDES holds what a family needs on top (hybrids need an
attention layer, DeepSeek-style routers need group sizes that divide the expert count).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

COMMON: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=128,
    num_local_experts=4,
    num_experts=4,
    n_routed_experts=4,
    moe_num_experts=4,
    num_experts_per_tok=2,
    moe_k=2,
    max_position_embeddings=256,
    shared_expert_intermediate_size=32,
    sliding_window=64,
    pad_token_id=0,
)

TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0),
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"]),
    "qwen3_5_moe": dict(layer_types=["linear_attention", "full_attention"]),
    "qwen4_exp": dict(layer_types=["linear_attention", "full_attention"]),
    "deepseek_v3": dict(
        num_hidden_layers=3,
        first_k_dense_replace=1,
        n_routed_experts=8,
        n_group=2,
        topk_group=1,
        n_shared_experts=1,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        num_key_value_heads=4,
    ),
}


def tiny_config(model_type: str, **overrides: Any):
    values = {**COMMON, **TINY_OVERRIDES.get(model_type, {}), **overrides}
    defaults = AutoConfig.for_model(model_type).to_dict()
    # Pass top-level fields to the constructor so derived fields (layer_types, ...) follow.
    config = AutoConfig.for_model(model_type, **{k: v for k, v in values.items() if k in defaults})
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key, value in values.items():
        if hasattr(text, key):
            try:
                setattr(text, key, value)
            except Exception:
                pass
    return config


def build_tiny_model(model_type: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    return model.eval()

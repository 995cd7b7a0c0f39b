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

# Multi-head latent attention (DeepSeek V2/V3 family): low ranks, q/k/v heads of 8.
MLA: dict[str, Any] = dict(
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    num_key_value_heads=4,
)
# Group-limited routers: 8 experts in 2 groups, tokens pick 1 group.
GROUPED: dict[str, Any] = dict(n_routed_experts=8, n_group=2, topk_group=1)
# Models whose first layers are dense: 3 layers, so that 2 are MoE.
DENSE_FIRST: dict[str, Any] = dict(num_hidden_layers=3, first_k_dense_replace=1)
# DeepSeek sparse attention's token indexer.
INDEXER: dict[str, Any] = dict(index_head_dim=8, index_n_heads=2)

TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    # lm_head has `unpadded_vocab_size` outputs; the default end-of-text id lies outside
    # a tiny vocabulary
    # its config refuses a head_dim that NVFP4 key/value rounding cannot use (5.25)
    "kolibri1_1": dict(
        head_dim=16,
        index_num_heads=2,
        num_hidden_layers=3,
        mlp_only_layers=[0],
        mlp_only_intermediate_size=64,
    ),
    "inkling2_text": dict(unpadded_vocab_size=128, eos_token_id=1),
    "inkling2_loop_text": dict(unpadded_vocab_size=128, eos_token_id=1),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0),
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"]),
    "qwen3_5_moe": dict(layer_types=["linear_attention", "full_attention"]),
    "deepseek_v3": dict(**DENSE_FIRST, **GROUPED, n_shared_experts=1, **MLA),
    "deepseek_v2": dict(**MLA),
    "deepseek_v32": dict(**DENSE_FIRST, **GROUPED, **MLA, **INDEXER),
    "glm_moe_dsa": dict(**DENSE_FIRST, **MLA, **INDEXER),
    "glm4_moe_lite": dict(num_hidden_layers=3, **MLA),
    "axk1": dict(num_hidden_layers=3, **GROUPED, **MLA),
    "axk2": dict(num_hidden_layers=3, **MLA, **INDEXER),
    "hy_v4": dict(num_hidden_layers=3, **MLA, **INDEXER),
    "kimi_linear": dict(
        num_hidden_layers=3,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        mlp_layer_types=["dense", "sparse", "sparse"],
        linear_head_dim=8,
        linear_num_heads=4,
        **MLA,
    ),
    "bailing_hybrid": dict(
        **DENSE_FIRST,
        **GROUPED,
        num_local_experts=8,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        **MLA,
    ),
    "longcat_flash": dict(
        num_layers=2,  # each layer holds two attention blocks and one MoE
        ffn_hidden_size=64,
        expert_ffn_hidden_size=32,
        moe_topk=2,
        zero_expert_num=2,  # identity experts: ids 4 and 5
        **MLA,
    ),
    "dots1": dict(**DENSE_FIRST, **GROUPED, n_shared_experts=1),
    "beam": dict(
        num_hidden_layers=3,
        mlp_layer_types=["dense", "sparse", "sparse"],
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        num_experts=8,
        n_group=2,
        topk_group=1,
    ),
    "flint": dict(num_hidden_layers=3, mlp_only_layers=[0]),
    "afmoe": dict(num_hidden_layers=3),
    "exaone_moe": dict(num_hidden_layers=3),
    "hy_v3": dict(num_hidden_layers=3),
    "laguna": dict(num_hidden_layers=3),
    "mimo_v2_flash": dict(num_hidden_layers=3),
    "nemotron_h": dict(
        num_hidden_layers=4,
        layers_block_type=["linear_attention", "moe", "full_attention", "moe"],
        mamba_num_heads=4,
        mamba_head_dim=8,
        n_groups=1,
        ssm_state_size=16,
    ),
    "lfm2_moe": dict(num_hidden_layers=3, num_dense_layers=1, layer_types=["conv", "full_attention", "conv"]),
    "granitemoehybrid": dict(
        layer_types=["linear_attention", "full_attention"],
        mamba_n_heads=4,
        mamba_d_head=16,  # mamba_expand (2) * hidden_size / mamba_n_heads
        mamba_d_state=16,
    ),
    "qwen4_exp": dict(
        layer_types=["linear_attention", "indexed_attention"],
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        hc_lowrank=8,
        indexer_n_heads=2,
        indexer_kv_heads=1,
        indexer_head_dim=8,
        indexer_budget=8,
        indexer_compress_ratio=2,
    ),
    "zaya": dict(num_experts_per_tok=1, router_hidden_size=16),  # ZAYA routes to one expert only
    # text model of step3p7 (no causal-LM class): its first layers are dense, so 2 layers
    # keep one MoE layer only when the list says so
    "step3p5": dict(mlp_layer_types=["dense", "sparse"]),
    # image-text-to-text types whose config is a plain text config (mistral4) or whose text
    # model is DeepSeek-V3-style (mistral_large4): MLA; mistral4 derives head_dim = nope + rope
    "mistral4": dict(**MLA, head_dim=16),
    "mistral_large4_text": dict(**MLA),
    "deepseek_ocr2_text": dict(mlp_layer_types=["dense", "sparse"]),  # no default when built tiny
    # text model of ernie4_5_vl_moe: text and vision experts of their own sizes; its rope
    # splits head_dim 8 into 1 + 1 (height, width) and 2 (time) frequencies
    "ernie4_5_vl_moe_text": dict(
        moe_intermediate_size=[32, 32],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
    ),
    # text model of glm5_next: MLA without RoPE (its sparse-attention layers are NoPE), a
    # linear-attention layer then an indexed one, and query heads = key-value heads (MLA's 4)
    "glm5_next_text": dict(
        **{**MLA, "qk_rope_head_dim": 0},
        **INDEXER,
        mlp_layer_types=["dense", "sparse"],
        layer_types=["linear_attention", "full_attention"],
        linear_head_dim=8,
        linear_num_heads=4,
    ),
    "jetmoe": dict(kv_channels=8),
    "doge": dict(is_moe=True, num_experts=16, keep_window_size=64),  # product keys: 4 x 4
    "dbrx": dict(
        d_model=32,
        n_heads=4,
        n_layers=2,
        max_seq_len=256,
        # DbrxAttention reads rope_theta from attn_config (which does not declare it) and
        # clamps with clip_qkv even when it is None; the released model sets both
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2),
    ),
    # Per-layer configs: the text config is given whole (the shared fields do not apply).
    "dots3_note": dict(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=32,
            shared_experts_intermediate_size=32,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            num_attention_heads=4,
            head_dim=16,
            use_sliding_window=False,
            vocab_size=128,
            max_position_embeddings=256,
            num_experts_per_tok=2,
            n_shared_experts=1,
            pad_token_id=0,
            **GROUPED,
            **MLA,
            **INDEXER,
        ),
        vision_config=dict(adapter_out_dim=32),
        audio_config=dict(adapter_out_dim=32),
    ),
    "gemma4": dict(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            layer_types=["sliding_attention", "full_attention"],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            global_head_dim=8,
            vocab_size=128,
            vocab_size_per_layer_input=128,
            hidden_size_per_layer_input=8,
            max_position_embeddings=256,
            sliding_window=64,
            enable_moe_block=True,
            num_experts=4,
            top_k_experts=2,
            pad_token_id=0,
        ),
        vision_config=None,
        audio_config=None,
    ),
}


def tiny_config(model_type: str, **overrides: Any):
    values = {**COMMON, **TINY_OVERRIDES.get(model_type, {}), **overrides}
    defaults = AutoConfig.for_model(model_type).to_dict()
    # Pass top-level fields to the constructor so derived fields (layer_types, ...) follow.
    config = AutoConfig.for_model(model_type, **{k: v for k, v in values.items() if k in defaults})
    if isinstance(values.get("text_config"), dict):
        return config  # a complete text config was given: the shared fields stay out of it
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key, value in values.items():
        if isinstance(value, dict):
            continue  # sub-configs (DBRX's attn_config, ...) were passed to the constructor
        try:
            if hasattr(text, key):
                setattr(text, key, value)
        except Exception:
            pass  # read-only or per-layer fields: the constructor's value stays
    return config


def build_tiny_model(model_type: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    return model.eval()


# -- encoder-decoder and multimodal MoE models (issue 19) ---------------------------------
# Built with their own Auto classes: they have no AutoModelForCausalLM class.

SEQ2SEQ: dict[str, dict[str, Any]] = {
    # MoE in block 1 of each stack (sparse step 2): layers 1 (encoder) and 3 (decoder)
    "switch_transformers": dict(
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_heads=4,
        num_layers=2,
        num_decoder_layers=2,
        num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1,
        num_experts=4,
        vocab_size=128,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    ),
    "nllb-moe": dict(
        d_model=32,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        num_experts=4,
        encoder_sparse_step=2,
        decoder_sparse_step=2,
        vocab_size=128,
        max_position_embeddings=256,
        decoder_start_token_id=2,
        pad_token_id=1,
        eos_token_id=3,
    ),
}

# Placeholder and marker ids of the tiny multimodal models (inside the 128-token vocabulary).
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 120, 121, 122, 123
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
# A one-block vision tower: 4x4-pixel patches, 2 frames per temporal patch, 2x2 merge, so an
# image of grid (1, 4, 4) is 16 patches and 4 placeholder tokens.
_VISION = dict(
    depth=1,
    hidden_size=32,
    intermediate_size=64,
    num_heads=4,
    patch_size=4,
    temporal_patch_size=2,
    spatial_merge_size=2,
    out_hidden_size=32,
)

_VL_TEXT = {
    key: COMMON[key]
    for key in (
        *("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers"),
        *(
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "pad_token_id",
        ),
    )
}

VISION_LANGUAGE: dict[str, dict[str, Any]] = {
    "qwen3_vl_moe": dict(
        text_config=dict(
            **_VL_TEXT,
            num_experts=4,
            num_experts_per_tok=2,
            rope_parameters={**_MROPE, "mrope_interleaved": True},
        ),
        vision_config=dict(**_VISION, num_position_embeddings=16, deepstack_visual_indexes=[0]),
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    ),
    "glm4v_moe": dict(
        text_config=dict(
            **_VL_TEXT,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,  # layer 0 dense, layer 1 MoE
            rope_parameters={**_MROPE, "partial_rotary_factor": 1.0},
        ),
        vision_config=dict(**_VISION, image_size=16),
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        image_start_token_id=VISION_START,
        image_end_token_id=VISION_END,
        video_start_token_id=124,
        video_end_token_id=125,
    ),
}


def build_tiny_seq2seq_model(model_type: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    from transformers import AutoModelForSeq2SeqLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**SEQ2SEQ[model_type], **overrides})
    return AutoModelForSeq2SeqLM.from_config(config).eval()


def build_tiny_vision_language_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    return build_tiny_multimodal_model(model_type, seed)


# Other multimodal MoE types: their text config is the tiny one of the text model type, and
# every sub-config (vision, audio, projector) is shrunk by the common size keys below. The
# vision tower is built but not run: coverage feeds these models text only.
_SUB_CONFIG_SIZES: dict[str, int] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    depth=1,
    num_layers=1,
    num_heads=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    out_hidden_size=32,
    projection_dim=32,
    text_hidden_size=32,
    output_dim=32,
    embed_dim=32,
    d_model=32,
    encoder_layers=1,
    decoder_layers=1,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
)


def _match_layer_lists(config: dict[str, Any], layers_before: Any = None) -> dict[str, Any]:
    """Per-layer lists follow num_hidden_layers: the named ones, and (for a shrunk sub-config)
    every list that had one entry per layer before (per-stage patch sizes, depths, ...)."""
    layers = config.get("num_hidden_layers")
    if not isinstance(layers, int):
        return config
    for key, value in config.items():
        if not isinstance(value, list):
            continue
        per_layer = key in ("layer_types", "mlp_layer_types") or (
            isinstance(layers_before, int) and layers_before > layers and len(value) == layers_before
        )
        if per_layer:
            config[key] = value[:layers]
    return config


def _shrink(config: dict[str, Any]) -> dict[str, Any]:
    layers_before = config.get("num_hidden_layers")
    for key, value in list(config.items()):
        if isinstance(value, dict) and key.endswith("config"):
            _shrink(value)
        elif key in _SUB_CONFIG_SIZES and isinstance(value, int) and not isinstance(value, bool):
            config[key] = _SUB_CONFIG_SIZES[key]
    return _match_layer_lists(config, layers_before)


def tiny_multimodal_config(model_type: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type in VISION_LANGUAGE:
        return AutoConfig.for_model(model_type, **VISION_LANGUAGE[model_type])
    values = AutoConfig.for_model(model_type).to_dict()
    if not any(isinstance(v, dict) and k.endswith("config") for k, v in values.items()):
        return tiny_config(model_type)  # one text config (mistral4): the causal-LM tiny config
    text_type = values.get("text_config", {}).get("model_type")
    for key, value in list(values.items()):
        if not (isinstance(value, dict) and key.endswith("config")):
            continue
        if key == "text_config" and text_type in CONFIG_MAPPING_NAMES and text_type != model_type:
            values[key] = tiny_config(text_type).to_dict()
        else:
            values[key] = _shrink(value)
    values.pop("model_type", None)
    return AutoConfig.for_model(model_type, **values)


def build_tiny_multimodal_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A multimodal MoE model from its tiny config, by its image-text-to-text class (or its
    multimodal-LM class when it has no image-text-to-text one)."""
    from transformers import AutoModelForImageTextToText, AutoModelForMultimodalLM

    config = tiny_multimodal_config(model_type)
    torch.manual_seed(seed)
    try:
        model = AutoModelForImageTextToText.from_config(config)
    except ValueError:
        model = AutoModelForMultimodalLM.from_config(config)
    return model.eval()

"""Find the routers of a transformers MoE model: which module, which decoder layer, E and k.

Reads the adapter table (`adapters.py`) and the model's own `_can_record_outputs`
declaration; the recorder calls `find_routers` once when recording starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from routescope.capture.adapters import ADAPTERS, Adapter, match_adapter
from routescope.errors import UnsupportedModelError

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block)\.(\d+)(?:\.|$)")
_TOP_K_KEYS = ("num_experts_per_tok", "moe_k", "top_k", "num_experts_per_token", "moe_top_k", "top_k_experts")
_NUM_EXPERTS_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@dataclass
class RouterSite:
    """One MoE layer's capture point."""

    layer: int
    name: str
    module: nn.Module
    adapter: Adapter
    num_experts: int
    top_k: int
    stack: str = "decoder"  # "encoder" or "decoder" (an encoder-decoder model has both)


@dataclass
class LogitsSite:
    """Where a layer's router logits appear (for the optional router statistics)."""

    layer: int
    name: str
    module: nn.Module
    index: int


@dataclass
class Stack:
    """A module whose forward is one recorded step: the model itself, or for an
    encoder-decoder model its encoder and its decoder (generate runs the encoder alone)."""

    name: str  # "encoder" or "decoder"
    module: nn.Module
    first_layer: int  # added to the block index: decoder block i is num_encoder_layers + i


def find_stacks(model: nn.Module) -> list[Stack]:
    """[encoder, decoder] for an encoder-decoder model, else [the model as one decoder]."""
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return [Stack("decoder", model, 0)]
    encoder, decoder = model.get_encoder(), model.get_decoder()
    if encoder is None or decoder is None or encoder is model or decoder is model:
        raise UnsupportedModelError(
            f"{type(model).__name__} is an encoder-decoder model, but its encoder and decoder "
            "modules were not found (get_encoder() / get_decoder())"
        )
    return [Stack("encoder", encoder, 0), Stack("decoder", decoder, num_blocks(encoder))]


def stack_layers(model: nn.Module) -> dict[str, list[int]]:
    """{stack: [first layer, end]} of an encoder-decoder model (the manifest's `stacks`);
    empty for a decoder-only model, whose layers are its decoder layers."""
    stacks = find_stacks(model)
    if len(stacks) == 1:
        return {}
    return {s.name: [s.first_layer, s.first_layer + num_blocks(s.module)] for s in stacks}


def num_blocks(stack: nn.Module) -> int:
    """Blocks of a transformer stack: the length of its block list ('layers' or 'block')."""
    for attr in ("layers", "block", "blocks"):
        blocks = getattr(stack, attr, None)
        if isinstance(blocks, nn.ModuleList):
            return len(blocks)
    raise UnsupportedModelError(f"cannot count the blocks of {type(stack).__name__}")


def _stack_prefixes(model: nn.Module, stacks: list[Stack]) -> list[tuple[str, Stack]]:
    """(module path + '.', stack) per stack; a decoder-only model's one stack matches every path."""
    if len(stacks) == 1:
        return [("", stacks[0])]
    paths = {id(module): name for name, module in model.named_modules()}
    return [(paths[id(stack.module)] + ".", stack) for stack in stacks if id(stack.module) in paths]


def _stack_of(prefixes: list[tuple[str, Stack]], name: str) -> Stack | None:
    return next((stack for prefix, stack in prefixes if name.startswith(prefix)), None)


def layer_of(name: str) -> int | None:
    """Decoder-layer index from a module path such as 'model.layers.3.mlp.experts'."""
    found = _LAYER_RE.findall(name)
    return int(found[0]) if found else None


def layer_list_of(name: str) -> str:
    """The block list a module path indexes: 'model.language_model.layers' for
    'model.language_model.layers.3.mlp.experts'."""
    found = _LAYER_RE.search(name)
    return name[: found.end(0)].rstrip(".").rsplit(".", 1)[0] if found else ""


def text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        return None
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _config_int(config: Any, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = getattr(config, key, None) if config is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def _parent(model: nn.Module, name: str) -> nn.Module | None:
    if "." not in name:
        return None
    return model.get_submodule(name.rsplit(".", 1)[0])


def _module_int(modules: list[nn.Module | None], attrs: tuple[str, ...]) -> int | None:
    for module in modules:
        for attr in attrs:
            value = getattr(module, attr, None) if module is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def _site_sizes(
    model: nn.Module, name: str, module: nn.Module, adapter: Adapter
) -> tuple[int | None, int | None]:
    parent = _parent(model, name)
    siblings = [getattr(parent, n, None) for n in ("gate", "router")] if parent is not None else []
    config = text_config(model)
    attrs = (adapter.num_experts_attr,) if adapter.num_experts_attr else ()
    num_experts = _module_int([module], attrs) or _module_int(
        [module, parent, *siblings], ("num_experts", "num_local_experts")
    )
    if num_experts is None:
        weight = getattr(module, "gate_up_proj", None)
        if weight is None:
            weight = getattr(module, "down_proj", None)
        num_experts = int(weight.shape[0]) if getattr(weight, "dim", lambda: 0)() == 3 else None
    num_experts = (num_experts or _config_int(config, _NUM_EXPERTS_KEYS) or 0) * adapter.expert_sets or None
    top_k = (
        adapter.top_k
        or _module_int([module, *siblings, parent], ("top_k", "num_experts_per_tok"))
        or _config_int(config, _TOP_K_KEYS)
    )
    return num_experts, top_k


def find_routers(model: nn.Module) -> list[RouterSite]:
    """One RouterSite per MoE layer, sorted by layer; UnsupportedModelError if none.

    In an encoder-decoder model the encoder's blocks keep their indices and decoder block i
    is layer `num_encoder_layers + i`, so the two stacks never share a layer number."""
    rank = {adapter.name: i for i, adapter in enumerate(ADAPTERS)}
    prefixes = _stack_prefixes(model, find_stacks(model))
    best: dict[int, RouterSite] = {}
    lists: dict[str, set[str]] = {}  # stack -> block lists holding routers
    for name, module in model.named_modules():
        adapter = match_adapter(module)
        if adapter is None:
            continue
        layer, stack = layer_of(name), _stack_of(prefixes, name)
        if layer is None or stack is None:
            continue
        lists.setdefault(stack.name, set()).add(layer_list_of(name))
        layer += stack.first_layer
        if layer in best and rank[best[layer].adapter.name] <= rank[adapter.name]:
            continue
        num_experts, top_k = _site_sizes(model, name, module, adapter)
        if not num_experts or not top_k:
            raise UnsupportedModelError(
                f"found a router at {name} ({type(module).__name__}) but could not tell its "
                f"number of experts ({num_experts}) or top-k ({top_k})"
            )
        best[layer] = RouterSite(layer, name, module, adapter, num_experts, top_k, stack.name)
    model_type = getattr(text_config(model), "model_type", type(model).__name__)
    for found in lists.values():
        if len(found) > 1:
            # e.g. a vision tower with experts, or an omni model's thinker and talker: their
            # block indices would share layer numbers
            raise UnsupportedModelError(
                f"model type {model_type!r} has routers in more than one block list ({', '.join(sorted(found))}); "
                "routescope numbers layers by block index, so they would share layer numbers "
                "(see docs/models.md, multimodal models)"
            )
    if not best:
        raise UnsupportedModelError(
            f"no MoE router found in model type {model_type!r} ({type(model).__name__}); "
            "routescope supports transformers MoE models, see docs/models.md"
        )
    return [best[layer] for layer in sorted(best)]


def find_logits_sites(model: nn.Module, layers: list[int]) -> list[LogitsSite]:
    """Router-logit outputs declared by `_can_record_outputs['router_logits']`: the model's,
    or in an encoder-decoder model each stack's own (numbered as in `find_routers`)."""
    sites: dict[int, LogitsSite] = {}
    for stack in find_stacks(model):
        spec = (getattr(stack.module, "_can_record_outputs", None) or {}).get("router_logits")
        target = getattr(spec, "target_class", None)
        if target is None:
            continue
        index = getattr(spec, "index", 0) or 0
        layer_name = getattr(spec, "layer_name", None)
        for name, module in stack.module.named_modules():
            if not isinstance(module, target) or (layer_name and not name.endswith(layer_name)):
                continue
            layer = layer_of(name)
            if layer is None:
                continue
            layer += stack.first_layer
            if layer in layers and layer not in sites:
                sites[layer] = LogitsSite(layer, name, module, index)
    return [sites[layer] for layer in sorted(sites)]

"""Which experts a MoE model has: per MoE layer its fused routed-experts module and its shared experts.

`find_expert_sites` builds on the router discovery (`capture/discovery.py`); the Super Expert
calibration (`capture/calibration/activations.py`) and `rs.prune_experts` (`capture/control/pruning.py`) use it.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from routescope.capture.discovery import RouterSite, find_routers
from routescope.errors import UnsupportedModelError

# Attribute names of a MoE block that hold its shared expert(s): an MLP, or a ModuleList of them.
SHARED_EXPERT_NAMES = ("shared_expert", "shared_experts")
# Where the fused experts module sits in a MoE block whose router is a separate module.
EXPERTS_NAMES = ("experts",)
_DECODER_LAYER_RE = re.compile(r"^(.*?(?:^|\.)(?:layers|h|blocks|block))\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class ExpertsLayout:
    """How a fused experts module stores its weights (transformers' use_experts_implementation flags)."""

    transposed: bool
    has_bias: bool
    has_gate: bool

    @classmethod
    def of(cls, module: nn.Module) -> ExpertsLayout:
        has_gate = bool(getattr(module, "has_gate", hasattr(module, "gate_up_proj")))
        transposed = getattr(module, "is_transposed", None)
        if transposed is None:  # an undecorated module: [E, out, in] unless the shapes say otherwise
            down = module.down_proj
            transposed = down.shape[1] != down.shape[2] and down.shape[2] == _hidden_of(module)
        has_bias = getattr(module, "has_bias", None)
        if has_bias is None:
            has_bias = getattr(module, "down_proj_bias", None) is not None
        return cls(bool(transposed), bool(has_bias), has_gate)


@dataclass
class SharedExpert:
    index: int  # 0.. within its layer's shared experts
    name: str  # module path of the shared expert
    output: nn.Module  # the module whose output is its down-projection (down_proj, or the MLP itself)


@dataclass
class ExpertSite:
    """One MoE layer: its routed experts (fused module) and shared experts."""

    layer: int
    router: RouterSite
    experts: nn.Module
    experts_name: str
    num_experts: int
    layout: ExpertsLayout
    shared: list[SharedExpert] = field(default_factory=list)


def _hidden_of(module: nn.Module) -> int | None:
    for attr in ("hidden_dim", "hidden_size"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return None


def _is_3d(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 3


def is_recomputable_experts(module: nn.Module) -> bool:
    """3-D expert weights and a forward(hidden_states, top_k_index, top_k_weights) signature."""
    up = getattr(module, "gate_up_proj", None)
    if up is None:
        up = getattr(module, "up_proj", None)
    if not (_is_3d(getattr(module, "down_proj", None)) and _is_3d(up)):
        return False
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return False
    return len(params) >= 3


def _block_of(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    return parent, model.get_submodule(parent)


def _find_experts(model: nn.Module, site: RouterSite) -> tuple[str, nn.Module]:
    if is_recomputable_experts(site.module):
        return site.name, site.module
    block_name, block = _block_of(model, site.name)
    for attr in EXPERTS_NAMES:
        module = getattr(block, attr, None)
        if isinstance(module, nn.Module) and is_recomputable_experts(module):
            return f"{block_name}.{attr}", module
    raise UnsupportedModelError(
        f"the routed experts of layer {site.layer} (router {site.name}, {type(site.module).__name__}) are not "
        "a fused experts module with 3-D gate_up_proj/down_proj called as (hidden_states, top_k_index, "
        "top_k_weights); Super Expert calibration cannot recompute them (see docs/super_experts.md)"
    )


def _find_shared(block_name: str, block: nn.Module) -> list[SharedExpert]:
    found: list[SharedExpert] = []
    for attr in SHARED_EXPERT_NAMES:
        module = getattr(block, attr, None)
        if not isinstance(module, nn.Module):
            continue
        members = list(module) if isinstance(module, nn.ModuleList) else [module]
        for i, member in enumerate(members):
            name = f"{block_name}.{attr}" + (f".{i}" if isinstance(module, nn.ModuleList) else "")
            down = getattr(member, "down_proj", None)
            output = down if isinstance(down, nn.Module) else member
            found.append(SharedExpert(len(found), name, output))
    return found


def find_expert_sites(model: nn.Module) -> list[ExpertSite]:
    """Every MoE layer's routed and shared experts; UnsupportedModelError for dense models."""
    sites = []
    for router in find_routers(model):
        experts_name, experts = _find_experts(model, router)
        block_name, block = _block_of(model, experts_name)
        num_experts = int(experts.down_proj.shape[0])
        layout = ExpertsLayout.of(experts)
        sites.append(
            ExpertSite(
                router.layer,
                router,
                experts,
                experts_name,
                num_experts,
                layout,
                _find_shared(block_name, block),
            )
        )
    return sites


def decoder_layers(model: nn.Module, sites: list[ExpertSite]) -> list[tuple[int, nn.Module]]:
    """(index, module) of each decoder layer: the ModuleList that holds the MoE layers."""
    match = _DECODER_LAYER_RE.match(sites[0].experts_name)
    if match is None:
        return []
    container = model.get_submodule(match.group(1))
    return [(int(name), module) for name, module in container.named_children() if name.isdigit()]

"""Expert pruning for the Super Expert check: zero chosen experts' down-projections, then restore.

`rs.prune_experts(model, [(layer, expert), ...])` is a context manager. Inside the block the
experts' down-projection weights (and biases) are zero, as the Super Experts paper's code
prunes them; on exit (also on an exception) the saved values are copied back bit for bit.
It shares expert discovery with the calibration (`capture/experts.py`, `find_expert_sites`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from routescope.capture.experts import ExpertSite, find_expert_sites

SHARED = "shared"  # (layer, "shared"): every shared expert of that layer


def _targets(model: nn.Module, experts: Iterable[Any]) -> list[torch.Tensor]:
    """The tensor slices to zero, one per (parameter, expert); ValueError before touching anything."""
    sites = {site.layer: site for site in find_expert_sites(model)}
    valid = ", ".join(
        f"{layer}: experts 0..{s.num_experts - 1}{_shared_note(s)}" for layer, s in sites.items()
    )
    slices: list[torch.Tensor] = []
    for item in experts:
        try:
            layer, expert = item
        except (TypeError, ValueError):
            raise ValueError(
                f"prune_experts takes (layer, expert) pairs, got {item!r}; valid: {valid}"
            ) from None
        site = sites.get(layer) if isinstance(layer, int) else None
        if site is None:
            raise ValueError(f"layer {layer!r} is not a MoE layer; valid (layer: experts) are {valid}")
        if expert == SHARED:
            if not site.shared:
                raise ValueError(f"layer {layer} has no shared expert; valid (layer: experts) are {valid}")
            slices += [p for shared in site.shared for p in _shared_params(shared.output, shared.name)]
        elif isinstance(expert, int) and not isinstance(expert, bool) and 0 <= expert < site.num_experts:
            slices += _routed_slices(site, expert)
        else:
            raise ValueError(f"layer {layer} has no expert {expert!r}; valid (layer: experts) are {valid}")
    return slices


def _shared_note(site: ExpertSite) -> str:
    return ' or "shared"' if site.shared else ""


def _routed_slices(site: ExpertSite, expert: int) -> list[torch.Tensor]:
    slices = [site.experts.down_proj.data[expert]]
    bias = getattr(site.experts, "down_proj_bias", None) if site.layout.has_bias else None
    if bias is not None:
        slices.append(bias.data[expert])
    return slices


def _shared_params(module: nn.Module, name: str) -> list[torch.Tensor]:
    if not isinstance(module, nn.Linear):
        raise ValueError(f"shared expert {name} has no down_proj Linear to prune")
    return [p.data for p in (module.weight, module.bias) if p is not None]


@contextmanager
def prune_experts(model: nn.Module, experts: Iterable[Any]) -> Iterator[nn.Module]:
    """Zero the down-projections of `experts` ((layer, expert id) or (layer, "shared")) in the block.

    Yields the model. Unknown layers or experts raise ValueError naming the valid ones, and
    the model is left unchanged; on exit every zeroed value is restored exactly.
    """
    slices = _targets(model, list(experts))
    saved = [s.clone() for s in slices]
    try:
        with torch.no_grad():
            for s in slices:
                s.zero_()
        yield model
    finally:
        with torch.no_grad():
            for s, original in zip(slices, saved):
                s.copy_(original)

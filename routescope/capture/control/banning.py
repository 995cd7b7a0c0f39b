"""rs.ban_experts: counterfactual forwards in which some experts cannot be chosen.

Each choice of a banned expert moves to the token's next-best allowed expert (by the
router's own logits, among the experts it has not chosen), and the combine weights come
from the family's weight rule (`adapters.WEIGHT_RULES`), so a renormalising router
renormalises over the new choice. Tokens with no banned choice keep their routing exactly.
It uses the forcing hook of `rs.replay` (`forcing.py`); docs/replay.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from routescope.capture.adapters import WeightRule
from routescope.capture.control.forcing import (
    check_forceable,
    find_weight_rule,
    force_decision,
    logits_of,
    require_logits_sites,
)
from routescope.capture.discovery import LogitsSite, RouterSite, find_routers
from routescope.errors import RouteScopeError


@contextmanager
def ban_experts(model: nn.Module, experts: Mapping[int, Iterable[int]]) -> Iterator[nn.Module]:
    """Inside the block, `model` never routes to `experts` ({layer: [expert ids]}).

    Each banned choice goes to the token's next-best allowed expert; the weights are the
    router's own for the new choice, normalised as the family does (gradients flow). Yields
    the model. Bad layers or experts raise ValueError naming the valid ones; router kinds
    whose choice is not an experts call raise RouteScopeError. `rs.record` inside the block
    records the rerouted choice; `rs.prune_experts` combines with it. Hooks are removed on
    exit, also on an exception.
    """
    sites = find_routers(model)
    banned = _check_banned(sites, experts)
    chosen_sites = [site for site in sites if site.layer in banned]
    check_forceable(chosen_sites, "ban_experts")
    logits_sites = require_logits_sites(model, chosen_sites, "ban_experts")
    state = _BanState(banned)
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for site in chosen_sites:
            logits_site = logits_sites[site.layer]
            # prepended: rs.record's hook, whenever it was added, sees the rerouted choice
            handles.append(force_decision(site, state.decide(site, logits_site.module)))
            # prepended after it: where the router itself is forced (LongCat), its logits come first
            handles.append(
                logits_site.module.register_forward_hook(state.logits_hook(logits_site), prepend=True)
            )
        yield model
    finally:
        while handles:
            handles.pop().remove()


class _BanState:
    """Per block: the banned experts, the latest router logits per layer, the weight rules found."""

    def __init__(self, banned: dict[int, list[int]]) -> None:
        self.banned = banned
        self.logits: dict[int, torch.Tensor] = {}
        self.rules: dict[int, WeightRule] = {}
        self.masks: dict[tuple[int, torch.device], torch.Tensor] = {}

    def logits_hook(self, site: LogitsSite):
        layer, index = site.layer, site.index

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self.logits[layer] = logits_of(output, index)  # not detached: gradients

        return hook

    def mask(self, layer: int, num_experts: int, device: torch.device) -> torch.Tensor:
        key = (layer, device)
        if key not in self.masks:
            mask = torch.zeros(num_experts, dtype=torch.bool)
            mask[self.banned[layer]] = True
            self.masks[key] = mask.to(device)
        return self.masks[key]

    def decide(self, site: RouterSite, router: nn.Module):
        layer = site.layer

        def decide(own_ids: torch.Tensor, own_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.logits.pop(layer, None)
            if logits is None or logits.shape[0] != own_ids.shape[0]:
                raise RouteScopeError(
                    f"ban_experts: layer {layer}'s router logits were not seen for this call"
                )
            num_experts = logits.shape[-1]
            banned = self.mask(layer, num_experts, own_ids.device)
            hit = banned[own_ids]  # [T, k]: slots that chose a banned expert
            kept = torch.zeros_like(logits, dtype=torch.bool).scatter(1, own_ids, ~hit)
            scores = logits.detach().float().masked_fill(banned | kept, float("-inf"))
            best = scores.topk(own_ids.shape[1], dim=-1).indices  # the k best allowed, unchosen experts
            nth = (hit.long().cumsum(1) - 1).clamp(min=0)  # the i-th banned slot takes the i-th best
            ids = torch.where(hit, best.gather(1, nth).to(own_ids.dtype), own_ids)
            rule = self.rules.get(layer)
            if rule is None:
                rule = self.rules[layer] = find_weight_rule(router, logits, own_ids, own_weights, layer)
            rerouted = rule.compute(router, logits, ids).to(own_weights.dtype)
            weights = torch.where(hit.any(1, keepdim=True), rerouted, own_weights)
            return ids, weights

        return decide


def _check_banned(sites: list[RouterSite], experts: Mapping[int, Iterable[int]]) -> dict[int, list[int]]:
    """{layer: sorted expert ids}; ValueError naming the valid layers and experts."""
    by_layer = {site.layer: site for site in sites}
    valid = ", ".join(f"{layer}: experts 0..{s.num_experts - 1}" for layer, s in by_layer.items())
    if not isinstance(experts, Mapping):
        raise ValueError(
            f"ban_experts takes {{layer: [expert ids]}}, got {type(experts).__name__}; valid: {valid}"
        )
    banned: dict[int, list[int]] = {}
    for layer, ids in experts.items():
        site = by_layer.get(layer) if isinstance(layer, int) else None
        if site is None:
            raise ValueError(f"layer {layer!r} is not a MoE layer; valid (layer: experts) are {valid}")
        chosen = list(dict.fromkeys(ids))
        bad = [
            e
            for e in chosen
            if not isinstance(e, int) or isinstance(e, bool) or not 0 <= e < site.num_experts
        ]
        if bad:
            raise ValueError(f"layer {layer} has no expert {bad[0]!r}; valid (layer: experts) are {valid}")
        chosen.sort()
        if site.num_experts - len(chosen) < site.top_k:
            raise ValueError(
                f"layer {layer} routes each token to {site.top_k} experts, so at most "
                f"{site.num_experts - site.top_k} of its {site.num_experts} can be banned (got {len(chosen)})"
            )
        if chosen:
            banned[layer] = chosen
    return banned

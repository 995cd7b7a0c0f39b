"""Forcing a routing decision: the pieces `rs.replay` and `rs.ban_experts` share.

Which MoE layers can be forced (adapter rows with `replay=True`), where each layer's router
logits appear, which of `adapters.WEIGHT_RULES` turns them into that family's combine
weights, and the hook that forces a decision: for a "pre" row the experts module is called
with `(hidden_states, ids, weights)` and a pre-hook rewrites that call; for a "post" row (a
router whose block transforms the choice before its experts, LongCat's zero-compute experts)
a forward hook returns the router's output rebuilt with the new ids and weights
(`Adapter.with_decision`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from routescope.capture.adapters import ADAPTERS, WEIGHT_RULES, WeightRule
from routescope.capture.discovery import LogitsSite, RouterSite, find_logits_sites
from routescope.errors import RouteScopeError

_ID_NAMES = ("top_k_index", "router_indices", "selected_experts")
_WEIGHT_NAMES = ("top_k_weights", "routing_weights", "router_scores")


def check_forceable(sites: list[RouterSite], what: str) -> None:
    """RouteScopeError naming the router kinds whose decision is not an experts call."""
    bad = {site.adapter.name for site in sites if not site.adapter.replay}
    if bad:
        kinds = ", ".join(sorted(bad))
        forceable = ", ".join(a.name for a in ADAPTERS if a.replay)
        raise RouteScopeError(
            f"{what} cannot force router kind {kinds}: it swaps the ids and weights an experts module "
            f"is called with, or a router's (ids, weights) output, which only these kinds have: "
            f"{forceable} (docs/models.md, Replay)"
        )


def router_logits_sites(model: nn.Module, sites: list[RouterSite]) -> dict[int, LogitsSite]:
    """Each layer's router-logits output: the one the model declares (`_can_record_outputs`),
    else the first output of the experts' sibling `gate` / `router` module."""
    found = {s.layer: s for s in find_logits_sites(model, [site.layer for site in sites])}
    for site in sites:
        if site.layer in found or "." not in site.name:
            continue
        parent_name = site.name.rsplit(".", 1)[0]
        parent = model.get_submodule(parent_name)
        for attr in ("gate", "router"):
            sibling = getattr(parent, attr, None)
            if isinstance(sibling, nn.Module) and sibling is not site.module:
                found[site.layer] = LogitsSite(site.layer, f"{parent_name}.{attr}", sibling, 0)
                break
    return found


def require_logits_sites(model: nn.Module, sites: list[RouterSite], what: str) -> dict[int, LogitsSite]:
    found = router_logits_sites(model, sites)
    missing = [s.layer for s in sites if s.layer not in found]
    if missing:
        raise RouteScopeError(
            f"{what} needs the router logits of every MoE layer, but {type(model).__name__} "
            f"declares none for layers {missing}"
        )
    return found


def logits_of(output: Any, index: int) -> torch.Tensor:
    """[tokens, E] router logits from a router module's output (not detached: gradients)."""
    logits = output[index] if isinstance(output, (tuple, list)) else output
    return logits.reshape(-1, logits.shape[-1])


def find_weight_rule(
    router: nn.Module, logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, layer: int
) -> WeightRule:
    """The first rule that gives the router's own choice `ids` its own `weights` (one host sync).

    RouteScopeError, naming the router class, when none does."""
    tolerance = 1e-4 if weights.dtype in (torch.float32, torch.float64) else 1e-2
    with torch.no_grad():
        for rule in WEIGHT_RULES:
            try:
                computed = rule.compute(router, logits.detach(), ids)
            except Exception:
                continue  # the rule needs something this router lacks (score_fn, per_expert_scale)
            if computed.shape == weights.shape and torch.allclose(
                computed.float(), weights.float(), rtol=tolerance, atol=1e-6
            ):
                return rule
    names = ", ".join(rule.name for rule in WEIGHT_RULES)
    raise RouteScopeError(
        f"no known weight rule ({names}) reproduces the combine weights of layer {layer}'s router "
        f"{type(router).__name__}: router weights at other ids cannot be computed for this family "
        "(docs/models.md, Replay)"
    )


def replace_call(args: tuple, kwargs: dict, ids: torch.Tensor, weights: torch.Tensor) -> tuple[tuple, dict]:
    """The experts call's arguments with `ids` and `weights` in place of the router's."""
    args, kwargs = list(args), dict(kwargs)
    for index, names, value in ((1, _ID_NAMES, ids), (2, _WEIGHT_NAMES, weights)):
        if len(args) > index:
            old = args[index]
        else:
            name = next(n for n in names if n in kwargs)
            old = kwargs[name]
        if index == 2 and old.shape != ids.shape and old.dim() == 2 and old.shape[-1] > ids.shape[-1]:
            value = torch.zeros_like(old).scatter(-1, ids, value.to(old.dtype))  # dense [tokens, E] scores
        if len(args) > index:
            args[index] = value
        else:
            kwargs[name] = value
    return tuple(args), kwargs


Decide = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor] | None"]


def force_decision(site: RouterSite, decide: Decide) -> torch.utils.hooks.RemovableHandle:
    """Hook `site` so that `decide(own_ids, own_weights)` -> (ids, weights) replaces the
    layer's decision (None: keep it). Prepended, so that any other hook on the module
    (rs.record's) sees the forced decision, whichever was added first."""
    adapter = site.adapter
    if adapter.hook == "pre":

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            own_ids, own_weights = adapter.extract(module, args, kwargs, None)
            new = decide(own_ids, own_weights)
            return None if new is None else replace_call(args, kwargs, *new)

        return site.module.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True)
    if adapter.with_decision is None:
        raise RouteScopeError(f"router kind {adapter.name} has no way to force its decision")
    with_decision = adapter.with_decision

    def post_hook(module: nn.Module, args: tuple, output: Any) -> Any:
        own_ids, own_weights = adapter.extract(module, args, {}, output)
        new = decide(own_ids, own_weights)
        return None if new is None else with_decision(output, *new)

    return site.module.register_forward_hook(post_hook, prepend=True)

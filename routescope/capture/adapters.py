"""Where each kind of MoE router keeps its decision: model knowledge as data.

Discovery (`discovery.py`) walks a model and matches modules against ADAPTERS in order;
the first match wins. Each adapter names the hook it needs and an extractor that turns
the hook's arguments into `(expert ids [tokens, k], combine weights [tokens, k])` on the
model's device, with no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Decision = tuple[torch.Tensor, torch.Tensor]
Extractor = Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], Decision]


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, names: tuple[str, ...]) -> Any:
    if len(args) > index:
        return args[index]
    for name in names:
        if name in kwargs:
            return kwargs[name]
    raise KeyError(f"argument {index} ({'/'.join(names)}) not passed")


def _from_experts_call(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Decision:
    """transformers 5 fused experts: forward(hidden_states, top_k_index, top_k_weights)."""
    if len(args) > 2:  # the usual call, positional (no Python call more per layer and step)
        indices, weights = args[1], args[2]
    else:
        indices = _arg(args, kwargs, 1, ("top_k_index", "router_indices", "selected_experts"))
        weights = _arg(args, kwargs, 2, ("top_k_weights", "routing_weights", "router_scores"))
    if weights.shape != indices.shape and weights.dim() == 2 and weights.shape[-1] > indices.shape[-1]:
        weights = weights.gather(-1, indices)  # dense [tokens, E] scores: take the chosen ones
    return indices, weights


def _from_topk_router_output(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Decision:
    """Routers that return (logits, weights, indices)."""
    return output[2], output[1]


def _with_topk_router_decision(output: Any, indices: torch.Tensor, weights: torch.Tensor) -> Any:
    """A (logits, weights, indices) router output carrying another decision (routing replay)."""
    return (output[0], weights.to(output[1].dtype), indices.to(output[2].dtype), *output[3:])


def _from_dense_scores_router(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Decision:
    """Llama 4: returns (scores [tokens, E], logits); the choice is top-k of the logits and
    the applied weight is the score at each chosen expert."""
    scores, logits = output[0], output[1]
    indices = torch.topk(logits, module.top_k, dim=1).indices
    return indices, scores.gather(1, indices)


def _from_skip_router_output(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Decision:
    """ZAYA: (logits, weights, indices, state); a choice of the extra skip class reaches the
    experts as expert 0 with weight 0, so it is recorded as expert `num_experts` with weight 0."""
    weights, indices = output[1], output[2]
    skipped = (indices == 0) & (weights == 0)  # a chosen softmax probability is never exactly 0
    return indices.masked_fill(skipped, module.num_experts), weights


def _from_sorted_gating_output(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Decision:
    """JetMoE: (index_sorted_experts, batch_index, batch_gates, expert_size, logits), the
    token-slot pairs sorted by expert. The gates are put back in token-slot order; the ids are
    the top-k of the returned fp32 logits, the very tensor and call the gating chose with."""
    index_sorted, gates, logits = output[0], output[2], output[4]
    weights = torch.empty_like(gates).index_copy_(0, index_sorted, gates)
    indices = logits.topk(module.top_k, dim=1).indices
    return indices, weights.view(indices.shape)


def _from_product_key_output(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Decision:
    """Doge CDMoE: product-key routing over sqrt(E) x sqrt(E) keys. It returns the router
    logits [2, tokens, sqrt(E)]; the ids and weights are recomputed with the module's own
    steps, which are deterministic."""
    logits = output[1]
    (scores_x, scores_y), (ids_x, ids_y) = logits.topk(module.num_keys, dim=-1)
    scores = (scores_x.unsqueeze(-1) + scores_y.unsqueeze(-2)).flatten(-2)
    ids = (ids_x.unsqueeze(-1) * module.num_keys + ids_y.unsqueeze(-2)).flatten(-2)
    top_scores, position = scores.topk(module.top_k, dim=-1)
    weights = torch.softmax(top_scores, dim=-1)
    if module.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids.gather(-1, position), weights


def _from_top1_dispatch_output(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Decision:
    """Switch Transformers: (dispatch one-hot [B, S, E], max probability [B, S, 1], logits).
    The one-hot row is all zero for a token dropped by the expert capacity: no expert runs
    for it, so it is recorded as the router's top-1 choice with weight 0."""
    dispatch, probs, logits = output[0], output[1], output[2]
    num_experts = dispatch.shape[-1]
    dispatch, probs, logits = (
        dispatch.reshape(-1, num_experts),
        probs.reshape(-1, 1),
        logits.reshape(-1, num_experts),
    )
    kept = dispatch.any(-1, keepdim=True)
    indices = torch.where(kept, dispatch.argmax(-1, keepdim=True), logits.argmax(-1, keepdim=True))
    return indices, probs * kept


def _from_top2_gates_output(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Decision:
    """NLLB-MoE: (top-1 one-hot [N, E] after capacity, combine gates [N, E], logits [N, E]).
    Slot 0 is the top-1 expert and slot 1 the best of the rest, as the router picks them; the
    weight is the gate at that expert, 0 where capacity (or padding) dropped the slot."""
    top1_mask, gates, logits = output[0], output[1], output[2]
    num_experts = gates.shape[-1]
    top1_mask, gates, logits = (t.reshape(-1, num_experts) for t in (top1_mask, gates, logits))
    probs = torch.softmax(logits, dim=-1, dtype=module.dtype).to(gates.dtype)
    kept = top1_mask.any(-1, keepdim=True)
    first = torch.where(kept, top1_mask.argmax(-1, keepdim=True), probs.argmax(-1, keepdim=True))
    second = logits.scatter(-1, first, float("-inf")).argmax(-1, keepdim=True)
    indices = torch.cat([first, second], dim=-1)
    return indices, gates.gather(-1, indices)


def _route_like_ernie_gate(gate: nn.Module, logits: torch.Tensor) -> Decision:
    """Ernie4_5_VLMoeMoeTopKRouter.forward from its logits: softmax, bias-corrected top-k,
    weights renormalised (clamped at norm_min)."""
    probs = torch.softmax(logits.float(), dim=1)
    indices = torch.topk(gate.moe_statics(probs), gate.top_k, dim=-1).indices
    weights = probs.gather(-1, indices)
    return indices, weights / weights.sum(dim=-1, keepdim=True).clamp(min=gate.norm_min)


def _from_modality_split_block(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Decision:
    """Ernie 4.5 VL: text tokens go to the text experts and image/video tokens to a separate
    set of vision experts, each with its own router; the block returns both routers' logits
    in token order. Vision expert e is recorded as id num_experts + e."""
    logits = output[1]
    try:
        types = _arg(args, kwargs, 1, ("moe_mm_token_type_ids",))
    except KeyError:
        types = None
    indices, weights = _route_like_ernie_gate(module.text_moe.gate, logits)
    if types is not None:
        vision = types.reshape(-1, 1).bool()
        vision_indices, vision_weights = _route_like_ernie_gate(module.vision_moe.gate, logits)
        indices = torch.where(vision, vision_indices + module.num_experts, indices)
        weights = torch.where(vision, vision_weights, weights)
    return indices, weights.to(args[0].dtype)


@dataclass(frozen=True)
class Adapter:
    """One router kind: how to recognise its module and where its decision is."""

    name: str
    hook: str  # "pre": forward pre-hook (sees inputs); "post": forward hook (sees outputs)
    extract: Extractor
    class_names: tuple[str, ...] = ()  # match on the module's class name ...
    fused_experts: bool = False  # ... or on transformers' @use_experts_implementation
    num_experts_attr: str = ""  # module attribute counting every choice (zero/skip experts too)
    top_k: int = 0  # a router kind whose k is fixed by its design (Switch: 1); 0: read it from the model
    note: str = ""
    # rs.replay can force this kind's decision: the experts module is called with
    # (hidden_states, ids, weights) and a pre-hook swaps the ids and weights (capture/control/replay.py)
    replay: bool = False
    # ... or, for a "post" row, the router's output rebuilt with other (ids, weights): a
    # forward hook returns it, and the block routes by it as if the router had chosen so
    with_decision: Callable[[Any, torch.Tensor, torch.Tensor], Any] | None = None
    expert_sets: int = 1  # separate expert sets per layer (text, vision), numbered one after another


ADAPTERS: tuple[Adapter, ...] = (
    Adapter(
        name="modality_split",
        hook="post",
        extract=_from_modality_split_block,
        class_names=("Ernie4_5_VLMoeMoeBlock",),
        expert_sets=2,
        note="Ernie 4.5 VL's modality-isolated experts: two expert sets with their own routers; "
        "ids and weights recomputed from the returned logits, vision experts numbered after text ones",
    ),
    Adapter(
        name="llama4",
        hook="post",
        extract=_from_dense_scores_router,
        class_names=("Llama4Router",),
        note="router returns (scores, logits) with no indices; experts see pre-scaled inputs",
    ),
    Adapter(
        name="skip_router",
        hook="post",
        extract=_from_skip_router_output,
        class_names=("ZayaRouter",),
        num_experts_attr="num_router_classes",
        note="one extra skip class (no compute) that the experts see as expert 0 with weight 0; "
        "recorded as expert num_experts",
    ),
    Adapter(
        name="zero_expert_router",
        hook="post",
        extract=_from_topk_router_output,
        class_names=("LongcatFlashTopkRouter",),
        num_experts_attr="n_routed_experts",
        replay=True,
        with_decision=_with_topk_router_decision,
        note="LongCat-Flash: the router's (logits, weights, indices) are the decision; from "
        "transformers 5.25 the MoE block maps zero-compute (identity) choices to routed ids with "
        "weight 0 before the experts call, so the experts module no longer shows them",
    ),
    Adapter(
        name="fused_experts",
        replay=True,
        hook="pre",
        extract=_from_experts_call,
        fused_experts=True,
        note="the ids and weights the experts module is called with: the model's real choice, "
        "after any bias, group limit or renormalisation",
    ),
    Adapter(
        name="experts_call",
        replay=True,
        hook="pre",
        extract=_from_experts_call,
        class_names=("DbrxExperts", "Step3p7Experts"),
        note="experts modules with the fused call signature but without the decorator",
    ),
    Adapter(
        name="topk_router",
        hook="post",
        extract=_from_topk_router_output,
        class_names=("FlintTopKRouter", "BeamTopKRouter"),
        note="router returns (logits, weights, indices) and its experts are not fused",
    ),
    Adapter(
        name="sorted_gating",
        hook="post",
        extract=_from_sorted_gating_output,
        class_names=("JetMoeTopKGating",),
        note="JetMoE's MLP router (layers.N.mlp.router, found first in each layer); the "
        "mixture-of-attention router in self_attention.experts is not recorded",
    ),
    Adapter(
        name="product_key",
        hook="post",
        extract=_from_product_key_output,
        class_names=("DogeCDMoE",),
        note="Doge's product-key retrieval experts; ids and weights recomputed from its logits",
    ),
    Adapter(
        name="top1_dispatch",
        hook="post",
        extract=_from_top1_dispatch_output,
        class_names=("SwitchTransformersTop1Router",),
        top_k=1,
        note="Switch Transformers' top-1 router returns a capacity-masked one-hot dispatch mask "
        "and the top-1 probability; a dropped token is its top-1 choice with weight 0",
    ),
    Adapter(
        name="top2_gates",
        hook="post",
        extract=_from_top2_gates_output,
        class_names=("NllbMoeTop2Router",),
        top_k=2,
        note="NLLB-MoE's top-2 router returns the top-1 one-hot mask and dense [tokens, E] combine "
        "gates; slot 1 is the best expert after the top-1, its gate 0 where capacity dropped it",
    ),
)


def is_fused_experts(module: nn.Module) -> bool:
    """True for experts modules decorated with transformers' use_experts_implementation."""
    return hasattr(type(module), "_apply_gate") and hasattr(module, "is_transposed")


def match_adapter(module: nn.Module) -> Adapter | None:
    name = type(module).__name__
    for adapter in ADAPTERS:
        if name in adapter.class_names or (adapter.fused_experts and is_fused_experts(module)):
            return adapter
    return None


# -- routing replay: how a router turns its logits into combine weights -----------------
# rs.replay(weights="router") gives recorded expert ids the weights the model's own router
# would give them. Families differ in that rule, so it is data too: replay tries each rule
# on the router's own choice once per layer and keeps the one that reproduces its weights.


def _scale(router: nn.Module) -> float:
    for attr in ("routed_scaling_factor", "router_scaling_factor"):
        value = getattr(router, attr, None)
        if isinstance(value, (int, float)) and value:
            return float(value)
    return 1.0


def _softmax_renorm(router: nn.Module, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    weights = logits.float().softmax(-1).gather(-1, ids)
    return weights / weights.sum(-1, keepdim=True) * _scale(router)


def _softmax(router: nn.Module, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return logits.float().softmax(-1).gather(-1, ids) * _scale(router)


def _sigmoid_renorm(router: nn.Module, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    weights = logits.float().sigmoid().gather(-1, ids)
    return weights / (weights.sum(-1, keepdim=True) + 1e-20) * _scale(router)


def _sigmoid(router: nn.Module, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return logits.float().sigmoid().gather(-1, ids) * _scale(router)


def _score_fn_renorm(router: nn.Module, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    weights = router.score_fn(logits.float()).gather(-1, ids)  # the router's configurable score function
    return weights / (weights.sum(-1, keepdim=True) + 1e-20) * _scale(router)


def _probs_renorm_expert_scale(router: nn.Module, probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    weights = probs.float().gather(-1, ids)
    weights = weights / weights.sum(-1, keepdim=True)
    scale = getattr(router, "per_expert_scale", None)
    return weights * scale[ids] if isinstance(scale, torch.Tensor) else weights


@dataclass(frozen=True)
class WeightRule:
    """One way routers turn the tensor they declare as router logits into combine weights."""

    name: str
    compute: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (router, logits, ids)
    note: str = ""

    def __repr__(self) -> str:  # `replayer.rules` prints one short line per layer, not the function
        return f"WeightRule({self.name!r})"


WEIGHT_RULES: tuple[WeightRule, ...] = (
    WeightRule(
        "softmax_renorm",
        _softmax_renorm,
        note="softmax over all experts, top-k renormalised to sum 1 (Mixtral, Qwen with norm_topk_prob, "
        "OLMoE, ...); equals a softmax over the top-k logits (GPT-OSS, Granite)",
    ),
    WeightRule("softmax", _softmax, note="softmax over all experts, not renormalised (Qwen2-MoE, LongCat)"),
    WeightRule(
        "sigmoid_renorm",
        _sigmoid_renorm,
        note="sigmoid scores renormalised, times routed_scaling_factor (DeepSeek-V3, GLM-4.5, HY-V3)",
    ),
    WeightRule("sigmoid", _sigmoid, note="sigmoid scores times routed_scaling_factor, not renormalised"),
    WeightRule(
        "score_fn_renorm",
        _score_fn_renorm,
        note="the router's own score_fn (config.scoring_func), renormalised, scaled (DeepSeek-V4)",
    ),
    WeightRule(
        "probs_renorm_expert_scale",
        _probs_renorm_expert_scale,
        note="the router returns probabilities; renormalised, times per_expert_scale (Gemma 4)",
    ),
)

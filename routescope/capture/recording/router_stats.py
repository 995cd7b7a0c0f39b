"""`router_stats=True`: per-step router statistics, from a hook on each router's logits.

Eager only (capture/recording/compiled.py refuses them compiled). The hook reads the step in
flight (capture/recording/step.py's StepBuffers) and masks with its valid tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


def logits_hook(site: Any, current: Callable[[], Any], skipped: Any) -> Callable[..., None]:
    """The hook on a router's logits (`router_stats=True`): statistics of the step in flight."""
    layer, index = site.layer, site.index

    def hook(module: Any, args: tuple, output: Any) -> None:
        if torch.compiler.is_compiling():
            return  # statistics are eager only (capture.compiled.check_compilable)
        step = current()
        if step is None:
            return
        logits = output[index] if isinstance(output, (tuple, list)) else output
        logits = logits.detach().reshape(-1, logits.shape[-1]).float()
        if logits.shape[0] != step.valid_flat.shape[0]:
            skipped.add("router_stats_shape_mismatch")
            return
        step.stats[layer] = router_statistics(logits, step.valid_on(logits.device))

    return hook


def router_statistics(logits: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """router_stats / router_tokens of one layer from its [tokens, E] float logits, on the
    logits' device: (sum of softmax over valid tokens, float64; normalised entropy and
    top-1 minus top-2 margin per token)."""
    probs = logits.softmax(-1)
    prob_sum = (probs * valid[:, None]).sum(0, dtype=torch.float64)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1) / math.log(probs.shape[-1])
    top2 = probs.topk(min(2, probs.shape[-1]), dim=-1).values
    margin = top2[:, 0] - top2[:, -1] if top2.shape[-1] > 1 else top2[:, 0]
    return prob_sum, entropy, margin

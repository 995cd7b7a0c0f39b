"""Per-log routing scalars from the totals the device counters kept (SPEC 4.1 formulas).

`rs.watch` calls `routing_scalars` once per Trainer log (or per `end_step` of a custom loop)
with the totals since the previous one. The balance formulas come from
`analysis.balance_frames.balance_from_loads`, the same arithmetic `Run.balance` runs in SQL,
so a watched run and a recorded run report the same numbers for the same tokens.

The losses are what the model trains on: `aux_loss` and `z_loss` are the values of each
forward (transformers' `load_balancing_loss_func` over that forward's logits, the number TRL
logs as `aux_loss`), averaged over the forwards of the window. A value pooled over the
window's tokens is reported only under a `_pooled` name: pooling two means is not the mean
of the products, so the two differ even for equal micro-batches.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from routescope.analysis.balance_frames import balance_from_loads, gini
from routescope.capture.recording.counters import LayerTotals, WindowTotals

PREFIX = "routing"
DETAILS = ("brief", "layers")
Detail = Literal["brief", "layers"]
LAYER_METRICS = ("cv", "max_violation", "norm_entropy", "dead_fraction", "gini", "aux_loss", "z_loss")
PERCENTILES = (50, 95)  # cross-layer percentiles of cv, max_violation and gini (numpy linear)


def layer_key(layer: int, metric: str, prefix: str = PREFIX) -> str:
    """`routing/layer_{l}/{metric}`: the name in log_history and every reporter."""
    return f"{prefix}/layer_{layer}/{metric}"


def is_layer_key(key: str, prefix: str = PREFIX) -> bool:
    return key.startswith(f"{prefix}/layer_")


def check_detail(detail: str) -> str:
    if detail not in DETAILS:
        raise ValueError(f"detail={detail!r} is not allowed: use 'brief' (model aggregates only) or 'layers'")
    return detail


def routing_scalars(
    totals: WindowTotals | list[LayerTotals], prefix: str = PREFIX, detail: Detail = "layers"
) -> dict[str, float]:
    """Named scalars over the forwards since the previous log; layers that saw no token are left out.

    Per layer (detail="layers"): cv, max_violation, norm_entropy (SPEC 4.1 over the routing slots),
    dead_fraction (experts with no slot / E), gini (of the expert loads), aux_loss and z_loss (per
    forward, averaged over the window's forwards). Model aggregates (always): aux_loss (per forward:
    load_balancing_loss_func over every layer of that forward, averaged), z_loss (the mean of the
    layers'), aux_loss_pooled and z_loss_pooled (over the window's tokens), max_violation_max,
    dead_fraction_mean, cv_mean, norm_entropy_min, gini_mean, gini_max, the cross-layer p50 and
    p95 of cv, max_violation and gini, and tokens (tokens routed per layer, summed over ranks).
    """
    check_detail(detail)
    window = totals if isinstance(totals, WindowTotals) else WindowTotals(list(totals), 0.0, 0.0, 0.0)
    seen = [t for t in window.layers if t.tokens > 0 and t.counts.sum() > 0]
    if not seen:
        return {}
    loads = pd.DataFrame(
        {
            "layer": np.concatenate([np.full(t.num_experts, t.layer) for t in seen]),
            "expert": np.concatenate([np.arange(t.num_experts) for t in seen]),
            "tokens": np.concatenate([t.counts for t in seen]),
        }
    )
    balance = balance_from_loads(loads, ["layer"]).set_index("layer")
    balance["gini"] = pd.Series({t.layer: gini(t.counts) for t in seen})
    balance["dead_fraction"] = pd.Series({t.layer: float((t.counts == 0).mean()) for t in seen})
    per_layer: dict[str, float] = {}
    z_forward, z_pooled = [], []
    for t in seen:
        row = balance.loc[t.layer]
        for metric in ("cv", "max_violation", "norm_entropy", "dead_fraction", "gini"):
            per_layer[layer_key(t.layer, metric, prefix)] = float(row[metric])
        if t.aux_forwards > 0:
            per_layer[layer_key(t.layer, "aux_loss", prefix)] = t.aux_forward_sum / t.aux_forwards
        if t.z_forwards > 0:
            z = t.z_forward_sum / t.z_forwards
            per_layer[layer_key(t.layer, "z_loss", prefix)] = z
            z_forward.append(z)
        if t.z_sum is not None and t.logit_tokens > 0:
            z_pooled.append(t.z_sum / t.logit_tokens)
    out: dict[str, float] = per_layer if detail == "layers" else {}
    if window.aux_forwards > 0:
        out[f"{prefix}/aux_loss"] = window.aux_forward_sum / window.aux_forwards
    if z_forward:
        out[f"{prefix}/z_loss"] = float(np.mean(z_forward))
    pooled = aux_loss_pooled(seen)
    if pooled is not None:
        out[f"{prefix}/aux_loss_pooled"] = pooled
    if z_pooled:
        out[f"{prefix}/z_loss_pooled"] = float(np.mean(z_pooled))
    out[f"{prefix}/max_violation_max"] = float(balance["max_violation"].max())
    out[f"{prefix}/dead_fraction_mean"] = float(balance["dead_fraction"].mean())
    out[f"{prefix}/cv_mean"] = float(balance["cv"].mean())
    out[f"{prefix}/norm_entropy_min"] = float(balance["norm_entropy"].min())
    out[f"{prefix}/gini_mean"] = float(balance["gini"].mean())
    out[f"{prefix}/gini_max"] = float(balance["gini"].max())
    for metric in ("cv", "max_violation", "gini"):
        values = balance[metric].to_numpy(dtype=np.float64)
        for q in PERCENTILES:
            out[f"{prefix}/{metric}_p{q}"] = float(np.percentile(values, q))
    out[f"{prefix}/tokens"] = float(max(t.tokens for t in seen))
    return out


def aux_loss_pooled(totals: list[LayerTotals]) -> float | None:
    """transformers' `load_balancing_loss_func` over all MoE layers, from the window's totals:
    as if the whole window were one forward (it is not what the model trained on; `_pooled`).

    That function concatenates every layer's logits, so with T_l tokens in layer l:
    E * sum_e (sum_l L_le / sum_l T_l) * (sum_l P_le / sum_l T_l), P the summed softmax
    probability. It needs the router logits of every layer and one E for all; else None.
    """
    if not totals or any(t.prob_sum is None for t in totals):
        return None
    experts = {t.num_experts for t in totals}
    if len(experts) != 1:
        return None
    num_experts = experts.pop()
    tokens = sum(t.tokens for t in totals)
    logit_tokens = sum(t.logit_tokens for t in totals)
    if tokens <= 0 or logit_tokens <= 0:
        return None
    fraction = sum(t.counts for t in totals) / tokens
    prob = sum(t.prob_sum for t in totals) / logit_tokens  # type: ignore[misc]
    return float(num_experts * np.sum(fraction * prob))

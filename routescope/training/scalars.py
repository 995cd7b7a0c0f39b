"""Per-log routing scalars from the totals the device counters kept (SPEC 4.1 formulas).

`rs.watch` calls `routing_scalars` once per Trainer log (or per `end_step` of a custom loop)
with the totals since the previous one. The balance formulas come from
`analysis.balance_frames.balance_from_loads`, the same arithmetic `Run.balance` runs in SQL,
so a watched run and a recorded run report the same numbers for the same tokens.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from routescope.analysis.balance_frames import balance_from_loads
from routescope.capture.recording.counters import LayerTotals

PREFIX = "routing"
LAYER_METRICS = ("cv", "max_violation", "norm_entropy", "dead_fraction", "z_loss")


def layer_key(layer: int, metric: str, prefix: str = PREFIX) -> str:
    """`routing/layer_{l}/{metric}`: the name in log_history and every reporter."""
    return f"{prefix}/layer_{layer}/{metric}"


def routing_scalars(totals: list[LayerTotals], prefix: str = PREFIX) -> dict[str, float]:
    """Named scalars over the tokens since the previous log; layers that saw no token are left out.

    Per layer: cv, max_violation, norm_entropy (SPEC 4.1 over the routing slots), dead_fraction
    (experts with no slot / E), z_loss (mean over tokens of logsumexp(logits)^2). Model level:
    aux_loss (transformers' load_balancing_loss_func over all MoE layers), z_loss (mean of the
    layers'), max_violation_max (the worst layer), dead_fraction_mean, cv_mean,
    norm_entropy_min, tokens (tokens routed per layer, summed over ranks).
    """
    seen = [t for t in totals if t.tokens > 0 and t.counts.sum() > 0]
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
    out: dict[str, float] = {}
    z_values = []
    for t in seen:
        row = balance.loc[t.layer]
        out[layer_key(t.layer, "cv", prefix)] = float(row["cv"])
        out[layer_key(t.layer, "max_violation", prefix)] = float(row["max_violation"])
        out[layer_key(t.layer, "norm_entropy", prefix)] = float(row["norm_entropy"])
        out[layer_key(t.layer, "dead_fraction", prefix)] = float((t.counts == 0).sum() / t.num_experts)
        if t.z_sum is not None and t.logit_tokens > 0:
            z = t.z_sum / t.logit_tokens
            out[layer_key(t.layer, "z_loss", prefix)] = z
            z_values.append(z)
    aux = aux_loss(seen)
    if aux is not None:
        out[f"{prefix}/aux_loss"] = aux
    if z_values:
        out[f"{prefix}/z_loss"] = float(np.mean(z_values))
    out[f"{prefix}/max_violation_max"] = float(balance["max_violation"].max())
    out[f"{prefix}/dead_fraction_mean"] = float(np.mean([(t.counts == 0).mean() for t in seen]))
    out[f"{prefix}/cv_mean"] = float(balance["cv"].mean())
    out[f"{prefix}/norm_entropy_min"] = float(balance["norm_entropy"].min())
    out[f"{prefix}/tokens"] = float(max(t.tokens for t in seen))
    return out


def aux_loss(totals: list[LayerTotals]) -> float | None:
    """transformers' `load_balancing_loss_func` over all MoE layers, from totals.

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

"""Expert-parallel balance of a run's loads (SPEC 4.1 `ep_balancedness`), per GPU.

`ep_balance(loads, ep_size, placement)` places each layer's experts on GPUs (contiguously,
E/N per GPU, or by an explicit plan) and returns mean / max of the per-GPU loads, the ratio
SGLang's `compute_utilization_rate` and vLLM's EPLB log. `metrics.balance(ep_size=...,
placement=...)` calls it with `Run.expert_load`; plans are checked and evaluated by
`placement.py`, so the metric and the placement tools agree. NumPy and pandas only.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from routescope.analysis import placement as plans


def ep_balance(loads: pd.DataFrame, ep_size: int | None, placement: pd.DataFrame | None) -> pd.DataFrame:
    """layer, ep_size, ep_balancedness = mean_g G_g / max_g G_g (NaN for a layer with no load).

    `loads`: layer, expert, tokens with every expert of every layer (`Run.expert_load`).
    `placement`: layer, gpu, slot, expert; a replicated expert's load splits evenly over its
    replicas; layers it does not place are left out. Without it, expert e of a layer with E
    experts sits on GPU e // (E / ep_size).
    """
    experts_per_layer = loads.groupby("layer")["expert"].count()
    layers = [int(layer) for layer in experts_per_layer.index]
    if placement is None:
        if isinstance(ep_size, bool) or not isinstance(ep_size, (int, np.integer)) or ep_size < 1:
            raise ValueError(
                f"ep_size must be a positive integer (GPUs in the expert-parallel group), got {ep_size!r}"
            )
        uneven = [f"layer {layer} has {e}" for layer, e in experts_per_layer.items() if e % int(ep_size)]
        if uneven:
            raise ValueError(
                f"ep_size={ep_size} does not split the experts contiguously ({', '.join(uneven)} experts); "
                "pick an ep_size that divides E, or pass placement= (e.g. run.placement(ep_size, redundant=...))"
            )
        placement = plans.build_plan(loads, int(ep_size), method="contiguous")
    elif not isinstance(placement, pd.DataFrame):
        raise ValueError(
            f"placement must be a DataFrame with columns layer, gpu, slot, expert, not {type(placement).__name__}"
        )
    planned = plans.check_plan(placement, int(experts_per_layer.max()))
    if ep_size is not None and int(ep_size) != planned:
        raise ValueError(f"ep_size={ep_size} but the placement uses {planned} GPUs (0..{planned - 1})")
    unknown = sorted(set(placement["layer"].astype(int)) - set(layers))
    if unknown:
        raise ValueError(
            f"the placement names layers {unknown}, which are not MoE layers of this run {layers}"
        )
    out = plans.evaluate_placement(loads, placement)[["layer", "ep_size", "ep_balancedness"]]
    return out.astype({"layer": loads["layer"].dtype, "ep_size": "int64"})

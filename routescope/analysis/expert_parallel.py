"""Expert-parallel balance of a run's loads (SPEC 4.1 `ep_balancedness`), per GPU.

`ep_plan(loads, ep_size, placement)` places each layer's experts on GPUs (contiguously, E/N
per GPU, or by an explicit plan); `ep_balance` gives mean / max of the per-GPU loads over the
selected tokens pooled, `ep_balance_step_mean` the mean over forward steps of each step's
value (what SGLang logs). The ratio is SGLang's `compute_utilization_rate` and vLLM's EPLB
balancedness. `metrics.balance(ep_size=..., placement=...)` calls these; plans are checked
and evaluated by `placement.py`, so the metric and the placement tools agree.

`model_imbalance(evaluation)` is the one model-level figure of a placement: MoE layers run one
after another and each waits for its own busiest GPU, so a forward step takes
sum over layers of max_g G_{l,g}, against sum over layers of mean_g G_{l,g} under perfect
balance. Adding each GPU's load over the layers first would hide every layer's imbalance (a
plan that puts each layer's heaviest expert on GPU 0 piles up there in the sum while every
layer is balanced well). `compare_plans` gives it per plan with the per-layer max / mean; the
HTML report, the dashboard's Placement page and `routescope placement` use these. NumPy and
pandas only.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from routescope.analysis import placement as plans


def ep_plan(loads: pd.DataFrame, ep_size: int | None, placement: pd.DataFrame | None) -> pd.DataFrame:
    """A checked plan (layer, gpu, slot, expert): `placement` as given, or expert e of a layer
    with E experts on GPU e // (E / ep_size). ValueError saying what is wrong otherwise.

    `loads`: layer, expert, tokens with every expert of every layer (`Run.expert_load`).
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
    return placement


def ep_balance(loads: pd.DataFrame, plan: pd.DataFrame) -> pd.DataFrame:
    """layer, ep_size, ep_balancedness = mean_g G_g / max_g G_g over the loads pooled (NaN for a
    layer with no load); a replicated expert's load splits evenly over its replicas; layers the
    plan does not place are left out."""
    out = plans.evaluate_placement(loads, plan)[["layer", "ep_size", "ep_balancedness"]]
    return out.astype({"layer": loads["layer"].dtype, "ep_size": "int64"})


def ep_balance_step_mean(step_loads: pd.DataFrame, plan: pd.DataFrame) -> pd.DataFrame:
    """layer, ep_balancedness_step_mean: each forward step's mean_g G_g / max_g G_g, averaged
    over the steps in which the layer routed any token (SGLang averages its per-batch
    `compute_utilization_rate` over a window). `step_loads`: step, layer, expert, tokens."""
    ep_size = int(plan["gpu"].max()) + 1
    replicas = plan.groupby(["layer", "expert"]).size().rename("replicas").reset_index()
    if len(replicas) == len(plan) and len(step_loads):  # one GPU per expert: no merge of every row
        return _step_mean_unreplicated(step_loads, plan, ep_size)
    slots = plan[["layer", "gpu", "expert"]].merge(replicas, on=["layer", "expert"])
    rows = step_loads[step_loads["tokens"] > 0].astype({"layer": "int64", "expert": "int64"})
    rows = rows.merge(slots.astype({"layer": "int64", "expert": "int64"}), on=["layer", "expert"])
    rows["load"] = rows["tokens"] / rows["replicas"]
    per_gpu = rows.groupby(["step", "layer", "gpu"])["load"].sum()
    per_step = per_gpu.groupby(level=["step", "layer"]).agg(["sum", "max"])
    per_step["balancedness"] = per_step["sum"] / ep_size / per_step["max"]
    out = per_step.groupby(level="layer")["balancedness"].mean().rename("ep_balancedness_step_mean")
    return out.reset_index()


def _step_mean_unreplicated(step_loads: pd.DataFrame, plan: pd.DataFrame, ep_size: int) -> pd.DataFrame:
    """`ep_balance_step_mean` when every expert sits on one GPU: per-GPU loads of each
    (step, layer) by one bincount over integer codes (the per-step rows are steps x layers x
    experts: tens of millions at 1B routing rows)."""
    layers = np.sort(plan["layer"].unique().astype(np.int64))
    width = int(max(plan["expert"].max(), step_loads["expert"].max())) + 1
    gpu_of = np.full((len(layers), width), -1, dtype=np.int64)
    gpu_of[np.searchsorted(layers, plan["layer"].to_numpy(np.int64)), plan["expert"].to_numpy(np.int64)] = (
        plan["gpu"].to_numpy(np.int64)
    )
    rows = step_loads[step_loads["tokens"] > 0]
    layer = rows["layer"].to_numpy(np.int64)
    known = np.isin(layer, layers)
    layer_idx = np.searchsorted(layers, layer[known])
    gpu = gpu_of[layer_idx, rows["expert"].to_numpy(np.int64)[known]]
    placed = gpu >= 0  # experts the plan does not place are left out, as the merge leaves them
    steps, step_idx = np.unique(rows["step"].to_numpy()[known][placed], return_inverse=True)
    layer_idx, gpu = layer_idx[placed], gpu[placed]
    cells = (step_idx * len(layers) + layer_idx) * ep_size + gpu
    loads = np.bincount(
        cells,
        weights=rows["tokens"].to_numpy(np.float64)[known][placed],
        minlength=len(steps) * len(layers) * ep_size,
    )
    loads = loads.reshape(len(steps), len(layers), ep_size)
    seen = np.zeros((len(steps), len(layers)), dtype=bool)
    seen[step_idx, layer_idx] = True  # a (step, layer) with any placed token, as groupby keeps
    peak = loads.max(axis=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        balance = loads.sum(axis=2) / ep_size / peak
    out = [
        (int(layers[j]), float(balance[seen[:, j], j].mean())) for j in range(len(layers)) if seen[:, j].any()
    ]
    return pd.DataFrame(out, columns=["layer", "ep_balancedness_step_mean"])


def model_imbalance(evaluation: pd.DataFrame) -> dict[str, float]:
    """The model-level figure of one plan from its `evaluate_placement` frame (one row per layer):
    step_load = sum over layers of the busiest GPU's load, balanced_load = sum over layers of the
    mean GPU load, imbalance = step_load / balanced_load (the step time relative to perfect
    balance, 1.0 = even; NaN with no load) and ep_balancedness = its inverse."""
    step = float(evaluation["max_gpu_load"].sum())
    balanced = float(evaluation["mean_gpu_load"].sum())
    ratio = step / balanced if balanced > 0 else float("nan")
    return {
        "step_load": step,
        "balanced_load": balanced,
        "imbalance": ratio,
        "ep_balancedness": 1.0 / ratio if balanced > 0 else float("nan"),
    }


def compare_plans(
    loads: pd.DataFrame, candidates: Mapping[str, pd.DataFrame]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per_layer, model) for named plans (e.g. {"contiguous": ..., "lpt": ...}) evaluated on
    `loads` (layer, expert, tokens).

    per_layer: plan, layer, max_gpu_load, mean_gpu_load, imbalance (max / mean), ep_balancedness.
    model: plan, step_load, balanced_load, imbalance, ep_balancedness (`model_imbalance`), one
    row per plan in the order given.
    """
    columns = ["layer", "max_gpu_load", "mean_gpu_load", "imbalance", "ep_balancedness"]
    per_layer, model = [], []
    for name, plan in candidates.items():
        evaluation = plans.evaluate_placement(loads, plan)
        per_layer.append(evaluation[columns].assign(plan=name))
        model.append({"plan": name, **model_imbalance(evaluation)})
    per_layer_frame = pd.concat(per_layer, ignore_index=True)[["plan", *columns]]
    return per_layer_frame, pd.DataFrame(model)

"""The doctor's drift checks over forward steps: an expert that stops receiving tokens at step N,
and a layer whose balance changes at step N. Called by `analysis/doctor.py` with the per-step
loads (`metrics.step_expert_loads`); the evidence bar and bands are `doctor_rules`'."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from routescope.analysis.doctor_rules import (
    DoctorThresholds,
    change_p_value,
    cv,
    finding,
    in_words,
    uniform_miss_probability,
)


def step_matrix(step_loads: pd.DataFrame, layer: int, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(steps [S], loads [S, E]) of one layer, steps ascending, experts 0..E-1."""
    part = step_loads[step_loads["layer"] == layer]
    steps = np.sort(part["step"].unique())
    matrix = np.zeros((len(steps), num_experts), dtype=np.float64)
    if len(steps):
        rows = np.searchsorted(steps, part["step"].to_numpy())
        cols = part["expert"].to_numpy().astype(np.int64)
        keep = (cols >= 0) & (cols < num_experts)
        np.add.at(matrix, (rows[keep], cols[keep]), part["tokens"].to_numpy(dtype=np.float64)[keep])
    return steps, matrix


def drift_findings(
    step_loads: pd.DataFrame,
    layers: dict[int, tuple[int, int]],
    th: DoctorThresholds,
    sql: Any,
) -> list[dict[str, Any]]:
    """Findings `routing_drift` for every MoE layer. `layers` maps layer -> (E, k); `sql(name,
    **values)` renders the query a finding hands the user."""
    expert_tests = sum(e for e, _ in layers.values())
    out: list[dict[str, Any]] = []
    by_layer = {
        int(k): part for k, part in step_loads.groupby("layer", sort=False)
    }  # one pass, not one per layer
    for layer, (num_experts, top_k) in sorted(layers.items()):
        steps, matrix = step_matrix(by_layer.get(layer, step_loads.iloc[:0]), layer, num_experts)
        if len(steps) < 2:
            continue
        dying = _dying_experts(layer, steps, matrix, top_k, th, expert_tests, sql)
        change = _balance_change(layer, steps, matrix, top_k, th, len(layers), sql)
        # an expert dying moves the layer's cv at the same step: one finding says it
        out += dying + [c for c in change if c["step"] not in {d["step"] for d in dying}]
    return out


def _dying_experts(
    layer: int,
    steps: np.ndarray,
    matrix: np.ndarray,
    top_k: int,
    th: DoctorThresholds,
    tests: int,
    sql: Any,
) -> list[dict[str, Any]]:
    """Experts with tokens early on and none from some step to the end, beyond chance."""
    out = []
    num_experts = matrix.shape[1]
    tokens_per_step = matrix.sum(axis=1) / top_k
    after = np.cumsum(tokens_per_step[::-1])[::-1]  # tokens from step index i to the end
    bar = th.alpha / max(tests, 1)
    for expert in range(num_experts):
        used = np.flatnonzero(matrix[:, expert] > 0)
        if len(used) == 0 or used[-1] == len(steps) - 1:
            continue  # dead from the start (dead_expert says so) or alive at the end
        first_silent = int(used[-1]) + 1
        silent_tokens = float(after[first_silent])
        p = uniform_miss_probability(top_k, num_experts, silent_tokens)
        if p >= bar:
            continue
        before = int(matrix[:first_silent, expert].sum())
        out.append(
            finding(
                "warning",
                "routing_drift",
                layer,
                expert,
                int(steps[first_silent]),
                f"expert {expert} took {before:,} routing slots up to step {int(steps[first_silent - 1])}, "
                f"then none in the {silent_tokens:,.0f} tokens of steps {int(steps[first_silent])}-"
                f"{int(steps[-1])}: it died at step {int(steps[first_silent])}; a uniform router misses "
                f"an expert that long with probability {in_words(p)}",
                "look at what changed at that step (learning rate, data, a checkpoint); an expert "
                "that stops receiving tokens in training rarely comes back",
                sql=sql("show_expert_over_steps", layer=layer, expert=expert),
                magnitude=before / max(matrix[:first_silent].sum(), 1.0) * num_experts,
            )
        )
    return out


def _balance_change(
    layer: int,
    steps: np.ndarray,
    matrix: np.ndarray,
    top_k: int,
    th: DoctorThresholds,
    layer_tests: int,
    sql: Any,
) -> list[dict[str, Any]]:
    """The step where the pooled cv before and after differ most; a finding when the difference
    passes the band and the two pooled load vectors differ beyond chance."""
    m = int(th.drift_min_steps)
    splits = range(m, len(steps) - m + 1)
    if len(splits) == 0:
        return []
    cumulative = np.cumsum(matrix, axis=0)
    total = cumulative[-1]
    # every split at once: the pooled loads before split i are cumulative[i - 1]
    before_all = cumulative[splits.start - 1 : splits.stop - 1]
    deltas = _row_cv(total - before_all) - _row_cv(before_all)
    size = np.where(np.isfinite(deltas), np.abs(deltas), -1.0)
    if size.max() <= 0:
        return []
    best = splits.start + int(np.argmax(size))  # the first split of largest |delta|, as a scan finds
    best_delta = float(deltas[best - splits.start])
    if abs(best_delta) < th.cv_band:
        return []
    before, after_loads = cumulative[best - 1], total - cumulative[best - 1]
    p = change_p_value(before, after_loads)
    if p >= th.alpha / max(layer_tests * len(splits), 1):
        return []
    rising = best_delta > 0
    return [
        finding(
            "warning" if rising else "info",
            "routing_drift",
            layer,
            None,
            int(steps[best]),
            f"cv {cv(before):.3f} over steps {int(steps[0])}-{int(steps[best - 1])}, "
            f"{cv(after_loads):.3f} over steps {int(steps[best])}-{int(steps[-1])}: the balance "
            f"{'worsens' if rising else 'improves'} at step {int(steps[best])}; loads this different "
            f"before and after arise by chance with probability {in_words(p)}",
            "the layer is collapsing: check the load-balancing loss and learning rate around that step"
            if rising
            else "the layer's balance improved; nothing to do",
            sql=sql("show_layer_over_steps", layer=layer),
            magnitude=abs(best_delta),
        )
    ]


def _row_cv(loads: np.ndarray) -> np.ndarray:
    """`cv` of each row (population std over the mean; NaN where the mean is not positive)."""
    mean = loads.mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mean > 0, loads.std(axis=1) / np.where(mean > 0, mean, 1.0), np.nan)

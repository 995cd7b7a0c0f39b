"""SPEC 4.1 balance metrics of a loads frame already in memory (pandas, no query).

`Run.balance` computes these in SQL over the routing table. This is the same arithmetic
for loads a caller already holds, grouped by any keys: the dashboard's time view (per step
bin and layer) and per-rank views use it, so the formulas live once in the analysis layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

COLUMNS = ["slots", "cv", "max_violation", "balancedness", "norm_entropy"]


def balance_from_loads(loads: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """cv, max_violation, balancedness, norm_entropy per group of `keys`.

    `loads`: one row per (keys..., expert) with `tokens` = routing rows of that expert,
    every expert present (zeros included). `slots` is the group's total routing rows.
    """
    keys = list(keys)
    if loads.empty:
        return pd.DataFrame(columns=[*keys, *COLUMNS])
    grouped = loads.groupby(keys)["tokens"]
    stats = grouped.agg(slots="sum", max_load="max", num_experts="count").reset_index()
    mean_per_row = grouped.transform("mean")
    total_per_row = grouped.transform("sum")
    share = loads["tokens"] / total_per_row.where(total_per_row > 0)
    parts = pd.DataFrame(
        {
            **{k: loads[k] for k in keys},
            "sq": (loads["tokens"] - mean_per_row) ** 2,
            "plogp": share.where(share > 0).pipe(lambda s: s * np.log(s)).fillna(0.0),
        }
    )
    stats = stats.merge(parts.groupby(keys)[["sq", "plogp"]].sum().reset_index(), on=keys)
    mean = stats["slots"] / stats["num_experts"]
    stats["cv"] = np.sqrt(stats["sq"] / stats["num_experts"]) / mean.where(mean > 0)
    stats["max_violation"] = (stats["max_load"] - mean) / mean.where(mean > 0)
    stats["balancedness"] = mean / stats["max_load"].where(stats["max_load"] > 0)
    stats["norm_entropy"] = -stats["plogp"] / np.log(stats["num_experts"].where(stats["num_experts"] > 1))
    return stats[[*keys, *COLUMNS]].sort_values(keys).reset_index(drop=True)


def gini(loads: np.ndarray) -> float:
    """Gini coefficient of one layer's expert loads: sum_ij |L_i - L_j| / (2 E^2 m), the
    population form (0 = every expert equal, (E-1)/E = one expert takes everything). Megatron-Core's
    routing diagnostics state a healthy band of Gini < 0.3. NaN when no expert has a token."""
    values = np.sort(np.asarray(loads, dtype=np.float64))
    n, total = len(values), values.sum()
    if n == 0 or total <= 0:
        return float("nan")
    rank = np.arange(1, n + 1)
    return float(np.sum((2 * rank - n - 1) * values) / (n * total))

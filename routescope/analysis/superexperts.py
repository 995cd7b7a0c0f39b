"""Super Experts and massive activations from calibration numbers (SPEC 4.6): pure pandas.

`classify_super_experts` flags the experts whose largest output stands out; `classify_massive`
the residual-stream layers with massive activations; `Calibration` holds one pass's result.
The calibration pass itself (hooks on a live model) is `routescope.capture.calibration.activations`; the
CLI's `report`, the dashboard and `rs.classify_super_experts` read recorded tables with this,
without torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

# Thresholds of SPEC 4.6: their one default each.
DEFAULT_QUANTILE = 99.5
DEFAULT_RATIO = 0.1
MASSIVE_LAYER_FRACTION = 0.75
MASSIVE_ABS = 100.0  # Sun et al. 2024: |h| > 100 ...
MASSIVE_MEDIAN_RATIO = 1000.0  # ... and > 1000 x median |h|


@dataclass
class Calibration:
    """The result of one calibration pass: per-expert maxima and per-layer hidden statistics."""

    experts: pd.DataFrame
    hidden: pd.DataFrame
    tokens: int
    sequences: int
    batches: int
    seconds: float
    thresholds: dict[str, Any]


def massive_layer_count(num_hidden_layers: int) -> int:
    """round(0.75 * L) with Python's round (halves to even), as the paper's code does.

    The layers that may build massive activations; 6 layers -> 4 (0..3), 10 -> 8.
    """
    return round(MASSIVE_LAYER_FRACTION * num_hidden_layers)


def _allowed_layers(layers: Iterable[int] | int | None, num_hidden_layers: int) -> list[int]:
    if layers is None:
        return list(range(massive_layer_count(num_hidden_layers)))
    if isinstance(layers, int):
        return list(range(layers))
    return sorted(int(layer) for layer in layers)


def classify_super_experts(
    acts: pd.DataFrame,
    num_hidden_layers: int,
    quantile: float = DEFAULT_QUANTILE,
    ratio: float = DEFAULT_RATIO,
    layers: Iterable[int] | int | None = None,
) -> pd.DataFrame:
    """`acts` (layer, expert, shared, max_abs_output[, tokens_seen]) with `is_super` and `ratio_to_median`.

    SPEC 4.6: a > percentile(A, quantile, linear) and a > max(A) * ratio and layer in `layers`
    (default: the first round(0.75 * num_hidden_layers)). A holds the experts of the searched
    layers only that saw at least one token, as the paper's code pools only the searched
    layers: a giant in a later layer never raises the thresholds. An expert that saw no
    token is never super. `ratio_to_median` divides by the median of the same pool A.
    """
    out = acts.copy()
    values = out["max_abs_output"].to_numpy(dtype=np.float64)
    seen = out["tokens_seen"].to_numpy() > 0 if "tokens_seen" in out.columns else np.ones(len(out), bool)
    allowed = _allowed_layers(layers, num_hidden_layers)
    searched = out["layer"].isin(allowed).to_numpy()
    pool = values[seen & searched]
    if pool.size:
        p = float(np.percentile(pool, quantile, method="linear"))
        top = float(pool.max()) * ratio
        median = float(np.median(pool))
    else:
        p = top = median = math.nan
    out["is_super"] = seen & searched & (values > p) & (values > top)
    out["ratio_to_median"] = values / median if median and median > 0 else math.nan
    out.attrs["thresholds"] = {
        "quantile": quantile,
        "ratio": ratio,
        "percentile_threshold": p,
        "max_threshold": top,
        "median": median,
        "pooled_experts": int(pool.size),
        "layers": allowed,
    }
    return out


def classify_massive(
    hidden: pd.DataFrame, abs_threshold: float = MASSIVE_ABS, median_ratio: float = MASSIVE_MEDIAN_RATIO
) -> pd.DataFrame:
    """`hidden` with `ratio_to_median` and `is_massive` (|h| > 100 and > 1000 x median |h|)."""
    out = hidden.copy()
    ratio = out["max_abs"] / out["median_abs"].where(out["median_abs"] > 0)
    out["ratio_to_median"] = ratio
    out["is_massive"] = (out["max_abs"] > abs_threshold) & (ratio > median_ratio).fillna(out["max_abs"] > 0)
    return out

"""The layers x metric view of the Overview (issue 33 item 4): one row per MoE layer, one column
per health metric, each cell coloured by how far it lies from healthy (green) towards the
doctor's band and beyond (red), with the value written in it. It replaces one card per layer,
so a 48-layer run reads at a glance. The dashboard builds the table (`layer_health`); the
figure only draws it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from routescope.plots.style import empty_figure, layer_name

HEALTH_SCALE = [[0.0, "#1a9850"], [0.5, "#fee08b"], [1.0, "#d73027"]]  # healthy, at the band, far past it
# column -> (title, badness(value, row) in [0, 1]: 0.5 where the doctor's band lies)
HEALTH_COLUMNS: dict[str, str] = {
    "findings": "doctor",
    "cv": "cv",
    "gini": "Gini",
    "max_violation": "max_violation",
    "balancedness": "balancedness",
    "norm_entropy": "norm_entropy",
    "dead": "dead",
    "near_dead": "near-dead",
    "hot": "hot",
    "ep_balancedness": "ep_balancedness",
    "aux_loss": "aux_loss",
    "tokens": "tokens",
}
SEVERITY_BADNESS = {"ok": 0.0, "info": 0.1, "warning": 0.6, "critical": 1.0}


def badness(table: pd.DataFrame, column: str, bands: dict[str, float]) -> np.ndarray:
    """0 healthy, 0.5 at the doctor's band, 1 at twice past it (NaN: nothing to judge)."""
    v = table[column].to_numpy(dtype=float) if column != "findings" else None
    e = table["num_experts"].to_numpy(dtype=float)
    if column == "findings":
        out = table["worst"].map(SEVERITY_BADNESS).to_numpy(dtype=float)
    elif column in ("cv", "gini"):
        out = v / (2 * bands[column])
    elif column == "max_violation":
        out = v / (2 * (bands["hot_factor"] - 1))
    elif column in ("balancedness", "ep_balancedness"):
        out = (1 - v) / (2 * (1 - 1 / bands["hot_factor"]))  # 0.5 where max = hot_factor x mean
    elif column == "norm_entropy":
        out = (1 - v) * 2
    elif column in ("dead", "near_dead"):
        out = (v / e) / (2 * bands["dead_fraction"])
    elif column == "hot":
        out = np.where(v > 0, 0.5 + v / e, 0.0)
    elif column == "aux_loss":
        k = table["top_k"].to_numpy(dtype=float)
        out = (v / k - 1) * 2.5  # k under uniform routing; 1.2 k reads as at the band
    else:
        out = np.zeros(len(table))
    return np.clip(out, 0.0, 1.0)


def cell_text(value: object, column: str) -> str:
    if column == "findings":
        return str(value)
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if column in ("dead", "near_dead", "hot", "tokens"):
        return f"{int(value):,}"
    return f"{float(value):.3f}"


def layer_health_figure(table: pd.DataFrame, bands: dict[str, float], order: str = "layer") -> go.Figure:
    """Layers x metrics heatmap of `table` (one row per layer: layer, num_experts, top_k,
    findings, worst and the metric columns), rows ordered by `order` (worst first)."""
    if table.empty:
        return empty_figure("no routing rows", "Layer health")
    columns = [c for c in HEALTH_COLUMNS if c in table.columns and table[c].notna().any()]
    if order != "layer" and order in columns:
        key = badness(table, order, bands)
        table = table.iloc[np.argsort(-np.nan_to_num(key, nan=-1), kind="stable")]
    else:
        table = table.sort_values("layer")
    z = np.column_stack([badness(table, c, bands) for c in columns])
    text = [[cell_text(row[c], c) for c in columns] for _, row in table.iterrows()]
    y = [layer_name(v) for v in table["layer"]]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[HEALTH_COLUMNS[c] for c in columns],
            y=y,
            text=text,
            texttemplate="%{text}",
            textfont={"size": 11},
            colorscale=HEALTH_SCALE,
            zmin=0,
            zmax=1,
            showscale=False,
            hovertemplate="%{y} · %{x}: %{text}<extra></extra>",
            xgap=1,
            ygap=1,
        )
    )
    fig.update_yaxes(type="category", autorange="reversed", categoryorder="array", categoryarray=y)
    fig.update_xaxes(side="top")
    fig.update_layout(
        height=max(220, 60 + 22 * len(table)),
        margin={"l": 60, "r": 10, "t": 60, "b": 10},
        title={"text": "Layer health (green: healthy, yellow: at the doctor's band, red: far past it)"},
        plot_bgcolor="#fff",
    )
    return fig

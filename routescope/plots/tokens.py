"""Tokens figure: expert lanes (token × layer, coloured by top-1 expert)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from routescope.plots.style import (
    all_nan,
    base_layout,
    empty_figure,
    expert_color,
    float_grid,
    hover_text,
    layer_name,
    tick_text,
)

MAX_TOKEN_LABELS = 80


def expert_lanes(lanes: pd.DataFrame, num_experts: int) -> go.Figure:
    """Token × layer grid coloured by the top-1 expert, all k choices and weights on hover.

    `lanes`: one row per (pos, layer) with `pos`, `layer`, `token` (display text), `experts`
    (list of expert ids by slot) and `weights` (list of weights, or None).
    """
    title = "Expert lanes"
    if lanes.empty:
        return empty_figure("no tokens in this window", title)
    positions = np.sort(lanes["pos"].unique())
    layers = np.sort(lanes["layer"].unique())
    rows = np.searchsorted(layers, lanes["layer"].to_numpy())
    cols = np.searchsorted(positions, lanes["pos"].to_numpy())
    z = np.full((len(layers), len(positions)), np.nan)
    hover = np.full((len(layers), len(positions)), "", dtype=object)
    weights = lanes["weights"] if "weights" in lanes.columns else [None] * len(lanes)
    for r, c, pos, layer, token, experts, w in zip(
        rows, cols, lanes["pos"], lanes["layer"], lanes["token"], lanes["experts"], weights
    ):
        z[r, c] = experts[0]
        if w is not None and len(w) == len(experts) and not all_nan(w):
            choice = " ".join(f"e{e}:{x:.2f}" for e, x in zip(experts, w))
        else:
            choice = " ".join(f"e{e}" for e in experts)
        hover[r, c] = f"{pos} {hover_text(token)}<br>{layer_name(layer)} {choice}"
    first = lanes.drop_duplicates("pos").set_index("pos")["token"]
    tokens = first.reindex(positions)
    # discrete colours: expert e takes EXPERT_PALETTE[e % 16] for the whole cell
    n = max(1, num_experts)
    scale = []
    for e in range(n):
        lo, hi = e / n, (e + 1) / n
        scale += [[lo, expert_color(e)], [hi, expert_color(e)]]
    fig = go.Figure(
        go.Heatmap(
            z=float_grid(z),
            x=list(range(len(positions))),
            y=[layer_name(v) for v in layers],
            text=hover,
            hovertemplate="%{text}<extra></extra>",
            colorscale=scale,
            zmin=-0.5,
            zmax=n - 0.5,
            xgap=1,
            ygap=2,
            colorbar={"title": {"text": "top-1 expert"}, "tickvals": list(range(0, n, max(1, n // 8)))},
        )
    )
    # at most ~80 labels, upright text rotated a quarter turn: labels never overlap or clip
    every = max(1, math.ceil(len(positions) / MAX_TOKEN_LABELS))
    shown = list(range(0, len(positions), every))
    fig.update_xaxes(
        tickmode="array",
        tickvals=shown,
        ticktext=[tick_text(tokens.iloc[i]) for i in shown],
        tickangle=-90,
        automargin=True,
        title="token" if every == 1 else f"token (every {ordinal(every)} labelled)",
    )
    fig.update_yaxes(title="MoE layer", type="category", autorange="reversed")
    fig = base_layout(fig, title, height=max(300, 190 + 26 * len(layers)))
    fig.update_layout(margin={"b": 110})
    return fig


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, ..., 11th, 12th, 13th, ..., 21st, 22nd, 23rd, 101st."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"

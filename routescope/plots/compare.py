"""Two-run figures: load change, balance A vs B, router saturation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from routescope.plots.load import balance_panels, balance_subplots
from routescope.plots.style import (
    BASELINE_COLOR,
    DIVERGING_SCALE,
    RUN_COLORS,
    base_layout,
    cell_marks,
    empty_figure,
    float_grid,
    hover_stack,
    layer_name,
    legend_on_top,
)


def load_delta_heatmap(load: pd.DataFrame) -> go.Figure:
    """Layer × expert share in run B minus run A, from `routescope.compare(a, b).load`."""
    title = "Load change (B − A)"
    if load.empty:
        return empty_figure("the runs have no (layer, expert) in common", title)
    df = load.fillna({"share_a": 0.0, "share_b": 0.0})
    if "share_delta" not in df.columns:
        df = df.assign(share_delta=df["share_b"] - df["share_a"])
    layers = sorted(df["layer"].unique())
    experts = sorted(df["expert"].unique())
    grid = df.pivot(index="layer", columns="expert", values=["share_delta", "share_a", "share_b"])
    delta = grid["share_delta"].reindex(index=layers, columns=experts).to_numpy(dtype=float)
    custom = hover_stack(
        grid["share_a"].reindex(index=layers, columns=experts).to_numpy(dtype=float),
        grid["share_b"].reindex(index=layers, columns=experts).to_numpy(dtype=float),
        digits=6,
    )
    bound = float(np.nanmax(np.abs(delta))) if np.isfinite(delta).any() else 0.0
    bound = bound or 1e-6
    fig = go.Figure(
        go.Heatmap(
            z=float_grid(delta),
            x=experts,
            y=[layer_name(v) for v in layers],
            customdata=custom,
            colorscale=DIVERGING_SCALE,
            zmid=0,
            zmin=-bound,
            zmax=bound,
            colorbar={"title": {"text": "Δ share"}},
            hovertemplate="%{y} expert %{x}<br>A %{customdata[0]:.4f} → B %{customdata[1]:.4f}"
            "<br>Δ %{z:+.4f}<extra></extra>",
        )
    )
    share_a = grid["share_a"].reindex(index=layers, columns=experts).to_numpy(dtype=float)
    share_b = grid["share_b"].reindex(index=layers, columns=experts).to_numpy(dtype=float)
    y = [layer_name(v) for v in layers]
    marks = [
        ("dead in A only (no token)", (share_a == 0) & (share_b > 0), "circle-open"),
        ("dead in B only (no token)", (share_b == 0) & (share_a > 0), "x-thin-open"),
        ("dead in both", (share_a == 0) & (share_b == 0), "square-open"),
    ]
    for trace in cell_marks(experts, y, marks):
        fig.add_trace(trace)
    span = [min(experts) - 0.5, max(experts) + 0.5]
    fig.update_xaxes(title="expert", dtick=1 if len(experts) <= 32 else None, range=span, zeroline=False)
    fig.update_yaxes(title="MoE layer", type="category", autorange="reversed", zeroline=False)
    legend_on_top(fig)
    return base_layout(fig, title, height=max(320, 90 + 22 * len(layers)))


def balance_change_figure(balance: pd.DataFrame) -> go.Figure:
    """The four balance metrics per layer, each on its own axis, run A dashed and run B solid
    (`compare(a, b).balance`)."""
    title = "Balance, run A (dashed) vs run B (solid)"
    if balance.empty:
        return empty_figure("the runs have no MoE layer in common", title)
    df = balance.assign(layer_name=[layer_name(v) for v in balance["layer"]])
    series = [("run A", df, "_a", {"dash": "dash"}), ("run B", df, "_b", {"dash": "solid"})]
    fig = balance_panels(balance_subplots(), series, "layer_name")
    fig.update_xaxes(type="category")
    legend_on_top(fig, y=1.1)
    fig = base_layout(fig, title, height=540)
    fig.update_layout(margin={"t": 90})
    return fig


def saturation_figure(saturation: pd.DataFrame) -> go.Figure:
    """Router saturation per layer (`compare(a, b).saturation`): top-k overlap, top-1 agreement
    and exact agreement of the top-k sets."""
    title = "Router saturation"
    if saturation.empty or not saturation["tokens_matched"].fillna(0).astype(int).any():
        return empty_figure("no token appears in both runs (same sequence, position and token id)", title)
    x = [layer_name(v) for v in saturation["layer"]]
    fig = go.Figure()
    fig.add_trace(
        go.Bar(
            x=x,
            y=saturation["saturation"],
            name="saturation (top-k overlap)",
            marker_color=RUN_COLORS[0],
            customdata=np.column_stack([saturation["tokens_matched"], saturation["top_k"]]),
            hovertemplate="%{x}<br>saturation %{y:.3f}<br>over %{customdata[0]:,} tokens, k = %{customdata[1]}"
            "<extra></extra>",
        )
    )
    fig.add_trace(
        go.Bar(
            x=x,
            y=saturation["top1_agreement"],
            name="top-1 agreement",
            marker_color=RUN_COLORS[1],
            hovertemplate="%{x}<br>top-1 agreement %{y:.3f}<extra></extra>",
        )
    )
    if "exact_match" in saturation.columns:
        fig.add_trace(
            go.Bar(
                x=x,
                y=saturation["exact_match"],
                name="exact top-k match",
                marker_color=BASELINE_COLOR,
                hovertemplate="%{x}<br>same top-k set for %{y:.3f} of the tokens<extra></extra>",
            )
        )
    fig.update_layout(barmode="group")
    fig.update_xaxes(title="MoE layer", type="category")
    fig.update_yaxes(title="fraction", range=[0, 1.02])
    return base_layout(fig, title, height=320)

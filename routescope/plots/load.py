"""Load and balance figures: balance per layer, layer × expert heatmap, one layer's bars, co-activation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from routescope.plots.style import (
    BASELINE_COLOR,
    DIVERGING_SCALE,
    LIFT_LOG2_RANGE,
    MAGNITUDE_SCALE,
    METRIC_COLORS,
    STATE_COLORS,
    base_layout,
    empty_figure,
    float_grid,
    hover_stack,
    int_counts,
    layer_name,
    lift_colorbar,
    log2_lift,
    with_lift,
)


def balance_figure(balance: pd.DataFrame) -> go.Figure:
    """cv, max_violation, balancedness and norm_entropy across layers (run.balance())."""
    if balance.empty:
        return empty_figure("no routing rows", "Load balance per layer")
    fig = go.Figure()
    x = [layer_name(v) for v in balance["layer"]]
    for metric in ("cv", "max_violation", "balancedness", "norm_entropy"):
        fig.add_trace(
            go.Scatter(
                x=x,
                y=balance[metric],
                name=metric,
                mode="lines+markers",
                line={"color": METRIC_COLORS[metric]},
                hovertemplate=f"{metric} %{{y:.3f}}<extra>%{{x}}</extra>",
            )
        )
    fig.update_xaxes(title="MoE layer", type="category")
    fig.update_yaxes(title="value", rangemode="tozero")
    return base_layout(fig, "Load balance per layer", height=360)


def load_heatmap(load: pd.DataFrame, value: str = "lift") -> go.Figure:
    """Layer × expert heatmap of share (Viridis) or lift (log2, diverging) from run.expert_load()."""
    if value not in ("share", "lift"):
        raise ValueError(f"value={value!r} is not allowed; use 'share' or 'lift'")
    if load.empty:
        return empty_figure("no routing rows", "Expert load")
    df = with_lift(load)
    layers = sorted(df["layer"].unique())
    experts = sorted(df["expert"].unique())
    grid = df.pivot(index="layer", columns="expert", values=["share", "lift", "tokens"]).reindex(
        index=layers, columns=pd.MultiIndex.from_product([["share", "lift", "tokens"], experts])
    )
    share, lift, tokens = grid["share"].to_numpy(), grid["lift"].to_numpy(), grid["tokens"].to_numpy()
    custom = hover_stack(share, lift, tokens)
    y = [layer_name(v) for v in layers]
    hover = "%{y} expert %{x}<br>share %{customdata[0]:.4f}<br>lift %{customdata[1]:.2f}<br>tokens %{customdata[2]:,}<extra></extra>"
    if value == "share":
        trace = go.Heatmap(
            z=float_grid(share),
            x=experts,
            y=y,
            customdata=custom,
            colorscale=MAGNITUDE_SCALE,
            zmin=0,
            colorbar={"title": {"text": "share"}},
            hovertemplate=hover,
        )
    else:
        trace = go.Heatmap(
            z=float_grid(log2_lift(lift)),
            x=experts,
            y=y,
            customdata=custom,
            colorscale=DIVERGING_SCALE,
            zmid=0,
            zmin=-LIFT_LOG2_RANGE,
            zmax=LIFT_LOG2_RANGE,
            colorbar=lift_colorbar(),
            hovertemplate=hover,
        )
    fig = go.Figure(trace)
    fig.update_xaxes(title="expert", dtick=1 if len(experts) <= 32 else None)
    fig.update_yaxes(title="MoE layer", type="category", autorange="reversed")
    return base_layout(fig, f"Expert load ({value})", height=max(300, 60 + 22 * len(layers)))


def expert_bars(load: pd.DataFrame, layer: int, hot_factor: float = 2.0) -> go.Figure:
    """Per-expert share for one layer with the uniform line; hot and dead experts coloured."""
    df = load[load["layer"] == layer].sort_values("expert")
    if df.empty:
        return empty_figure(f"no routing rows for layer {layer}", "Experts of one layer")
    num = len(df)
    uniform = 1.0 / num
    state = np.where(
        df["tokens"] == 0, "dead", np.where(df["share"] >= hot_factor * uniform, "hot", "normal")
    )
    fig = go.Figure(
        go.Bar(
            x=df["expert"],
            y=df["share"],
            marker_color=[STATE_COLORS[s] for s in state],
            customdata=np.column_stack([df["tokens"], df["share"] * num, state]),
            hovertemplate="expert %{x}<br>share %{y:.4f}<br>lift %{customdata[1]:.2f}<br>"
            "tokens %{customdata[0]:,}<br>%{customdata[2]}<extra></extra>",
        )
    )
    fig.add_hline(y=uniform, line_dash="dash", line_color=BASELINE_COLOR, annotation_text="uniform 1/E")
    fig.update_xaxes(title="expert", dtick=1 if num <= 32 else None)
    fig.update_yaxes(title="share", rangemode="tozero")
    return base_layout(fig, f"Experts of layer {layer}", height=320)


def coactivation_heatmap(co: pd.DataFrame, num_experts: int, layer: int | None = None) -> go.Figure:
    """P(b | a) for pairs of experts chosen for the same token (run.coactivation(layer))."""
    title = "Co-activation" + (f" in layer {layer}" if layer is not None else "")
    if co.empty:
        return empty_figure("no token chose two experts here (top-1 routing?)", title)
    experts = list(range(num_experts))
    grid = co.pivot(index="expert_a", columns="expert_b", values="p_b_given_a").reindex(
        index=experts, columns=experts
    )
    counts = co.pivot(index="expert_a", columns="expert_b", values="count").reindex(
        index=experts, columns=experts
    )
    fig = go.Figure(
        go.Heatmap(
            z=float_grid(grid.to_numpy(dtype=float)),
            x=experts,
            y=experts,
            customdata=int_counts(counts.to_numpy()),
            colorscale=MAGNITUDE_SCALE,
            zmin=0,
            zmax=1,
            colorbar={"title": {"text": "P(b|a)"}},
            hovertemplate="a = %{y}, b = %{x}<br>P(b|a) %{z:.3f}<br>count %{customdata:,}<extra></extra>",
        )
    )
    fig.update_xaxes(title="expert b", dtick=1 if num_experts <= 32 else None)
    fig.update_yaxes(title="expert a", autorange="reversed", dtick=1 if num_experts <= 32 else None)
    return base_layout(fig, title, height=380)

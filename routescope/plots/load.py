"""Load and balance figures: balance per layer, layer × expert heatmap, one layer's bars, co-activation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from routescope.plots.style import (
    BALANCE_METRICS,
    BASELINE_COLOR,
    DEAD_COLOR,
    DIVERGING_SCALE,
    LIFT_LOG2_RANGE,
    MAGNITUDE_SCALE,
    METRIC_COLORS,
    NEAR_DEAD_LIFT,
    STATE_COLORS,
    base_layout,
    dead_cell_traces,
    empty_figure,
    expert_state,
    float_grid,
    hover_stack,
    int_counts,
    layer_name,
    legend_on_top,
    lift_colorbar,
    log2_lift,
    with_lift,
)


def balance_panels(
    fig: go.Figure, series: list[tuple[str, pd.DataFrame, str, dict]], x_col: str
) -> go.Figure:
    """Draw every balance metric on its own axis (2 x 2 panels): `series` is a list of
    (name, frame with `x_col` and the metric columns, metric-column suffix, line style)."""
    for i, (metric, even, _better) in enumerate(BALANCE_METRICS):
        row, col = divmod(i, 2)
        for name, df, suffix, line in series:
            column = metric + suffix
            if column not in df.columns:
                continue
            fig.add_trace(
                go.Scatter(
                    x=df[x_col],
                    y=df[column],
                    name=name,
                    mode="lines+markers",
                    line={"color": METRIC_COLORS[metric], **line},
                    legendgroup=name,
                    showlegend=i == 0 and bool(name),
                    hovertemplate=f"{metric} %{{y:.3f}}<extra>%{{x}} {name}</extra>",
                ),
                row=row + 1,
                col=col + 1,
            )
        fig.add_hline(y=even, line_dash="dot", line_color=BASELINE_COLOR, row=row + 1, col=col + 1)
    return fig


def balance_subplots() -> go.Figure:
    titles = [f"{metric} (even = {even:g}, {better})" for metric, even, better in BALANCE_METRICS]
    return make_subplots(
        rows=2, cols=2, subplot_titles=titles, horizontal_spacing=0.08, vertical_spacing=0.16
    )


def balance_figure(balance: pd.DataFrame) -> go.Figure:
    """cv, max_violation, balancedness and norm_entropy across layers (run.balance()), each on its own axis."""
    if balance.empty:
        return empty_figure("no routing rows", "Load balance per layer")
    df = balance.assign(layer_name=[layer_name(v) for v in balance["layer"]])
    fig = balance_panels(balance_subplots(), [("", df, "", {})], "layer_name")
    fig.update_xaxes(type="category")
    fig.update_layout(showlegend=False)
    return base_layout(fig, "Load balance per layer (dotted: an even load)", height=480)


def load_grid(
    load: pd.DataFrame, index: str = "layer"
) -> tuple[list, list, np.ndarray, np.ndarray, np.ndarray]:
    """(rows, experts, share, lift, tokens) grids of expert_load-shaped rows, rows keyed by `index`."""
    df = with_lift(load) if index == "layer" else load
    rows = sorted(df[index].unique())
    experts = sorted(df["expert"].unique())
    grid = df.pivot(index=index, columns="expert", values=["share", "lift", "tokens"]).reindex(
        index=rows, columns=pd.MultiIndex.from_product([["share", "lift", "tokens"], experts])
    )
    return (
        rows,
        experts,
        grid["share"].to_numpy(float),
        grid["lift"].to_numpy(float),
        grid["tokens"].to_numpy(float),
    )


def load_trace(
    x: list, y: list, share: np.ndarray, lift: np.ndarray, tokens: np.ndarray, value: str, hover: str
) -> go.Heatmap:
    """A share (Viridis) or lift (log2, diverging) heatmap; dead cells (no token) are left
    empty so the dark plot background shows through them."""
    dead = np.nan_to_num(tokens, nan=-1) == 0
    custom = hover_stack(share, lift, tokens)
    common = {"x": x, "y": y, "customdata": custom, "hovertemplate": hover, "hoverongaps": False}
    if value == "share":
        return go.Heatmap(
            z=float_grid(np.where(dead, np.nan, share)),
            colorscale=MAGNITUDE_SCALE,
            zmin=0,
            colorbar={"title": {"text": "share"}},
            **common,
        )
    return go.Heatmap(
        z=float_grid(np.where(dead, np.nan, log2_lift(lift))),
        colorscale=DIVERGING_SCALE,
        zmid=0,
        zmin=-LIFT_LOG2_RANGE,
        zmax=LIFT_LOG2_RANGE,
        colorbar=lift_colorbar(),
        **common,
    )


def load_heatmap(load: pd.DataFrame, value: str = "lift") -> go.Figure:
    """Layer × expert heatmap of share (Viridis) or lift (log2, diverging) from run.expert_load();
    dead experts are black cells with a white ×, near-dead ones carry an open circle."""
    if value not in ("share", "lift"):
        raise ValueError(f"value={value!r} is not allowed; use 'share' or 'lift'")
    if load.empty:
        return empty_figure("no routing rows", "Expert load")
    layers, experts, share, lift, tokens = load_grid(load)
    y = [layer_name(v) for v in layers]
    hover = (
        "%{y} expert %{x}<br>share %{customdata[0]:.4f} of the layer's slots<br>lift %{customdata[1]:.2f}"
        "<br>%{customdata[2]:,} tokens routed here<extra></extra>"
    )
    fig = go.Figure(load_trace(experts, y, share, lift, tokens, value, hover))
    for trace in dead_cell_traces(experts, y, tokens, lift, dead_color="#ffffff"):
        fig.add_trace(trace)
    fig.update_layout(plot_bgcolor=DEAD_COLOR)
    span = [min(experts) - 0.5, max(experts) + 0.5]  # the markers must not widen the axis past the cells
    fig.update_xaxes(
        title="expert", dtick=1 if len(experts) <= 32 else None, showgrid=False, zeroline=False, range=span
    )
    fig.update_yaxes(title="MoE layer", type="category", autorange="reversed", showgrid=False, zeroline=False)
    legend_on_top(fig)
    return base_layout(fig, f"Expert load ({value})", height=max(320, 90 + 22 * len(layers)))


def expert_bars(load: pd.DataFrame, layer: int, hot_factor: float = 2.0) -> go.Figure:
    """Per-expert share for one layer with the uniform line; hot, near-dead and dead experts
    coloured, dead ones marked with a × on the axis (their bar has no height)."""
    df = load[load["layer"] == layer].sort_values("expert")
    if df.empty:
        return empty_figure(f"no routing rows for layer {layer}", "Experts of one layer")
    num = len(df)
    uniform = 1.0 / num
    state = expert_state(df["tokens"].to_numpy(), df["share"].to_numpy(), num, hot_factor)
    fig = go.Figure(
        go.Bar(
            x=df["expert"],
            y=df["share"],
            name="share",
            showlegend=False,
            marker_color=[STATE_COLORS[s] for s in state],
            customdata=np.column_stack([df["tokens"], df["share"] * num, state]),
            hovertemplate="expert %{x}<br>share %{y:.4f} of the layer's slots<br>lift %{customdata[1]:.2f}<br>"
            "%{customdata[0]:,} tokens routed here<br>%{customdata[2]}<extra></extra>",
        )
    )
    dead = df[state == "dead"]
    if len(dead):
        fig.add_trace(
            go.Scatter(
                x=dead["expert"],
                y=[0.02 * float(df["share"].max() or 1.0)] * len(dead),
                mode="markers",
                name=f"dead ({len(dead)}): no token",
                marker={"symbol": "x", "color": DEAD_COLOR, "size": 12},
                hovertemplate="expert %{x}<br>dead: no token routed here<extra></extra>",
            )
        )
    near = int((state == "near-dead").sum())
    if near:  # a legend entry for the near-dead colour
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                name=f"near-dead ({near}): ≤ {NEAR_DEAD_LIFT:g} × uniform",
                marker={"symbol": "square", "color": STATE_COLORS["near-dead"], "size": 10},
            )
        )
    fig.add_hline(y=uniform, line_dash="dash", line_color=BASELINE_COLOR, annotation_text="uniform 1/E")
    fig.update_xaxes(title="expert", dtick=1 if num <= 32 else None, range=[-0.5, num - 0.5])
    fig.update_yaxes(title="share of the layer's slots", rangemode="tozero")
    legend_on_top(fig)
    return base_layout(fig, f"Experts of layer {layer}", height=340)


def coactivation_heatmap(
    co: pd.DataFrame, num_experts: int, layer: int | None = None, note: str | None = None
) -> go.Figure:
    """P(b | a) for pairs of experts chosen for the same token (run.coactivation(layer));
    `note` (what the pairs were counted over) goes under the title."""
    title = "Co-activation" + (f" in layer {layer}" if layer is not None else "")
    title += f"<br><sup>{note}</sup>" if note else ""
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
    fig = base_layout(fig, title, height=380)
    return fig.update_layout(margin={"t": 80}) if note else fig

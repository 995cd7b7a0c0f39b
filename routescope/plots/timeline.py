"""Figures over time and ranks: one layer's expert × step heatmap, the balance metrics of
every layer over steps, and the per-rank load of one layer side by side."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from routescope.plots.load import balance_panels, balance_subplots, load_trace
from routescope.plots.style import (
    DEAD_COLOR,
    EXPERT_PALETTE,
    base_layout,
    empty_figure,
    layer_name,
    legend_on_top,
)


def step_heatmap(
    steps: pd.DataFrame, layer: int, num_experts: int, value: str = "lift", axis: str = "forward step"
) -> go.Figure:
    """Expert × step-bin load of one layer: `steps` has step_lo, step_hi, layer, expert, tokens,
    share (within the bin and layer) and lift (share × E). Dead cells are black."""
    if value not in ("share", "lift"):
        raise ValueError(f"value={value!r} is not allowed; use 'share' or 'lift'")
    title = f"Expert load over steps, layer {layer}"
    df = steps[steps["layer"] == layer]
    if df.empty:
        return empty_figure(f"no routing rows for layer {layer}", title)
    bins = df.drop_duplicates("step_lo").sort_values("step_lo")
    x = [f"{lo}" if lo == hi else f"{lo}–{hi}" for lo, hi in zip(bins["step_lo"], bins["step_hi"])]
    experts = list(range(num_experts))
    grid = df.pivot(index="expert", columns="step_lo", values=["share", "lift", "tokens"])
    cols = pd.MultiIndex.from_product([["share", "lift", "tokens"], bins["step_lo"].tolist()])
    grid = grid.reindex(index=experts, columns=cols)
    share, lift, tokens = (grid[v].to_numpy(float) for v in ("share", "lift", "tokens"))
    hover = (
        "steps %{x}<br>expert %{y}<br>share %{customdata[0]:.4f} of the bin's slots<br>"
        "lift %{customdata[1]:.2f}<br>%{customdata[2]:,} tokens routed here<extra></extra>"
    )
    fig = go.Figure(load_trace(x, experts, share, lift, tokens, value, hover))
    fig.update_layout(plot_bgcolor=DEAD_COLOR)
    fig.update_xaxes(title=f"{axis} (binned)", type="category", showgrid=False, zeroline=False)
    fig.update_yaxes(
        title="expert",
        autorange="reversed",
        showgrid=False,
        zeroline=False,
        dtick=1 if num_experts <= 32 else None,
    )
    return base_layout(fig, title, height=max(320, 110 + 14 * num_experts))


MAX_COLOURED_LAYERS = 8  # more layers than this: one highlighted, the rest grey


def balance_over_steps_figure(
    balance: pd.DataFrame, highlight: int | None = None, axis: str = "forward step"
) -> go.Figure:
    """cv, max_violation, balancedness, norm_entropy per step bin (`step_lo`), each metric on
    its own axis. Up to MAX_COLOURED_LAYERS layers get a line and colour each; with more,
    `highlight` (default: the first layer) is drawn in colour over the others in thin grey,
    which stay one trace per metric however many layers there are."""
    title = "Balance over steps"
    if balance.empty:
        return empty_figure("no routing rows", title)
    layers = sorted(balance["layer"].unique())
    series = []
    if len(layers) <= MAX_COLOURED_LAYERS:
        for i, layer in enumerate(layers):
            df = balance[balance["layer"] == layer].sort_values("step_lo")
            color = EXPERT_PALETTE[i % len(EXPERT_PALETTE)]
            series.append((layer_name(layer), df, "", {"color": color, "width": 1.5}))
    else:
        chosen = highlight if highlight in layers else layers[0]
        rest = balance[balance["layer"] != chosen].sort_values(["layer", "step_lo"], kind="stable")
        rest = rest.reset_index(drop=True)
        last = rest.groupby("layer", sort=False).tail(1).index  # after each layer's rows, a NaN
        gaps = pd.DataFrame(np.nan, index=last + 0.5, columns=rest.columns)  # row breaks the line
        others = pd.concat([rest, gaps]).sort_index(kind="stable").reset_index(drop=True)
        series.append(("other layers", others, "", {"color": "#c8c8c8", "width": 1}))
        df = balance[balance["layer"] == chosen].sort_values("step_lo")
        series.append((layer_name(chosen), df, "", {"color": EXPERT_PALETTE[0], "width": 2.5}))
    fig = balance_panels(balance_subplots(), series, "step_lo")
    for trace in fig.data:  # balance_panels colours by metric; here the layers need telling apart
        for name, _df, _s, line in series:
            if trace.name == name:
                trace.marker.color = line["color"]
                if name == "other layers":
                    trace.mode = "lines"
    fig.update_xaxes(title_text=axis)
    legend_on_top(fig, y=1.1)
    fig = base_layout(fig, title, height=560)
    fig.update_layout(margin={"t": 90})
    return fig


def rank_load_figure(load: pd.DataFrame, layer: int) -> go.Figure:
    """Share of one layer's slots per expert on each rank, ranks side by side (grouped bars):
    `load` has rank, layer, expert, tokens, share (within rank and layer)."""
    title = f"Load per rank, layer {layer}"
    df = load[load["layer"] == layer]
    if df.empty:
        return empty_figure(f"no routing rows for layer {layer}", title)
    fig = go.Figure()
    for i, (rank, part) in enumerate(df.groupby("rank", sort=True)):
        part = part.sort_values("expert")
        fig.add_trace(
            go.Bar(
                x=part["expert"],
                y=part["share"],
                name=f"rank {rank} ({int(part['tokens'].sum()):,} slots)",
                marker_color=EXPERT_PALETTE[i % len(EXPERT_PALETTE)],
                customdata=part["tokens"],
                hovertemplate=f"rank {rank}<br>expert %{{x}}<br>share %{{y:.4f}}<br>"
                "%{customdata:,} tokens routed here<extra></extra>",
            )
        )
    num = int(df["expert"].max()) + 1
    fig.add_hline(y=1.0 / max(1, num), line_dash="dash", line_color="#7f7f7f", annotation_text="uniform 1/E")
    fig.update_layout(barmode="group")
    fig.update_xaxes(title="expert", dtick=1 if num <= 32 else None)
    fig.update_yaxes(title="share of the rank's slots", rangemode="tozero")
    legend_on_top(fig)
    return base_layout(fig, title, height=340)

"""Specialization figures: label × expert lift, repetition rate."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from routescope.plots.style import (
    BASELINE_COLOR,
    DEAD_COLOR,
    DIVERGING_SCALE,
    LIFT_LOG2_RANGE,
    METRIC_COLORS,
    base_layout,
    empty_figure,
    float_grid,
    hover_stack,
    layer_name,
    lift_colorbar,
    log2_lift,
    plain_text,
)


def specialization_heatmap(spec: pd.DataFrame, label: str, layer: int, max_values: int = 40) -> go.Figure:
    """Label value × expert lift for one layer, from run.specialization(by=label)."""
    title = f"Lift by {label} in layer {layer}"
    df = spec[spec["layer"] == layer]
    if df.empty:
        return empty_figure(f"no tokens carry the label {label!r}", title)
    df = df.assign(**{label: df[label].astype(str)})
    if "tokens" in df.columns:  # the most frequent values first, when there are too many to draw
        values = df.groupby(label)["tokens"].sum().sort_values(ascending=False).index[:max_values]
        values = sorted(values)
    else:
        values = sorted(df[label].unique())[:max_values]
    experts = sorted(df["expert"].unique())
    lift = df.pivot(index=label, columns="expert", values="lift").reindex(index=values, columns=experts)
    share = df.pivot(index=label, columns="expert", values="share").reindex(index=values, columns=experts)
    z = log2_lift(lift.to_numpy(dtype=float))
    if "tokens" in df.columns:  # no token of this value went to the expert: a black cell, not deep blue
        tokens = df.pivot(index=label, columns="expert", values="tokens").reindex(
            index=values, columns=experts
        )
        z = np.where(tokens.to_numpy(dtype=float) == 0, np.nan, z)
    fig = go.Figure(
        go.Heatmap(
            z=float_grid(z),
            hoverongaps=False,
            x=experts,
            y=[plain_text(v) for v in values],
            customdata=hover_stack(lift.to_numpy(dtype=float), share.to_numpy(dtype=float)),
            colorscale=DIVERGING_SCALE,
            zmid=0,
            zmin=-LIFT_LOG2_RANGE,
            zmax=LIFT_LOG2_RANGE,
            colorbar=lift_colorbar(),
            hovertemplate=f"{label} %{{y}}<br>expert %{{x}}<br>lift %{{customdata[0]:.2f}}"
            "<br>share %{customdata[1]:.4f}<extra></extra>",
        )
    )
    fig.update_layout(plot_bgcolor=DEAD_COLOR)
    fig.update_xaxes(title="expert", dtick=1 if len(experts) <= 32 else None, showgrid=False, zeroline=False)
    fig.update_yaxes(title=label, type="category", autorange="reversed", showgrid=False, zeroline=False)
    return base_layout(fig, title, height=max(260, 80 + 26 * len(values)))


def repetition_figure(rep: pd.DataFrame) -> go.Figure:
    """Repetition rate per layer (same top-1 expert for consecutive tokens) against 1/E."""
    if rep.empty:
        return empty_figure("no consecutive token pairs", "Repetition rate")
    rate_col = "repetition_rate" if "repetition_rate" in rep.columns else "rate"
    base_col = next((c for c in ("baseline", "uniform_baseline", "baseline_rate") if c in rep.columns), None)
    x = [layer_name(v) for v in rep["layer"]]
    fig = go.Figure(
        go.Bar(
            x=x,
            y=rep[rate_col],
            name="repetition rate",
            marker_color=METRIC_COLORS["norm_entropy"],
            hovertemplate="%{x}<br>repetition rate %{y:.3f}<extra></extra>",
        )
    )
    if base_col is not None:
        fig.add_trace(
            go.Bar(
                x=x,
                y=rep[base_col],
                name="uniform baseline (1/E)",
                marker_color=BASELINE_COLOR,
                hovertemplate="%{x}<br>baseline %{y:.3f}<extra></extra>",
            )
        )
    fig.update_layout(barmode="group")
    fig.update_xaxes(title="MoE layer", type="category")
    fig.update_yaxes(title="fraction of consecutive pairs", rangemode="tozero")
    return base_layout(fig, "Repetition rate", height=320)

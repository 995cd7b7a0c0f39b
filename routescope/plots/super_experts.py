"""Super Experts figures: expert output maxima with thresholds, residual-stream massive activations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from routescope.plots.style import (
    BASELINE_COLOR,
    METRIC_COLORS,
    STATE_COLORS,
    base_layout,
    empty_figure,
    layer_name,
)


def super_expert_scatter(
    acts: pd.DataFrame, percentile_threshold: float | None = None, max_threshold: float | None = None
) -> go.Figure:
    """max_abs_output per (layer, expert) on a log axis with the two Super Expert thresholds."""
    title = "Expert output maxima"
    if acts.empty:
        return empty_figure("no calibration rows", title)
    fig = go.Figure()
    df = acts.copy()
    is_super = df["is_super"].astype(bool) if "is_super" in df.columns else pd.Series(False, index=df.index)
    shared = df["shared"].astype(bool) if "shared" in df.columns else pd.Series(False, index=df.index)
    # spread the experts of a layer across its slot so the points do not overlap
    per_layer = df.groupby("layer")["expert"].transform("max").clip(lower=1)
    df["x"] = df["layer"] + 0.7 * (df["expert"] / per_layer - 0.5)
    for name, mask, color, symbol in (
        ("routed expert", ~is_super & ~shared, STATE_COLORS["normal"], "circle"),
        ("shared expert", ~is_super & shared, METRIC_COLORS["aux_loss"], "diamond"),
        ("Super Expert", is_super, STATE_COLORS["super"], "star"),
    ):
        part = df[mask]
        if part.empty:
            continue
        fig.add_trace(
            go.Scatter(
                x=part["x"],
                y=part["max_abs_output"],
                mode="markers",
                name=name,
                marker={"color": color, "symbol": symbol, "size": 11 if name == "Super Expert" else 7},
                customdata=np.column_stack([part["layer"], part["expert"]]),
                hovertemplate="layer %{customdata[0]} expert %{customdata[1]}<br>max |output| %{y:.4g}"
                "<extra>" + name + "</extra>",
            )
        )
    lo, hi = float(df["x"].min()) - 0.5, float(df["x"].max()) + 0.5
    for value, text, dash in (
        (percentile_threshold, "99.5th percentile", "dash"),
        (max_threshold, "max / 10", "dot"),
    ):
        if value is not None and value > 0:
            fig.add_trace(_threshold_line(lo, hi, value, text, dash))
    fig.update_xaxes(title="decoder layer", dtick=1)
    fig.update_yaxes(title="max |down_proj output|", type="log")
    return base_layout(fig, title, height=420)


def _threshold_line(x0: float, x1: float, y: float, name: str, dash: str) -> go.Scatter:
    return go.Scatter(
        x=[x0, x1],
        y=[y, y],
        mode="lines",
        name=f"{name} ({y:.3g})",
        line={"color": BASELINE_COLOR, "dash": dash},
        hovertemplate=f"{name}: {y:.4g}<extra></extra>",
    )


def massive_activation_figure(hidden: pd.DataFrame, abs_threshold: float = 100.0) -> go.Figure:
    """Per decoder layer: max |hidden| against median |hidden|, with the 100 threshold."""
    title = "Massive activations in the residual stream"
    if hidden.empty:
        return empty_figure("no hidden-state statistics", title)
    x = [layer_name(v) for v in hidden["layer"]]
    ratio = hidden["max_abs"] / hidden["median_abs"].where(hidden["median_abs"] > 0)
    fig = go.Figure()
    fig.add_trace(
        go.Bar(
            x=x,
            y=hidden["max_abs"],
            name="max |h|",
            marker_color=METRIC_COLORS["cv"],
            customdata=np.column_stack([hidden["channel"], ratio.fillna(0)]),
            hovertemplate="%{x}<br>max |h| %{y:.4g}<br>channel %{customdata[0]}<br>"
            "max / median %{customdata[1]:.3g}<extra></extra>",
        )
    )
    fig.add_trace(
        go.Bar(
            x=x,
            y=hidden["median_abs"],
            name="median |h|",
            marker_color=METRIC_COLORS["norm_entropy"],
            hovertemplate="%{x}<br>median |h| %{y:.4g}<extra></extra>",
        )
    )
    # a threshold trace, not add_hline: hline annotations misplace themselves on log axes
    fig.add_trace(
        go.Scatter(
            x=[x[0], x[-1]],
            y=[abs_threshold, abs_threshold],
            mode="lines",
            name=f"|h| = {abs_threshold:g}",
            line={"color": BASELINE_COLOR, "dash": "dash"},
            hoverinfo="skip",
        )
    )
    fig.update_layout(barmode="group")
    fig.update_xaxes(title="decoder layer", type="category")
    fig.update_yaxes(title="|hidden state|", type="log")
    return base_layout(fig, title, height=360)

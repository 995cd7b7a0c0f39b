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

MASSIVE_COLOR = "#8b0000"  # a layer whose residual stream meets the massive-activation rule
LIGHT_MAX_COLOR = "#f4a6a6"


def super_expert_scatter(
    acts: pd.DataFrame,
    percentile_threshold: float | None = None,
    max_threshold: float | None = None,
    searched_layers: list[int] | None = None,
    label_top: int = 3,
) -> go.Figure:
    """max_abs_output per (layer, expert) on a log axis with the two Super Expert thresholds.

    Points sit at their layer (no jitter); the `label_top` largest experts of each layer and
    every Super Expert are labelled `e<id>` (shared experts `s<id>`). The searched layers are
    shaded. A star is drawn exactly where `is_super` holds, i.e. where the stated rule is met.
    """
    title = "Expert output maxima"
    if acts.empty:
        return empty_figure("no calibration rows", title)
    fig = go.Figure()
    df = acts.copy()
    is_super = df["is_super"].astype(bool) if "is_super" in df.columns else pd.Series(False, index=df.index)
    shared = df["shared"].astype(bool) if "shared" in df.columns else pd.Series(False, index=df.index)
    rank = df.groupby("layer")["max_abs_output"].rank(ascending=False, method="first")
    df["name"] = np.where(shared, "s", "e") + df["expert"].astype(str)
    df["text"] = np.where((rank <= label_top) | is_super, df["name"], "")
    ratio = df["ratio_to_median"] if "ratio_to_median" in df.columns else pd.Series(np.nan, index=df.index)
    df["ratio"] = ratio.astype(float).fillna(0.0)
    for name, mask, color, symbol in (
        ("routed expert", ~is_super & ~shared, STATE_COLORS["normal"], "circle"),
        ("shared expert", ~is_super & shared, METRIC_COLORS["aux_loss"], "diamond"),
        ("Super Expert (rule met)", is_super, STATE_COLORS["super"], "star"),
    ):
        part = df[mask]
        if part.empty:
            continue
        fig.add_trace(
            go.Scatter(
                x=part["layer"],
                y=part["max_abs_output"],
                mode="markers",
                name=name,
                marker={"color": color, "symbol": symbol, "size": 14 if is_super[mask].any() else 7},
                customdata=np.column_stack([part["name"], part["ratio"]]),
                hovertemplate="layer %{x} expert %{customdata[0]}<br>max |output| %{y:.4g}"
                "<br>%{customdata[1]:.3g} × the median<extra>" + name + "</extra>",
            )
        )
    labelled = df[df["text"] != ""]
    if len(labelled):  # labels in their own text trace, beside their points
        fig.add_trace(
            go.Scatter(
                x=labelled["layer"].astype(float).tolist(),
                y=labelled["max_abs_output"].astype(float).tolist(),
                mode="text",
                text=["\u2003" + s for s in labelled["text"]],  # an em space clears the marker
                textposition="middle right",
                textfont={"size": 10, "color": "#333"},
                showlegend=False,
                hoverinfo="skip",
            )
        )
    lo, hi = float(df["layer"].min()) - 0.5, float(df["layer"].max()) + 0.5
    if searched_layers:
        fig.add_vrect(
            x0=min(searched_layers) - 0.45,
            x1=max(searched_layers) + 0.45,
            fillcolor="#f2e8c9",
            opacity=0.5,
            line_width=0,
            layer="below",
            annotation_text="searched layers",
            annotation_position="top left",
        )
    for value, text, dash in (
        (percentile_threshold, "99.5th percentile", "dash"),
        (max_threshold, "max / 10", "dot"),
    ):
        if value is not None and value > 0:
            fig.add_trace(_threshold_line(lo, hi, value, text, dash))
    fig.update_xaxes(title="decoder layer", dtick=1, range=[lo, hi + 0.3])
    fig.update_yaxes(title="max |down_proj output|", type="log")
    return base_layout(fig, title, height=440)


def _threshold_line(x0: float, x1: float, y: float, name: str, dash: str) -> go.Scatter:
    return go.Scatter(
        x=[x0, x1],
        y=[y, y],
        mode="lines",
        name=f"{name} ({y:.3g})",
        line={"color": BASELINE_COLOR, "dash": dash},
        hovertemplate=f"{name}: {y:.4g}<extra></extra>",
    )


def massive_activation_figure(
    hidden: pd.DataFrame, abs_threshold: float = 100.0, median_ratio: float = 1000.0
) -> go.Figure:
    """Per decoder layer: max |hidden| against median |hidden|, with the |h| = 100 line; the
    bars of layers meeting the massive-activation rule (> abs_threshold and > median_ratio ×
    median) are dark red and say so, the others light red."""
    title = "Massive activations in the residual stream"
    if hidden.empty:
        return empty_figure("no hidden-state statistics", title)
    x = [layer_name(v) for v in hidden["layer"]]
    ratio = hidden["max_abs"] / hidden["median_abs"].where(hidden["median_abs"] > 0)
    massive = (hidden["max_abs"] > abs_threshold) & (ratio > median_ratio).fillna(hidden["max_abs"] > 0)
    fig = go.Figure()
    fig.add_trace(
        go.Bar(
            x=x,
            y=hidden["max_abs"],
            name="max |h| (dark: massive)",
            marker_color=[MASSIVE_COLOR if m else LIGHT_MAX_COLOR for m in massive],
            text=["massive" if m else "" for m in massive],
            textposition="outside",
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

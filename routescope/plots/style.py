"""The one colour scheme, layout defaults and small helpers every figure module shares."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

# -- colour scheme -----------------------------------------------------------------------
MAGNITUDE_SCALE = "Viridis"
DIVERGING_SCALE = "RdBu_r"
LIFT_LOG2_RANGE = 3.0  # lift colours saturate at 1/8 and 8 x uniform
EXPERT_PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#393b79",
    "#ad494a",
    "#637939",
    "#8c6d31",
    "#7b4173",
    "#3182bd",
)
METRIC_COLORS = {
    "cv": "#d62728",
    "max_violation": "#ff7f0e",
    "balancedness": "#2ca02c",
    "norm_entropy": "#1f77b4",
    "aux_loss": "#9467bd",
}
STATE_COLORS = {
    "hot": "#d62728",
    "dead": "#111111",
    "near-dead": "#b0b0b0",
    "normal": "#1f77b4",
    "super": "#d62728",
}
DEAD_COLOR = "#111111"  # dead cells and markers: darker than any value of either scale
NEAR_DEAD_LIFT = 0.1  # near-dead: some tokens, but share <= 0.1 x uniform (1/E)
# balance metrics: (name, what an even load gives, which way is better), drawn on separate axes
BALANCE_METRICS = (
    ("cv", 0.0, "lower is better"),
    ("max_violation", 0.0, "lower is better"),
    ("balancedness", 1.0, "higher is better"),
    ("norm_entropy", 1.0, "higher is better"),
)
RUN_COLORS = ("#1f77b4", "#ff7f0e")  # run A, run B
BASELINE_COLOR = "#7f7f7f"
TEMPLATE = "plotly_white"


def base_layout(fig: go.Figure, title: str, height: int | None = None) -> go.Figure:
    """Title, margins, height and the template. A process whose default template is already
    TEMPLATE (the dashboard sets it, `use_template_by_default`) leaves the template to
    serialization, which adds it in about 1 ms, where validating it here costs 10 to 40 ms
    per figure."""
    layout: dict = {
        "title": {"text": title, "x": 0.01, "xanchor": "left"},
        "margin": {"l": 60, "r": 20, "t": 50, "b": 50},
        "height": height,
    }
    if pio.templates.default != TEMPLATE:
        layout["template"] = pio.templates[TEMPLATE]
    return fig.update_layout(**layout)


def use_template_by_default() -> None:
    """Make TEMPLATE plotly's default in this process (an application's choice: the dashboard)."""
    pio.templates.default = TEMPLATE


def empty_figure(message: str, title: str = "") -> go.Figure:
    """A blank figure carrying a message, for when there is nothing to draw."""
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return base_layout(fig, title, height=250)


def expert_color(expert: int) -> str:
    return EXPERT_PALETTE[int(expert) % len(EXPERT_PALETTE)]


def layer_name(layer: int) -> str:
    return f"L{int(layer)}"


def lift_colorbar() -> dict:
    ticks = np.arange(-LIFT_LOG2_RANGE, LIFT_LOG2_RANGE + 1)
    return {
        "title": {"text": "lift"},
        "tickvals": ticks.tolist(),
        "ticktext": [f"{2.0**t:g}" for t in ticks],
    }


def log2_lift(lift: pd.Series | np.ndarray) -> np.ndarray:
    values = np.asarray(lift, dtype=float)
    with np.errstate(divide="ignore"):
        out = np.log2(np.where(values > 0, values, np.nan))
    out = np.where(np.isnan(values), np.nan, np.where(values > 0, out, -LIFT_LOG2_RANGE))
    return np.clip(out, -LIFT_LOG2_RANGE, LIFT_LOG2_RANGE)


def float_grid(values: np.ndarray) -> np.ndarray:
    """A float32 grid: Plotly ships 2-D numeric arrays base64-encoded, float32 halves them."""
    return np.asarray(values, dtype=np.float32)


def int_counts(values: np.ndarray) -> np.ndarray:
    return np.nan_to_num(np.asarray(values, dtype=np.float64)).astype(np.int64)


def hover_stack(*grids: np.ndarray, digits: int = 5) -> np.ndarray:
    """Per-cell hover values (3-D customdata goes as JSON lists: round them to stay small)."""
    return np.round(np.dstack([np.asarray(g, dtype=np.float64) for g in grids]), digits)


def with_lift(load: pd.DataFrame) -> pd.DataFrame:
    """expert_load rows plus `lift` = share × E, E = experts listed for that layer."""
    out = load.copy()
    experts = out.groupby("layer")["expert"].transform("count")
    out["lift"] = out["share"] * experts
    return out


def all_nan(values) -> bool:
    try:
        return all(isinstance(w, float) and math.isnan(w) for w in values)
    except TypeError:
        return True


def plain_text(value: object) -> str:
    """`value` as literal text inside Plotly labels, which read a small HTML subset: markup is escaped."""
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def hover_text(token: str) -> str:
    return plain_text(repr(str(token)))


def tick_text(token: str, width: int = 10) -> str:
    text = str(token).replace("\n", "⏎").replace("\t", "⇥")
    if len(text) > width:
        text = text[: width - 1] + "…"
    return plain_text(text) or "␣"


def expert_state(
    tokens: np.ndarray, share: np.ndarray, num_experts: int, hot_factor: float = 2.0
) -> np.ndarray:
    """'dead' (no token), 'near-dead' (share <= NEAR_DEAD_LIFT / E), 'hot' (>= hot_factor / E) or 'normal'."""
    tokens = np.nan_to_num(np.asarray(tokens, dtype=float))
    share = np.nan_to_num(np.asarray(share, dtype=float))
    uniform = 1.0 / max(1, num_experts)
    return np.where(
        tokens <= 0,
        "dead",
        np.where(
            share <= NEAR_DEAD_LIFT * uniform,
            "near-dead",
            np.where(share >= hot_factor * uniform, "hot", "normal"),
        ),
    )


def dead_cell_traces(
    x: list, y: list, tokens: np.ndarray, lift: np.ndarray, dead_color: str = DEAD_COLOR
) -> list[go.Scatter]:
    """Markers over the dead (×) and near-dead (open circle) cells of a heatmap grid (rows y, columns x)."""
    tokens = np.asarray(tokens, dtype=float)
    lift = np.asarray(lift, dtype=float)
    marks = [
        ("dead (no token)", tokens == 0, "x-thin-open"),
        (
            f"near-dead (≤ {NEAR_DEAD_LIFT:g} × uniform)",
            (tokens > 0) & (lift <= NEAR_DEAD_LIFT),
            "circle-open",
        ),
    ]
    return cell_marks(x, y, marks, dead_color)


def cell_marks(
    x: list, y: list, marks: list[tuple[str, np.ndarray, str]], color: str = DEAD_COLOR
) -> list[go.Scatter]:
    """One marker trace per (name, boolean grid, symbol) over the True cells of a heatmap.

    A light `color` (white on dark cells) vanishes on the legend's white, so the legend then
    shows a dark stand-in instead.
    """
    traces = []
    for name, mask, symbol in marks:
        rows, cols = np.nonzero(np.asarray(mask, dtype=bool))
        if not len(rows):
            continue
        marker = {"symbol": symbol, "color": color, "size": 9, "line": {"width": 2, "color": color}}
        traces.append(
            go.Scatter(
                x=[x[c] for c in cols],
                y=[y[r] for r in rows],
                mode="markers",
                name=name,
                marker=marker,
                showlegend=color == DEAD_COLOR,
                hovertemplate="%{y} expert %{x}<br>" + name + "<extra></extra>",
            )
        )
        if color != DEAD_COLOR:
            dark = {**marker, "color": DEAD_COLOR, "line": {"width": 2, "color": DEAD_COLOR}}
            traces.append(go.Scatter(x=[None], y=[None], mode="markers", name=name, marker=dark))
    return traces


def legend_on_top(fig: go.Figure, y: float = 1.02) -> go.Figure:
    fig.update_layout(legend={"orientation": "h", "yanchor": "bottom", "y": y, "x": 1, "xanchor": "right"})
    return fig


def translucent(hex_color: str, alpha: float = 0.4) -> str:
    """'#rrggbb' as an rgba() string with opacity `alpha`."""
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"

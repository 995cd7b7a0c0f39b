"""Expert-parallel placement plans: per-GPU load of one layer, and max / mean GPU load per layer
with the model-level figure.

`gpu_load_figure` takes `layer, gpu, load` frames (routescope.analysis.placement.gpu_loads), one
per plan, and draws one layer. `imbalance_figure` takes `compare_plans`' (per_layer, model)
frames (routescope.analysis.expert_parallel). Used by the HTML report and the dashboard.
Loads are never added across layers: layers run one after another, each waiting for its own
busiest GPU, so a sum hides every layer's imbalance.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd
import plotly.graph_objects as go

from routescope.plots.style import BASELINE_COLOR, RUN_COLORS, base_layout, empty_figure, layer_name

CAPTION = (
    "Tokens each GPU computes under each plan (a replicated expert's tokens split evenly over its "
    "replicas); the dotted line is the mean. The tallest bar sets the layer's time: max / mean = 1.0 is even."
)
IMBALANCE_CAPTION = (
    "Busiest GPU's load ÷ mean GPU load per MoE layer under each plan (1.0 = even, lower is faster), and, "
    "last, the model-level figure: Σ over layers of each layer's busiest GPU ÷ Σ of the means, the "
    "forward step's time relative to perfect balance. Loads are not added up across layers first: the "
    "layers run one after another and each waits for its own busiest GPU, so a per-GPU sum over layers "
    "would misstate it: per-layer plans that each put their heaviest expert on GPU 0 pile up there in "
    "the sum though every layer is well balanced, and a plan with a different hot GPU in every layer looks "
    "even in the sum though every layer waits for its hot GPU."
)
MODEL_LABEL = "all layers (step)"
OTHER_COLORS = ("#2ca02c", "#d62728", "#9467bd")  # plans after the first two


def _color(i: int) -> str:
    colors = (*RUN_COLORS, *OTHER_COLORS)
    return colors[i % len(colors)]


def gpu_load_figure(plans: Mapping[str, pd.DataFrame], layer: int) -> go.Figure:
    """Grouped bars of one layer's per-GPU load, one series per plan."""
    title = f"Per-GPU load, {layer_name(layer)}"
    frames = {name: df[df["layer"] == layer] for name, df in plans.items()}
    if not frames or all(df.empty for df in frames.values()):
        return empty_figure("no placement to draw", title)
    fig = go.Figure()
    mean = None
    for i, (name, df) in enumerate(frames.items()):
        per_gpu = df.groupby("gpu")["load"].sum()
        mean = per_gpu.mean()
        fig.add_bar(
            x=[f"GPU {g}" for g in per_gpu.index],
            y=per_gpu.to_numpy(),
            name=f"{name} (max/mean {per_gpu.max() / mean:.3f})" if mean else name,
            marker_color=_color(i),
        )
    if mean:
        fig.add_hline(y=mean, line_dash="dot", line_color=BASELINE_COLOR, annotation_text="mean")
    return _legend_on_top(base_layout(fig, title, height=380), "tokens")


def imbalance_figure(per_layer: pd.DataFrame, model: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Grouped bars of max / mean GPU load per layer and, last, the model-level figure, one series
    per plan (compare_plans' frames); the legend gives each plan's model-level figure."""
    title = title or "Busiest GPU ÷ mean GPU load, per MoE layer and for the step"
    if per_layer.empty:
        return empty_figure("no placement to draw", title)
    fig = go.Figure()
    for i, row in enumerate(model.itertuples(index=False)):
        layers = per_layer[per_layer["plan"] == row.plan].sort_values("layer")
        x = [*(layer_name(int(ly)) for ly in layers["layer"]), MODEL_LABEL]
        y = [*layers["imbalance"].to_numpy(dtype=float), float(row.imbalance)]
        fig.add_bar(
            x=x,
            y=y,
            text=[f"{v:.3f}" for v in y],
            textposition="outside",
            name=f"{row.plan} (step: Σ max / Σ mean {row.imbalance:.3f})",
            marker_color=_color(i),
        )
    fig.add_hline(y=1.0, line_dash="dot", line_color=BASELINE_COLOR, annotation_text="even")
    return _legend_on_top(base_layout(fig, title, height=400), "max / mean GPU load")


def _legend_on_top(fig: go.Figure, yaxis_title: str) -> go.Figure:
    # the legend goes just above the plot area, below the title
    fig.update_layout(
        barmode="group", yaxis_title=yaxis_title, legend={"orientation": "h", "y": 1.02, "yanchor": "bottom"}
    )
    fig.update_layout(margin={"t": max(80, fig.layout.margin.t or 0)})
    return fig

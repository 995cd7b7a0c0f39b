"""Per-GPU load of expert-parallel placement plans: bars per GPU, one colour per plan.

Takes `layer, gpu, load` frames (routescope.analysis.placement.gpu_loads), one per plan, e.g.
{"contiguous": before, "lpt": after}; used by the HTML report, and ready for the dashboard.
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


def gpu_load_figure(plans: Mapping[str, pd.DataFrame], layer: int | None = None) -> go.Figure:
    """Grouped bars of per-GPU load for one layer (default: summed over layers), one series per plan."""
    title = "Per-GPU load" + (f", {layer_name(layer)}" if layer is not None else ", all MoE layers")
    frames = {name: df if layer is None else df[df["layer"] == layer] for name, df in plans.items()}
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
            marker_color=RUN_COLORS[i % len(RUN_COLORS)],
        )
    if mean:
        fig.add_hline(y=mean, line_dash="dot", line_color=BASELINE_COLOR, annotation_text="mean")
    fig = base_layout(fig, title, height=380)
    # the legend goes just above the plot area, below the title
    fig.update_layout(
        barmode="group", yaxis_title="tokens", legend={"orientation": "h", "y": 1.02, "yanchor": "bottom"}
    )
    fig.update_layout(margin={"t": max(80, fig.layout.margin.t or 0)})
    return fig

"""Plotly figure builders for routing metrics, shared by the dashboard and the notebooks.

Each builder takes DataFrames with the columns the Run API returns (SPEC section 2) and
returns a `go.Figure`; none of them reads a run. One module per kind of figure (load,
timeline, entanglement, specialization, super_experts, tokens, compare, placement) over one
shared style (`plots.style`: Viridis for magnitudes, a red–blue diverging scale for relative
values, fixed colours per metric and per expert). `caption(name)` gives the one-line
reading guide of every figure. `from routescope import plots` keeps every name here.
"""

from __future__ import annotations

from routescope.plots.captions import CAPTIONS, caption
from routescope.plots.compare import balance_change_figure, load_delta_heatmap, saturation_figure
from routescope.plots.entanglement import entanglement_figure, pathway_sankey, transition_heatmap
from routescope.plots.health import layer_health_figure
from routescope.plots.load import balance_figure, coactivation_heatmap, expert_bars, load_heatmap
from routescope.plots.placement import gpu_load_figure, imbalance_figure
from routescope.plots.specialization import repetition_figure, specialization_heatmap
from routescope.plots.style import (
    BASELINE_COLOR,
    DIVERGING_SCALE,
    EXPERT_PALETTE,
    LIFT_LOG2_RANGE,
    MAGNITUDE_SCALE,
    METRIC_COLORS,
    NEAR_DEAD_LIFT,
    RUN_COLORS,
    STATE_COLORS,
    TEMPLATE,
    empty_figure,
    expert_color,
    expert_state,
    layer_name,
    plain_text,
    translucent,
    with_lift,
)
from routescope.plots.super_experts import massive_activation_figure, super_expert_scatter
from routescope.plots.timeline import balance_over_steps_figure, rank_load_figure, step_heatmap
from routescope.plots.tokens import expert_lanes

__all__ = [
    "BASELINE_COLOR",
    "CAPTIONS",
    "DIVERGING_SCALE",
    "EXPERT_PALETTE",
    "LIFT_LOG2_RANGE",
    "MAGNITUDE_SCALE",
    "METRIC_COLORS",
    "NEAR_DEAD_LIFT",
    "RUN_COLORS",
    "STATE_COLORS",
    "TEMPLATE",
    "balance_change_figure",
    "balance_figure",
    "balance_over_steps_figure",
    "caption",
    "coactivation_heatmap",
    "empty_figure",
    "entanglement_figure",
    "expert_bars",
    "expert_color",
    "expert_lanes",
    "expert_state",
    "gpu_load_figure",
    "imbalance_figure",
    "layer_health_figure",
    "layer_name",
    "load_delta_heatmap",
    "load_heatmap",
    "massive_activation_figure",
    "pathway_sankey",
    "plain_text",
    "rank_load_figure",
    "repetition_figure",
    "saturation_figure",
    "specialization_heatmap",
    "step_heatmap",
    "super_expert_scatter",
    "transition_heatmap",
    "translucent",
    "with_lift",
]

"""The one-line reading guide of every figure, by builder name (shown under each graph)."""

from __future__ import annotations

CAPTIONS = {
    "balance_figure": "Per MoE layer: cv and max_violation are 0 when load is perfectly even (lower is better); "
    "balancedness and norm_entropy are 1 when it is even (higher is better).",
    "load_heatmap_share": "Each cell is the share of a layer's routing slots that went to that expert; "
    "a uniform router gives every cell 1/E. Click a cell for that expert's details.",
    "load_heatmap_lift": "Each cell is the expert's share × E: white = uniform (1.0), red = more load than "
    "uniform, blue = less, on a log scale. Click a cell for that expert's details.",
    "expert_bars": "Share of the layer's routing slots per expert; the dashed line is uniform (1/E), "
    "red bars are hot (≥ 2/E), grey bars are dead (no token).",
    "coactivation_heatmap": "Row a, column b: of the tokens routed to expert a, the fraction also routed to b "
    "in the same layer (P(b | a)).",
    "entanglement_figure": "Mutual information between each token's top-1 expert in a layer and in the next "
    "MoE layer; bars far above the grey shuffled baseline mean routing is coupled across layers.",
    "transition_heatmap": "Row a, column b: of the tokens whose top-1 expert is a in the first layer, the "
    "fraction whose top-1 expert is b in the next MoE layer (rows sum to 1).",
    "pathway_sankey": "The most frequent top-1 expert paths through consecutive MoE layers; band width is "
    "the number of tokens that follow that step of a path.",
    "specialization_heatmap": "Lift of each expert for each label value (share within that value × E): "
    "white = uniform, red = the expert prefers this value, blue = it avoids it (log scale).",
    "repetition_figure": "Fraction of consecutive token pairs in a sequence whose top-1 expert is the same; "
    "the grey bar is what a uniform router gives (1/E).",
    "super_expert_scatter": "Largest |down-projection output| of every expert per layer (log scale); points "
    "above both grey threshold lines in the massive-activation layers are Super Experts (red stars).",
    "massive_activation_figure": "Largest |hidden state| after each decoder layer against its median, log "
    "scale; a massive activation is > 100 and > 1000 × the median.",
    "expert_lanes": "One row per MoE layer, one column per token: the colour is the token's top-1 expert "
    "there; hover for all k experts with their weights (e5:0.41 = expert 5, weight 0.41).",
    "load_delta_heatmap": "Share of each expert in run B minus run A, per layer: red = more load in B, "
    "blue = less, white = unchanged.",
    "balance_change_figure": "Balance metrics per layer in run A (dashed) and run B (solid): cv and "
    "max_violation lower is better, balancedness and norm_entropy higher is better.",
    "saturation_figure": "Router saturation (OLMoE): for tokens in both runs (same sequence, position and token "
    "id), the fraction of run A's top-k experts that run B also chose (1.0 = the same routing), and how often "
    "the top-1 expert agrees.",
}


def caption(name: str) -> str:
    """The one-line reading guide of a figure builder (by function name)."""
    return CAPTIONS[name]

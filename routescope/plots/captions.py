"""The one-line reading guide of every figure, by builder name (shown under each graph)."""

from __future__ import annotations

CAPTIONS = {
    "layer_health_figure": "One row per MoE layer, one column per metric: green is healthy, yellow at the doctor's band (cv and Gini 0.3, a hot expert at 2x uniform, dead experts 5 %), red far past it; the doctor column is the layer's worst finding. Order the rows by a metric to see the worst layers first.",
    "balance_figure": "One panel per metric, each on its own axis; the dotted line is an even load: cv and max_violation 0 (lower is better), balancedness and norm_entropy 1 (higher is better).",
    "load_heatmap_share": "Each cell is the share of a layer's routing slots (tokens × k) that went to that expert; a uniform router gives every cell 1/E. Black cells with × are dead (no token), ○ marks near-dead (≤ 0.1 × uniform). Click a cell for that expert's details.",
    "load_heatmap_lift": "Each cell is the expert's share × E: white = uniform (1.0), red = more load, blue = less, log scale saturating at 1/8 and 8. Black cells with × are dead (no token), ○ marks near-dead (≤ 0.1 × uniform). Click a cell for that expert's details.",
    "expert_bars": "Share of the layer's routing slots per expert; the dashed line is uniform (1/E): red bars are hot (≥ 2/E), light grey bars near-dead (≤ 0.1/E), and a black × on the axis marks a dead expert (no token).",
    "coactivation_heatmap": "Row a, column b: of the tokens routed to expert a, the fraction also routed to b "
    "in the same layer (P(b | a)).",
    "entanglement_figure": "Left: normalised mutual information MI / H(next layer) of each token's top-1 expert in a layer and in the next MoE layer (0 = independent, 1 = determined), beside the shuffled baseline normalised the same way. Right: MI ÷ baseline MI (log scale); far above 1 means routing is coupled across layers beyond plug-in bias.",
    "transition_heatmap": "Row a, column b: of the tokens whose top-1 expert is a in the first layer, the fraction whose top-1 expert is b in the next MoE layer; each row with tokens sums to 1 (n = that row's tokens on the axis); rows with no token are black.",
    "pathway_sankey": "The most frequent top-1 expert paths through consecutive MoE layers; band width is "
    "the number of tokens that follow that step of a path.",
    "specialization_heatmap": "Lift of each expert for each label value (share within that value × E): "
    "white = uniform, red = the expert prefers this value, blue = it avoids it (log scale); black = no token "
    "of this value went to the expert.",
    "repetition_figure": "Fraction of consecutive token pairs in a sequence whose top-1 expert is the same; "
    "the grey bar is what a uniform router gives (1/E).",
    "super_expert_scatter": "Largest |down-projection output| of every expert (log scale), experts labelled. The rule (arXiv 2507.23279): an expert in the searched layers (shaded) whose output is above both dashed lines (the 99.5th percentile and max / 10 of the searched layers) is a Super Expert, drawn as a red star; no star means no expert meets it.",
    "massive_activation_figure": "Largest |hidden state| after each decoder layer against its median, log "
    "scale; a massive activation is > 100 and > 1000 × the median.",
    "expert_lanes": "One row per MoE layer, one column per token: the colour is the token's top-1 expert "
    "there; hover for all k experts with their weights (e5:0.41 = expert 5, weight 0.41).",
    "load_delta_heatmap": "Share of each expert in run B minus run A, per layer: red = more load in B, "
    "blue = less, white = unchanged; ○ an expert dead in A only, × dead in B only, □ dead in both.",
    "balance_change_figure": "Balance metrics per layer in run A (dashed) and run B (solid): cv and "
    "max_violation lower is better, balancedness and norm_entropy higher is better.",
    "saturation_figure": "Router saturation (OLMoE): over the tokens of run A whose content (the token ids of "
    "their sequence up to and including them) also appears in run B, the fraction of A's top-k experts that B "
    "also chose (1.0 = the same routing), and how often the top-1 expert agrees.",
    "step_heatmap_lift": "One layer over the run: each column is a bin of forward steps, each cell the "
    "expert's share of that bin's slots × E (white = uniform, red = more, blue = less, log scale). Black "
    "cells: no token went to that expert in those steps; a row turning black is an expert dying.",
    "step_heatmap_share": "One layer over the run: each column is a bin of forward steps, each cell the "
    "expert's share of that bin's routing slots (uniform = 1/E). Black cells: no token in those steps.",
    "balance_over_steps_figure": "Balance metrics of every MoE layer per bin of forward steps, each metric "
    "on its own axis (dotted: an even load); with more than 8 layers the chosen layer is drawn in colour over "
    "the others in grey. A jump in max_violation or a fall in norm_entropy is a router collapsing.",
    "rank_load_figure": "Share of one layer's routing slots per expert on each rank (the rank's own slots "
    "are the denominator); with expert parallelism, bars that differ between ranks show uneven traffic.",
    "specialization_heatmap_expert": "Lift of each expert for each label value against the expert's overall "
    "share (share within the value ÷ share over all tokens): load imbalance is divided out, so white = the "
    "expert takes this value as often as it takes anything, red = prefers it, blue = avoids it.",
}


def caption(name: str) -> str:
    """The one-line reading guide of a figure builder (by function name)."""
    return CAPTIONS[name]

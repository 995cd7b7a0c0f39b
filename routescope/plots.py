"""Plotly figure builders for routing metrics, shared by the dashboard and the notebooks.

Each builder takes DataFrames with the columns the Run API returns (SPEC section 2) and
returns a `go.Figure`; none of them reads a run. One colour scheme throughout: Viridis for
magnitudes (share, counts, probabilities), a red–blue diverging scale for relative values
(lift on a log2 axis centred at uniform = 1, deltas centred at 0), and fixed colours per
metric and per expert. `CAPTIONS` holds the one-line reading guide of every figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

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
STATE_COLORS = {"hot": "#d62728", "dead": "#7f7f7f", "normal": "#1f77b4", "super": "#d62728"}
RUN_COLORS = ("#1f77b4", "#ff7f0e")  # run A, run B
BASELINE_COLOR = "#7f7f7f"
TEMPLATE = "plotly_white"

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


def _base(fig: go.Figure, title: str, height: int | None = None) -> go.Figure:
    fig.update_layout(
        template=TEMPLATE,
        title={"text": title, "x": 0.01, "xanchor": "left"},
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
        height=height,
    )
    return fig


def empty_figure(message: str, title: str = "") -> go.Figure:
    """A blank figure carrying a message, for when there is nothing to draw."""
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _base(fig, title, height=250)


def expert_color(expert: int) -> str:
    return EXPERT_PALETTE[int(expert) % len(EXPERT_PALETTE)]


def layer_name(layer: int) -> str:
    return f"L{int(layer)}"


def _lift_colorbar() -> dict:
    ticks = np.arange(-LIFT_LOG2_RANGE, LIFT_LOG2_RANGE + 1)
    return {
        "title": {"text": "lift"},
        "tickvals": ticks.tolist(),
        "ticktext": [f"{2.0**t:g}" for t in ticks],
    }


def _log2_lift(lift: pd.Series | np.ndarray) -> np.ndarray:
    values = np.asarray(lift, dtype=float)
    with np.errstate(divide="ignore"):
        out = np.log2(np.where(values > 0, values, np.nan))
    out = np.where(np.isnan(values), np.nan, np.where(values > 0, out, -LIFT_LOG2_RANGE))
    return np.clip(out, -LIFT_LOG2_RANGE, LIFT_LOG2_RANGE)


def _grid(values: np.ndarray) -> np.ndarray:
    """A float32 grid: Plotly ships 2-D numeric arrays base64-encoded, float32 halves them."""
    return np.asarray(values, dtype=np.float32)


def _counts(values: np.ndarray) -> np.ndarray:
    return np.nan_to_num(np.asarray(values, dtype=np.float64)).astype(np.int64)


def _stack(*grids: np.ndarray, digits: int = 5) -> np.ndarray:
    """Per-cell hover values (3-D customdata goes as JSON lists: round them to stay small)."""
    return np.round(np.dstack([np.asarray(g, dtype=np.float64) for g in grids]), digits)


def with_lift(load: pd.DataFrame) -> pd.DataFrame:
    """expert_load rows plus `lift` = share × E, E = experts listed for that layer."""
    out = load.copy()
    experts = out.groupby("layer")["expert"].transform("count")
    out["lift"] = out["share"] * experts
    return out


# -- overview ----------------------------------------------------------------------------
def balance_figure(balance: pd.DataFrame) -> go.Figure:
    """cv, max_violation, balancedness and norm_entropy across layers (run.balance())."""
    if balance.empty:
        return empty_figure("no routing rows", "Load balance per layer")
    fig = go.Figure()
    x = [layer_name(v) for v in balance["layer"]]
    for metric in ("cv", "max_violation", "balancedness", "norm_entropy"):
        fig.add_trace(
            go.Scatter(
                x=x,
                y=balance[metric],
                name=metric,
                mode="lines+markers",
                line={"color": METRIC_COLORS[metric]},
                hovertemplate=f"{metric} %{{y:.3f}}<extra>%{{x}}</extra>",
            )
        )
    fig.update_xaxes(title="MoE layer", type="category")
    fig.update_yaxes(title="value", rangemode="tozero")
    return _base(fig, "Load balance per layer", height=360)


# -- load --------------------------------------------------------------------------------
def load_heatmap(load: pd.DataFrame, value: str = "lift") -> go.Figure:
    """Layer × expert heatmap of share (Viridis) or lift (log2, diverging) from run.expert_load()."""
    if value not in ("share", "lift"):
        raise ValueError(f"value={value!r} is not allowed; use 'share' or 'lift'")
    if load.empty:
        return empty_figure("no routing rows", "Expert load")
    df = with_lift(load)
    layers = sorted(df["layer"].unique())
    experts = sorted(df["expert"].unique())
    grid = df.pivot(index="layer", columns="expert", values=["share", "lift", "tokens"]).reindex(
        index=layers, columns=pd.MultiIndex.from_product([["share", "lift", "tokens"], experts])
    )
    share, lift, tokens = grid["share"].to_numpy(), grid["lift"].to_numpy(), grid["tokens"].to_numpy()
    custom = _stack(share, lift, tokens)
    y = [layer_name(v) for v in layers]
    hover = "%{y} expert %{x}<br>share %{customdata[0]:.4f}<br>lift %{customdata[1]:.2f}<br>tokens %{customdata[2]:,}<extra></extra>"
    if value == "share":
        trace = go.Heatmap(
            z=_grid(share),
            x=experts,
            y=y,
            customdata=custom,
            colorscale=MAGNITUDE_SCALE,
            zmin=0,
            colorbar={"title": {"text": "share"}},
            hovertemplate=hover,
        )
    else:
        trace = go.Heatmap(
            z=_grid(_log2_lift(lift)),
            x=experts,
            y=y,
            customdata=custom,
            colorscale=DIVERGING_SCALE,
            zmid=0,
            zmin=-LIFT_LOG2_RANGE,
            zmax=LIFT_LOG2_RANGE,
            colorbar=_lift_colorbar(),
            hovertemplate=hover,
        )
    fig = go.Figure(trace)
    fig.update_xaxes(title="expert", dtick=1 if len(experts) <= 32 else None)
    fig.update_yaxes(title="MoE layer", type="category", autorange="reversed")
    return _base(fig, f"Expert load ({value})", height=max(300, 60 + 22 * len(layers)))


def expert_bars(load: pd.DataFrame, layer: int, hot_factor: float = 2.0) -> go.Figure:
    """Per-expert share for one layer with the uniform line; hot and dead experts coloured."""
    df = load[load["layer"] == layer].sort_values("expert")
    if df.empty:
        return empty_figure(f"no routing rows for layer {layer}", "Experts of one layer")
    num = len(df)
    uniform = 1.0 / num
    state = np.where(
        df["tokens"] == 0, "dead", np.where(df["share"] >= hot_factor * uniform, "hot", "normal")
    )
    fig = go.Figure(
        go.Bar(
            x=df["expert"],
            y=df["share"],
            marker_color=[STATE_COLORS[s] for s in state],
            customdata=np.column_stack([df["tokens"], df["share"] * num, state]),
            hovertemplate="expert %{x}<br>share %{y:.4f}<br>lift %{customdata[1]:.2f}<br>"
            "tokens %{customdata[0]:,}<br>%{customdata[2]}<extra></extra>",
        )
    )
    fig.add_hline(y=uniform, line_dash="dash", line_color=BASELINE_COLOR, annotation_text="uniform 1/E")
    fig.update_xaxes(title="expert", dtick=1 if num <= 32 else None)
    fig.update_yaxes(title="share", rangemode="tozero")
    return _base(fig, f"Experts of layer {layer}", height=320)


def coactivation_heatmap(co: pd.DataFrame, num_experts: int, layer: int | None = None) -> go.Figure:
    """P(b | a) for pairs of experts chosen for the same token (run.coactivation(layer))."""
    title = "Co-activation" + (f" in layer {layer}" if layer is not None else "")
    if co.empty:
        return empty_figure("no token chose two experts here (top-1 routing?)", title)
    experts = list(range(num_experts))
    grid = co.pivot(index="expert_a", columns="expert_b", values="p_b_given_a").reindex(
        index=experts, columns=experts
    )
    counts = co.pivot(index="expert_a", columns="expert_b", values="count").reindex(
        index=experts, columns=experts
    )
    fig = go.Figure(
        go.Heatmap(
            z=_grid(grid.to_numpy(dtype=float)),
            x=experts,
            y=experts,
            customdata=_counts(counts.to_numpy()),
            colorscale=MAGNITUDE_SCALE,
            zmin=0,
            zmax=1,
            colorbar={"title": {"text": "P(b|a)"}},
            hovertemplate="a = %{y}, b = %{x}<br>P(b|a) %{z:.3f}<br>count %{customdata:,}<extra></extra>",
        )
    )
    fig.update_xaxes(title="expert b", dtick=1 if num_experts <= 32 else None)
    fig.update_yaxes(title="expert a", autorange="reversed", dtick=1 if num_experts <= 32 else None)
    return _base(fig, title, height=380)


# -- entanglement ------------------------------------------------------------------------
def _pair_names(df: pd.DataFrame) -> list[str]:
    return [f"{layer_name(a)}→{layer_name(b)}" for a, b in zip(df["layer"], df["next_layer"])]


def entanglement_figure(ent: pd.DataFrame) -> go.Figure:
    """Mutual information between consecutive MoE layers against the shuffled baseline."""
    if ent.empty:
        return empty_figure("fewer than two MoE layers: nothing to compare", "Cross-layer entanglement")
    x = _pair_names(ent)
    fig = go.Figure()
    fig.add_trace(
        go.Bar(
            x=x,
            y=ent["mutual_info_bits"],
            name="mutual information",
            marker_color=METRIC_COLORS["norm_entropy"],
            customdata=np.column_stack(
                [ent["norm_mutual_info"], ent["cond_entropy_bits"], ent["top1_predictability"]]
            ),
            hovertemplate="%{x}<br>MI %{y:.3f} bits<br>normalized %{customdata[0]:.3f}<br>"
            "H(B|A) %{customdata[1]:.3f} bits<br>top-1 predictability %{customdata[2]:.3f}<extra></extra>",
        )
    )
    fig.add_trace(
        go.Bar(
            x=x,
            y=ent["baseline_mutual_info_bits"],
            name="shuffled baseline",
            marker_color=BASELINE_COLOR,
            hovertemplate="%{x}<br>baseline MI %{y:.3f} bits<extra></extra>",
        )
    )
    fig.update_layout(barmode="group")
    fig.update_xaxes(title="consecutive MoE layers", type="category")
    fig.update_yaxes(title="bits", rangemode="tozero")
    return _base(fig, "Cross-layer entanglement", height=340)


def transition_heatmap(
    trans: pd.DataFrame, layer: int, next_layer: int, num_a: int | None = None, num_b: int | None = None
) -> go.Figure:
    """P(top-1 expert b at next_layer | top-1 expert a at layer), from run.transition(...)."""
    title = f"Top-1 transitions {layer_name(layer)}→{layer_name(next_layer)}"
    if trans.empty:
        return empty_figure("no tokens", title)
    df = trans.copy()
    a_col, b_col = _transition_columns(df)
    if "p_b_given_a" not in df.columns:
        totals = df.groupby(a_col)["count"].transform("sum")
        df["p_b_given_a"] = df["count"] / totals
    ea = list(range(num_a)) if num_a else sorted(df[a_col].unique())
    eb = list(range(num_b)) if num_b else sorted(df[b_col].unique())
    grid = df.pivot(index=a_col, columns=b_col, values="p_b_given_a").reindex(index=ea, columns=eb)
    counts = df.pivot(index=a_col, columns=b_col, values="count").reindex(index=ea, columns=eb)
    fig = go.Figure(
        go.Heatmap(
            z=_grid(grid.fillna(0).to_numpy(dtype=float)),
            x=eb,
            y=ea,
            customdata=_counts(counts.to_numpy()),
            colorscale=MAGNITUDE_SCALE,
            zmin=0,
            zmax=1,
            colorbar={"title": {"text": "P(b|a)"}},
            hovertemplate=f"{layer_name(layer)} expert %{{y}} → {layer_name(next_layer)} expert %{{x}}"
            "<br>P %{z:.3f}<br>tokens %{customdata:,}<extra></extra>",
        )
    )
    fig.update_xaxes(title=f"top-1 expert in {layer_name(next_layer)}", dtick=1 if len(eb) <= 32 else None)
    fig.update_yaxes(
        title=f"top-1 expert in {layer_name(layer)}", autorange="reversed", dtick=1 if len(ea) <= 32 else None
    )
    return _base(fig, title, height=380)


def _transition_columns(df: pd.DataFrame) -> tuple[str, str]:
    for a, b in (("expert", "next_expert"), ("expert_a", "expert_b"), ("from_expert", "to_expert")):
        if a in df.columns and b in df.columns:
            return a, b
    raise ValueError(f"transition table lacks expert columns: {list(df.columns)}")


def pathway_sankey(paths: pd.DataFrame, layers: Sequence[int]) -> go.Figure:
    """Sankey of the most frequent top-1 pathways: one column of nodes per MoE layer.

    `paths` has one column per layer holding the expert (named by layer index, or `e{layer}`
    / `expert_{layer}`) and a `count` (tokens following the whole path), or a `path` column
    holding the list of experts.
    """
    title = "Most frequent top-1 pathways"
    if paths.empty or len(layers) < 1:
        return empty_figure("no pathways", title)
    steps = _pathway_matrix(paths, layers)
    counts = paths["count"].to_numpy()
    node_index: dict[tuple[int, int], int] = {}
    labels, colors, xs = [], [], []
    n_layers = len(layers)
    for col, layer in enumerate(layers):
        for expert in sorted({int(row[col]) for row in steps}):
            node_index[(col, expert)] = len(labels)
            labels.append(f"{layer_name(layer)} e{expert}")
            colors.append(expert_color(expert))
            xs.append(0.01 + 0.98 * col / max(1, n_layers - 1))
    links: dict[tuple[int, int], int] = {}
    for row, count in zip(steps, counts):
        for col in range(n_layers - 1):
            key = (node_index[(col, int(row[col]))], node_index[(col + 1, int(row[col + 1]))])
            links[key] = links.get(key, 0) + int(count)
    fig = go.Figure(
        go.Sankey(
            arrangement="snap",
            node={"label": labels, "color": colors, "pad": 8, "thickness": 14, "x": xs, "y": [0.5] * len(xs)},
            link={
                "source": [s for s, _ in links],
                "target": [t for _, t in links],
                "value": list(links.values()),
                "color": "rgba(120,120,120,0.35)",
                "hovertemplate": "%{source.label} → %{target.label}<br>%{value:,} tokens<extra></extra>",
            },
        )
    )
    fig.update_traces(node_y=None)
    return _base(fig, title, height=460)


def _pathway_matrix(paths: pd.DataFrame, layers: Sequence[int]) -> list[list[int]]:
    if "path" in paths.columns:
        return [list(p) for p in paths["path"]]
    cols = []
    for layer in layers:
        for name in (str(layer), f"e{layer}", f"expert_{layer}", f"L{layer}", f"layer_{layer}"):
            if name in paths.columns:
                cols.append(name)
                break
        else:
            raise ValueError(f"pathways table has no column for layer {layer}: {list(paths.columns)}")
    return paths[cols].astype(int).values.tolist()


# -- specialization ----------------------------------------------------------------------
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
    fig = go.Figure(
        go.Heatmap(
            z=_grid(_log2_lift(lift.to_numpy(dtype=float))),
            x=experts,
            y=[plain_text(v) for v in values],
            customdata=_stack(lift.to_numpy(dtype=float), share.to_numpy(dtype=float)),
            colorscale=DIVERGING_SCALE,
            zmid=0,
            zmin=-LIFT_LOG2_RANGE,
            zmax=LIFT_LOG2_RANGE,
            colorbar=_lift_colorbar(),
            hovertemplate=f"{label} %{{y}}<br>expert %{{x}}<br>lift %{{customdata[0]:.2f}}"
            "<br>share %{customdata[1]:.4f}<extra></extra>",
        )
    )
    fig.update_xaxes(title="expert", dtick=1 if len(experts) <= 32 else None)
    fig.update_yaxes(title=label, type="category", autorange="reversed")
    return _base(fig, title, height=max(260, 80 + 26 * len(values)))


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
    return _base(fig, "Repetition rate", height=320)


# -- super experts -----------------------------------------------------------------------
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
    return _base(fig, title, height=420)


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
    return _base(fig, title, height=360)


# -- tokens ------------------------------------------------------------------------------
def expert_lanes(lanes: pd.DataFrame, num_experts: int) -> go.Figure:
    """Token × layer grid coloured by the top-1 expert, all k choices and weights on hover.

    `lanes`: one row per (pos, layer) with `pos`, `layer`, `token` (display text), `experts`
    (list of expert ids by slot) and `weights` (list of weights, or None).
    """
    title = "Expert lanes"
    if lanes.empty:
        return empty_figure("no tokens in this window", title)
    positions = np.sort(lanes["pos"].unique())
    layers = np.sort(lanes["layer"].unique())
    rows = np.searchsorted(layers, lanes["layer"].to_numpy())
    cols = np.searchsorted(positions, lanes["pos"].to_numpy())
    z = np.full((len(layers), len(positions)), np.nan)
    hover = np.full((len(layers), len(positions)), "", dtype=object)
    weights = lanes["weights"] if "weights" in lanes.columns else [None] * len(lanes)
    for r, c, pos, layer, token, experts, w in zip(
        rows, cols, lanes["pos"], lanes["layer"], lanes["token"], lanes["experts"], weights
    ):
        z[r, c] = experts[0]
        if w is not None and len(w) == len(experts) and not _all_nan(w):
            choice = " ".join(f"e{e}:{x:.2f}" for e, x in zip(experts, w))
        else:
            choice = " ".join(f"e{e}" for e in experts)
        hover[r, c] = f"{pos} {_hover_text(token)}<br>{layer_name(layer)} {choice}"
    first = lanes.drop_duplicates("pos").set_index("pos")["token"]
    tokens = first.reindex(positions)
    # discrete colours: expert e takes EXPERT_PALETTE[e % 16] for the whole cell
    n = max(1, num_experts)
    scale = []
    for e in range(n):
        lo, hi = e / n, (e + 1) / n
        scale += [[lo, expert_color(e)], [hi, expert_color(e)]]
    fig = go.Figure(
        go.Heatmap(
            z=_grid(z),
            x=list(range(len(positions))),
            y=[layer_name(v) for v in layers],
            text=hover,
            hovertemplate="%{text}<extra></extra>",
            colorscale=scale,
            zmin=-0.5,
            zmax=n - 0.5,
            xgap=1,
            ygap=2,
            colorbar={"title": {"text": "top-1 expert"}, "tickvals": list(range(0, n, max(1, n // 8)))},
        )
    )
    fig.update_xaxes(
        tickmode="array",
        tickvals=list(range(len(positions))),
        ticktext=[_tick_text(t) for t in tokens],
        tickangle=-60,
        title="token",
    )
    fig.update_yaxes(title="MoE layer", type="category", autorange="reversed")
    return _base(fig, title, height=max(280, 140 + 26 * len(layers)))


def _all_nan(values) -> bool:
    try:
        return all(isinstance(w, float) and math.isnan(w) for w in values)
    except TypeError:
        return True


def plain_text(value: object) -> str:
    """`value` as literal text inside Plotly labels, which read a small HTML subset: markup is escaped."""
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _hover_text(token: str) -> str:
    return plain_text(repr(str(token)))


def _tick_text(token: str, width: int = 10) -> str:
    text = str(token).replace("\n", "⏎").replace("\t", "⇥")
    if len(text) > width:
        text = text[: width - 1] + "…"
    return plain_text(text) or "␣"


# -- compare -----------------------------------------------------------------------------
def load_delta_heatmap(load: pd.DataFrame) -> go.Figure:
    """Layer × expert share in run B minus run A, from `routescope.compare(a, b).load`."""
    title = "Load change (B − A)"
    if load.empty:
        return empty_figure("the runs have no (layer, expert) in common", title)
    df = load.fillna({"share_a": 0.0, "share_b": 0.0})
    if "share_delta" not in df.columns:
        df = df.assign(share_delta=df["share_b"] - df["share_a"])
    layers = sorted(df["layer"].unique())
    experts = sorted(df["expert"].unique())
    grid = df.pivot(index="layer", columns="expert", values=["share_delta", "share_a", "share_b"])
    delta = grid["share_delta"].reindex(index=layers, columns=experts).to_numpy(dtype=float)
    custom = _stack(
        grid["share_a"].reindex(index=layers, columns=experts).to_numpy(dtype=float),
        grid["share_b"].reindex(index=layers, columns=experts).to_numpy(dtype=float),
        digits=6,
    )
    bound = float(np.nanmax(np.abs(delta))) if np.isfinite(delta).any() else 0.0
    bound = bound or 1e-6
    fig = go.Figure(
        go.Heatmap(
            z=_grid(delta),
            x=experts,
            y=[layer_name(v) for v in layers],
            customdata=custom,
            colorscale=DIVERGING_SCALE,
            zmid=0,
            zmin=-bound,
            zmax=bound,
            colorbar={"title": {"text": "Δ share"}},
            hovertemplate="%{y} expert %{x}<br>A %{customdata[0]:.4f} → B %{customdata[1]:.4f}"
            "<br>Δ %{z:+.4f}<extra></extra>",
        )
    )
    fig.update_xaxes(title="expert", dtick=1 if len(experts) <= 32 else None)
    fig.update_yaxes(title="MoE layer", type="category", autorange="reversed")
    return _base(fig, title, height=max(300, 60 + 22 * len(layers)))


def balance_change_figure(balance: pd.DataFrame) -> go.Figure:
    """The four balance metrics per layer, run A dashed and run B solid (`compare(a, b).balance`)."""
    title = "Balance, run A vs run B"
    if balance.empty:
        return empty_figure("the runs have no MoE layer in common", title)
    fig = go.Figure()
    x = [layer_name(v) for v in balance["layer"]]
    for suffix, run_name, dash in (("_a", "A", "dash"), ("_b", "B", "solid")):
        for metric in ("cv", "max_violation", "balancedness", "norm_entropy"):
            column = metric + suffix
            if column not in balance.columns:
                continue
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=balance[column],
                    name=f"{metric} ({run_name})",
                    mode="lines+markers",
                    line={"color": METRIC_COLORS[metric], "dash": dash},
                    legendgroup=metric,
                    hovertemplate=f"{metric} ({run_name}) %{{y:.3f}}<extra>%{{x}}</extra>",
                )
            )
    fig.update_xaxes(title="MoE layer", type="category")
    fig.update_yaxes(title="value", rangemode="tozero")
    return _base(fig, title, height=380)


def saturation_figure(saturation: pd.DataFrame) -> go.Figure:
    """Router saturation per layer (`compare(a, b).saturation`): top-k overlap and top-1 agreement."""
    title = "Router saturation"
    if saturation.empty or not saturation["tokens_matched"].fillna(0).astype(int).any():
        return empty_figure("no token appears in both runs (same sequence, position and token id)", title)
    x = [layer_name(v) for v in saturation["layer"]]
    fig = go.Figure()
    fig.add_trace(
        go.Bar(
            x=x,
            y=saturation["saturation"],
            name="saturation (top-k overlap)",
            marker_color=RUN_COLORS[0],
            customdata=np.column_stack([saturation["tokens_matched"], saturation["top_k"]]),
            hovertemplate="%{x}<br>saturation %{y:.3f}<br>over %{customdata[0]:,} tokens, k = %{customdata[1]}"
            "<extra></extra>",
        )
    )
    fig.add_trace(
        go.Bar(
            x=x,
            y=saturation["top1_agreement"],
            name="top-1 agreement",
            marker_color=RUN_COLORS[1],
            hovertemplate="%{x}<br>top-1 agreement %{y:.3f}<extra></extra>",
        )
    )
    fig.update_layout(barmode="group")
    fig.update_xaxes(title="MoE layer", type="category")
    fig.update_yaxes(title="fraction", range=[0, 1.02])
    return _base(fig, title, height=320)

"""Cross-layer figures: mutual information, top-1 transitions, pathway Sankey."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from routescope.plots.style import (
    BASELINE_COLOR,
    DEAD_COLOR,
    MAGNITUDE_SCALE,
    METRIC_COLORS,
    base_layout,
    empty_figure,
    expert_color,
    float_grid,
    int_counts,
    layer_name,
    translucent,
)


def _pair_names(df: pd.DataFrame) -> list[str]:
    return [f"{layer_name(a)}→{layer_name(b)}" for a, b in zip(df["layer"], df["next_layer"])]


def entanglement_figure(ent: pd.DataFrame) -> go.Figure:
    """Left: normalised MI (MI / H(B)) beside the shuffled baseline normalised the same way;
    right: MI ÷ baseline MI on a log axis. Both are readable where raw bits are not: the
    baseline is small next to MI, and H(B) differs between layer pairs."""
    title = "Top-1 experts of consecutive MoE layers: mutual information"
    if ent.empty:
        return empty_figure("fewer than two MoE layers: nothing to compare", title)
    x = _pair_names(ent)
    mi = ent["mutual_info_bits"].astype(float)
    h_b = mi + ent["cond_entropy_bits"].astype(float)  # H(B) = MI + H(B | A)
    base = ent["baseline_mutual_info_bits"].astype(float)
    norm_base = (base / h_b.where(h_b > 0)).fillna(0.0)
    ratio = mi / base.where(base > 0)
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=["normalised MI = MI / H(next layer)", "MI ÷ shuffled baseline (log)"],
        horizontal_spacing=0.1,
    )
    fig.add_trace(
        go.Bar(
            x=x,
            y=ent["norm_mutual_info"],
            name="normalised MI",
            marker_color=METRIC_COLORS["norm_entropy"],
            customdata=np.column_stack([mi, ent["cond_entropy_bits"], ent["top1_predictability"]]),
            hovertemplate="%{x}<br>normalised MI %{y:.3f}<br>MI %{customdata[0]:.3f} bits<br>"
            "H(B|A) %{customdata[1]:.3f} bits<br>top-1 predictability %{customdata[2]:.3f}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Bar(
            x=x,
            y=norm_base,
            name="shuffled baseline, normalised",
            marker_color=BASELINE_COLOR,
            customdata=base,
            hovertemplate="%{x}<br>baseline normalised %{y:.3f}<br>baseline MI %{customdata:.3f} bits"
            "<extra></extra>",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Bar(
            x=x,
            y=ratio,
            name="MI ÷ baseline",
            marker_color=METRIC_COLORS["max_violation"],
            hovertemplate="%{x}<br>MI is %{y:.3g} × the shuffled baseline<extra></extra>",
        ),
        row=1,
        col=2,
    )
    fig.add_hline(y=1.0, line_dash="dot", line_color=BASELINE_COLOR, row=1, col=2)
    fig.update_layout(barmode="group")
    fig.update_xaxes(type="category")
    fig.update_yaxes(range=[0, 1.02], row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_layout(legend={"orientation": "h", "yanchor": "top", "y": -0.15, "x": 0})
    fig = base_layout(fig, title, height=400)
    fig.update_layout(margin={"t": 80})
    return fig


MAX_ROW_LABELS = 64


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
    row_tokens = int_counts(counts.to_numpy()).sum(axis=1)
    # a row with no token has no distribution: left empty (black) instead of a row of zeros
    z = np.where(row_tokens[:, None] > 0, grid.fillna(0).to_numpy(dtype=float), np.nan)
    fig = go.Figure(
        go.Heatmap(
            z=float_grid(z),
            x=eb,
            y=ea,
            customdata=int_counts(counts.to_numpy()),
            colorscale=MAGNITUDE_SCALE,
            zmin=0,
            zmax=1,
            hoverongaps=False,
            colorbar={"title": {"text": "P(b|a)"}},
            hovertemplate=f"{layer_name(layer)} expert %{{y}} → {layer_name(next_layer)} expert %{{x}}"
            "<br>P %{z:.3f}<br>tokens %{customdata:,}<extra></extra>",
        )
    )
    fig.update_layout(plot_bgcolor=DEAD_COLOR)
    fig.update_xaxes(
        title=f"top-1 expert in {layer_name(next_layer)}",
        dtick=1 if len(eb) <= 32 else None,
        showgrid=False,
        zeroline=False,
        range=[min(eb) - 0.5, max(eb) + 0.5],
    )
    # every row labelled with its tokens up to MAX_ROW_LABELS experts; beyond, plotly's own
    # ticks (hover names each row): plotly measures every tick label it draws, and 128
    # labelled rows took 0.35 s of the page's drawing against 0.05 s (issue 33)
    labelled = len(ea) <= MAX_ROW_LABELS
    fig.update_yaxes(
        title=f"top-1 expert in {layer_name(layer)}" + (" (n = its tokens)" if labelled else ""),
        autorange="reversed",
        showgrid=False,
        zeroline=False,
        **(
            {
                "tickmode": "array",
                "tickvals": ea,
                "ticktext": [f"{a} (n={n:,})" for a, n in zip(ea, row_tokens)],
            }
            if labelled
            else {}
        ),
    )
    return base_layout(fig, title, height=max(380, 120 + 18 * len(ea)))


def _transition_columns(df: pd.DataFrame) -> tuple[str, str]:
    for a, b in (("expert", "next_expert"), ("expert_a", "expert_b"), ("from_expert", "to_expert")):
        if a in df.columns and b in df.columns:
            return a, b
    raise ValueError(f"transition table lacks expert columns: {list(df.columns)}")


def pathway_sankey(paths: pd.DataFrame, layers: Sequence[int], note: str | None = None) -> go.Figure:
    """Sankey of the most frequent top-1 pathways: one column of nodes per MoE layer.

    `paths` has one column per layer holding the expert (named by layer index, or `e{layer}`
    / `expert_{layer}`) and a `count` (tokens following the whole path), or a `path` column
    holding the list of experts. `note` (what the paths were counted over) goes under the title.
    """
    title = "Most frequent top-1 pathways" + (f"<br><sup>{note}</sup>" if note else "")
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
    sources = [s for s, _ in links]
    fig = go.Figure(
        go.Sankey(
            arrangement="snap",
            node={"label": labels, "color": colors, "pad": 8, "thickness": 14, "x": xs, "y": [0.5] * len(xs)},
            link={
                "source": sources,
                "target": [t for _, t in links],
                "value": list(links.values()),
                "color": [translucent(expert_color(_source_expert(labels[s]))) for s in sources],
                "hovertemplate": "%{source.label} → %{target.label}<br>%{value:,} tokens<extra></extra>",
            },
        )
    )
    fig.update_traces(node_y=None)
    fig = base_layout(fig, title, height=460)
    return fig.update_layout(margin={"t": 80}) if note else fig


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


def _source_expert(label: str) -> int:
    return int(label.rsplit("e", 1)[1])

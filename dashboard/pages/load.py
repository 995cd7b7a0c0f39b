"""Load page: layer × expert heatmap (share or lift), per-expert bars for one layer, the
per-rank load of that layer, filters by phase, label value, rank and step range, and the
details of a clicked expert (the tokens routed to it, by count and by lift, and the
experts chosen beside it). The filters live in the URL fragment."""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, State, dcc, html, no_update

from routescope import plots
from routescope.dashboard.components import (
    CARD,
    CHILDREN,
    FIGURE,
    KEEP,
    MESSAGE,
    OPTIONS,
    ROW,
    current,
    filter_bar,
    filter_controls,
    filter_from,
    graph,
    guarded,
    keep_step_range,
    labelled,
    message,
    register_step_boxes,
    table,
)
from routescope.dashboard.queries import SMALL_SAMPLE_PER_EXPERT
from routescope.dashboard.urlstate import int_value, pick, read_fragment, steps_value, write_fragment

PAGE = {"path": "/load", "name": "Load", "order": 1, "title": "routescope · load"}
METRICS = ("lift", "share")


def layout(**_query: Any) -> html.Div:
    return html.Div(
        [
            html.H2("Expert load"),
            filter_bar("load"),
            html.Div(
                [
                    labelled(
                        "colour",
                        dcc.RadioItems(
                            id="load-metric",
                            options=[{"label": f" {m}", "value": m} for m in METRICS],
                            value="lift",
                            inline=True,
                        ),
                        "180px",
                    ),
                    labelled(
                        "layer for bars", dcc.Dropdown(id="load-layer", options=[], clearable=False), "160px"
                    ),
                ],
                style=ROW,
            ),
            html.Div(id="load-message"),
            html.Div(id="load-filter-note", style={"fontSize": "13px", "color": "#555"}),
            graph("load-heatmap", "load_heatmap_lift"),
            html.Div(
                [
                    html.Div(graph("load-bars", "expert_bars"), style={"flex": "1 1 480px"}),
                    # its own callback with a spinner: under a step filter it reads every routing row
                    html.Div(
                        dcc.Loading(graph("load-coactivation", "coactivation_heatmap"), type="dot"),
                        style={"flex": "1 1 420px"},
                    ),
                ],
                style={"display": "flex", "gap": "12px", "flexWrap": "wrap"},
            ),
            html.Div(id="load-ranks"),
            html.H3("Expert details"),
            html.Div(
                "Click a cell of the heatmap to see that expert.",
                id="load-detail",
                style={**CARD, "fontSize": "14px"},
            ),
        ]
    )


@guarded([OPTIONS, OPTIONS, KEEP, KEEP, KEEP, KEEP, OPTIONS, KEEP, OPTIONS, KEEP, KEEP, KEEP, KEEP, KEEP])
def load_controls(
    state: Any,
    steps_now: Any = None,
    steps_max_now: Any = None,
    layer_now: Any = None,
    fragment: Any = None,
) -> tuple:
    """Filter and layer choices for the run, with the values the URL fragment asks for.

    Returns (phase options, label options, step min, max, value, marks, layer options,
    layer, rank options, rank, phase, label, metric, label value). A live run grows: a step
    range that reached the old last step follows the new one, and a chosen layer stays.
    """
    phases, labels, _, lo, hi, _steps, marks, ranks = filter_controls(state, None)
    url = read_fragment(fragment)
    steps = keep_step_range(steps_now, steps_max_now, lo, hi)
    wanted = steps_value(url.get("steps"))
    if wanted is not None and steps_max_now is None:  # first draw: the address wins
        steps = [max(lo, min(wanted[0], hi)), max(lo, min(wanted[1], hi))]
    registry, key = current(state)
    layers = registry.query(key, "summary")["moe_layers"]
    layer_options = [{"label": plots.layer_name(ly), "value": ly} for ly in layers]
    layer_now = layer_now if layer_now in layers else int_value(url.get("layer"))
    layer = layer_now if layer_now in layers else (layers[0] if layers else None)
    rank = pick(url.get("rank"), [o["value"] for o in ranks], "all")
    phase = pick(url.get("phase"), [o["value"] for o in phases], "all")
    label = pick(url.get("label"), [o["value"] for o in labels], None)
    metric = pick(url.get("color"), list(METRICS), "lift")
    value = url.get("value") if label else None
    return (
        phases,
        labels,
        lo,
        hi,
        steps,
        marks,
        layer_options,
        layer,
        ranks,
        rank,
        phase,
        label,
        metric,
        value,
    )


@guarded([OPTIONS])
def load_label_values(state: Any, label: Any) -> list:
    return filter_controls(state, label)[2]


def load_fragment(
    fragment: Any, phase: Any, label: Any, value: Any, steps: Any, rank: Any, metric: Any, layer: Any
) -> Any:
    """The URL fragment for the Load page's controls (the full step range is left out)."""
    steps_text = (
        f"{int(steps[0])}-{int(steps[1])}" if isinstance(steps, (list, tuple)) and len(steps) == 2 else None
    )
    new = write_fragment(
        fragment,
        {
            "phase": phase,
            "label": label,
            "value": value if label else None,
            "steps": steps_text,
            "rank": rank,
            "color": None if metric == "lift" else metric,
            "layer": layer,
        },
    )
    return no_update if new == (fragment or "") else new


def small_sample_note(slots: int, num_experts: int) -> str | None:
    """A warning when a layer's slots give fewer than SMALL_SAMPLE_PER_EXPERT per expert."""
    per_expert = slots / max(1, num_experts)
    if slots == 0 or per_expert >= SMALL_SAMPLE_PER_EXPERT:
        return None
    return (
        f"Small sample: {slots:,} routing slots per layer, about {per_expert:.0f} per expert. "
        "Shares this small move a lot by chance; widen the filter before reading much into them."
    )


def update_load(
    state: Any,
    phase: Any,
    label: Any,
    value: Any,
    steps: Any,
    metric: Any,
    layer: Any,
    rank: Any = None,
) -> tuple:
    """(heatmap, bars, co-activation, per-rank load, message, filter note, heatmap caption):
    both callbacks' outputs at once."""
    heat, bars, rank_fig, msg, note, caption = load_figures(
        state, phase, label, value, steps, metric, layer, rank
    )
    co = update_coactivation(state, phase, label, value, steps, layer, rank)
    return heat, bars, co, rank_fig, msg, note, caption


@guarded([FIGURE])
def update_coactivation(
    state: Any, phase: Any, label: Any, value: Any, steps: Any, layer: Any, rank: Any = None
) -> Any:
    """The co-activation heatmap of one layer (from rollup_coactivation; under a step filter,
    from routing, sampled past sampled.SAMPLE_ROWS rows as the title says)."""
    registry, key = current(state)
    flt = filter_from(key, phase, label, value, steps, rank)
    layers = registry.query(key, "summary")["moe_layers"]
    layer = int(layer) if layer is not None else layers[0]
    run = registry.run(key)
    found = registry.query(key, "coactivation_view", layer, flt)
    note = None if found["sample"] is None else f"{flt.describe()}: counted over {found['sample'].describe()}"
    return plots.coactivation_heatmap(found["frame"], run.num_experts(layer), layer, note)


@guarded([FIGURE, FIGURE, CHILDREN, MESSAGE, CHILDREN, KEEP])
def load_figures(
    state: Any,
    phase: Any,
    label: Any,
    value: Any,
    steps: Any,
    metric: Any,
    layer: Any,
    rank: Any = None,
) -> tuple:
    """(heatmap, bars, per-rank load, message, filter note, heatmap caption): the first view.

    The per-rank load is a captioned graph when the run has two ranks or more, else one line.
    """
    registry, key = current(state)
    flt = filter_from(key, phase, label, value, steps, rank)
    metric = metric if metric in METRICS else "lift"
    load = registry.query(key, "expert_load", flt)
    info = registry.query(key, "summary")
    layers = info["moe_layers"]
    layer = int(layer) if layer is not None else layers[0]
    heat = plots.load_heatmap(load, value=metric)
    bars = plots.expert_bars(load, layer)
    run = registry.run(key)
    several = len(registry.query(key, "filter_choices")["ranks"]) > 1
    ranks = registry.query(key, "rank_loads", flt) if several else None
    if ranks is not None and ranks["rank"].nunique() > 1:
        rank_fig: Any = graph("load-ranks-graph", "rank_load_figure")
        rank_fig.children[0].figure = plots.rank_load_figure(ranks, layer)
    else:
        rank_fig = html.P(
            "Load per rank: one rank recorded this run (or this filter), so there is nothing to set side by side.",
            id="load-ranks-single",
            style={"color": "#555", "fontSize": "13px"},
        )
    slots = int(load.groupby("layer")["tokens"].sum().max() or 0)
    k = run.top_k(layer)
    note = f"{slots // max(1, k):,} tokens, {slots:,} routing slots (k = {k}) per layer · {flt.describe()}"
    if not load["tokens"].sum():
        msg = message("No token matches this filter.", "warning")
    else:
        msg = message(small_sample_note(slots, max(info["num_experts"])), "warning")
    return heat, bars, rank_fig, msg, note, plots.caption(f"load_heatmap_{metric}")


@guarded([CHILDREN])
def show_expert(
    state: Any, click: Any, phase: Any, label: Any, value: Any, steps: Any, rank: Any = None
) -> Any:
    """Details of the clicked heatmap cell: tokens, top tokens by count and lift, co-activated experts."""
    registry, key = current(state)
    if not click or not click.get("points"):
        return "Click a cell of the heatmap to see that expert."
    point = click["points"][0]
    layer = int(str(point["y"]).lstrip("L"))
    expert = int(point["x"])
    flt = filter_from(key, phase, label, value, steps, rank)
    detail = registry.query(key, "expert_detail", layer, expert, flt)
    title = html.H4(f"Layer {layer}, expert {expert}", id="load-detail-title")
    if detail["tokens"] == 0:
        return [
            title,
            message(
                f"Dead under this filter ({flt.describe()}): no token was routed to expert {expert} "
                f"of layer {layer}, so it has no tokens and no partners to list.",
                "warning",
            ),
        ]
    uniform = 1.0 / detail["num_experts"]
    columns = [
        ("token", "token"),
        ("token_id", "id"),
        ("count", "routed here"),
        ("occurrences", "seen"),
        ("lift", "lift"),
    ]
    top = detail["top_tokens"].assign(token=lambda d: d["token"].map(repr))
    by_lift = detail["top_lift"].assign(token=lambda d: d["token"].map(repr))
    state_word = plots.expert_state([detail["tokens"]], [detail["share"]], detail["num_experts"])[0]
    return [
        title,
        html.P(
            f"{detail['tokens']:,} tokens routed here, share {detail['share']:.4f} of the layer's slots "
            f"({detail['share'] / uniform:.2f}× uniform, {state_word}) · {flt.describe()}"
        ),
        html.P(
            "lift = how much more often a token appears among this expert's tokens than among all "
            "tokens (1 = as often); 'seen' counts the token under the filter.",
            style={"color": "#555", "fontSize": "12px"},
        ),
        html.Div(
            [
                html.Div(
                    [html.H5("Most frequent tokens"), table(top, columns)],
                    style={"flex": "1 1 320px"},
                ),
                html.Div(
                    [
                        html.H5("Most over-represented tokens (seen ≥ 5 times)"),
                        table(by_lift, columns)
                        if len(by_lift)
                        else html.P("no token seen 5 times or more is over-represented here"),
                    ],
                    style={"flex": "1 1 320px"},
                ),
                html.Div(
                    [
                        html.H5("Chosen together with"),
                        table(
                            detail["partners"],
                            [("expert_b", "expert"), ("count", "tokens"), ("p_b_given_a", "P(b | this)")],
                        )
                        if len(detail["partners"])
                        else html.P("no other expert (top-1 routing)"),
                    ],
                    style={"flex": "1 1 260px"},
                ),
            ],
            style={"display": "flex", "gap": "24px", "flexWrap": "wrap"},
        ),
    ]


FILTERS = ("phase", "label", "value", "steps", "rank")


def register(app: dash.Dash) -> None:
    dash.register_page(__name__, layout=layout, **PAGE)
    app.callback(
        Output("load-phase", "options"),
        Output("load-label", "options"),
        Output("load-steps", "min"),
        Output("load-steps", "max"),
        Output("load-steps", "value"),
        Output("load-steps", "marks"),
        Output("load-layer", "options"),
        Output("load-layer", "value"),
        Output("load-rank", "options"),
        Output("load-rank", "value"),
        Output("load-phase", "value"),
        Output("load-label", "value"),
        Output("load-metric", "value"),
        Output("load-value", "value"),
        Input("app-version", "data"),
        State("load-steps", "value"),
        State("load-steps", "max"),
        State("load-layer", "value"),
        State("app-url", "hash"),
    )(load_controls)
    register_step_boxes(app, "load")
    app.callback(Output("load-value", "options"), Input("app-version", "data"), Input("load-label", "value"))(
        load_label_values
    )
    app.callback(
        Output("app-url", "hash", allow_duplicate=True),
        State("app-url", "hash"),
        *(Input(f"load-{name}", "value") for name in FILTERS),
        Input("load-metric", "value"),
        Input("load-layer", "value"),
        prevent_initial_call=True,
    )(load_fragment)
    app.callback(
        Output("load-heatmap", "figure"),
        Output("load-bars", "figure"),
        Output("load-ranks", "children"),
        Output("load-message", "children"),
        Output("load-filter-note", "children"),
        Output("load-heatmap-caption", "children"),
        Input("app-version", "data"),
        Input("load-phase", "value"),
        Input("load-label", "value"),
        Input("load-value", "value"),
        Input("load-steps", "value"),
        Input("load-metric", "value"),
        Input("load-layer", "value"),
        Input("load-rank", "value"),
    )(load_figures)
    app.callback(
        Output("load-coactivation", "figure"),
        Input("app-version", "data"),
        Input("load-phase", "value"),
        Input("load-label", "value"),
        Input("load-value", "value"),
        Input("load-steps", "value"),
        Input("load-layer", "value"),
        Input("load-rank", "value"),
    )(update_coactivation)
    app.callback(
        Output("load-detail", "children"),
        Input("app-version", "data"),
        Input("load-heatmap", "clickData"),
        State("load-phase", "value"),
        State("load-label", "value"),
        State("load-value", "value"),
        State("load-steps", "value"),
        State("load-rank", "value"),
    )(show_expert)

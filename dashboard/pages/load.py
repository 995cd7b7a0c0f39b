"""Load page: layer × expert heatmap (share or lift), per-expert bars for one layer, filters
by phase, label value and step range, and the details of a clicked expert (its tokens, the
tokens routed to it and the experts chosen beside it)."""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, State, dcc, html

from dashboard.components import (
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
    table,
)
from routescope import plots

PAGE = {"path": "/load", "name": "Load", "order": 1, "title": "routescope · load"}


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
                            options=[
                                {"label": " lift", "value": "lift"},
                                {"label": " share", "value": "share"},
                            ],
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
                    html.Div(graph("load-coactivation", "coactivation_heatmap"), style={"flex": "1 1 420px"}),
                ],
                style={"display": "flex", "gap": "12px", "flexWrap": "wrap"},
            ),
            html.H3("Expert details"),
            html.Div(
                "Click a cell of the heatmap to see that expert.",
                id="load-detail",
                style={**CARD, "fontSize": "14px"},
            ),
        ]
    )


@guarded([OPTIONS, OPTIONS, KEEP, KEEP, KEEP, KEEP, OPTIONS, KEEP])
def load_controls(
    state: Any, steps_now: Any = None, steps_max_now: Any = None, layer_now: Any = None
) -> tuple:
    """Filter and layer choices for the run: phase, label options, step slider, layers.

    A live run grows: a step range that reached the old last step follows the new one,
    and a chosen layer stays chosen.
    """
    phases, labels, _, lo, hi, steps, marks = filter_controls(state, None)
    steps = keep_step_range(steps_now, steps_max_now, lo, hi)
    registry, key = current(state)
    layers = registry.query(key, "summary")["moe_layers"]
    layer_options = [{"label": plots.layer_name(ly), "value": ly} for ly in layers]
    layer = layer_now if layer_now in layers else (layers[0] if layers else None)
    return phases, labels, lo, hi, steps, marks, layer_options, layer


@guarded([OPTIONS])
def load_label_values(state: Any, label: Any) -> list:
    return filter_controls(state, label)[2]


@guarded([FIGURE, FIGURE, FIGURE, MESSAGE, CHILDREN, KEEP])
def update_load(state: Any, phase: Any, label: Any, value: Any, steps: Any, metric: Any, layer: Any) -> tuple:
    """(heatmap, bars, co-activation, message, filter note, heatmap caption) for the filter."""
    registry, key = current(state)
    flt = filter_from(key, phase, label, value, steps)
    metric = metric if metric in ("share", "lift") else "lift"
    load = registry.query(key, "expert_load", flt)
    layers = registry.query(key, "summary")["moe_layers"]
    layer = int(layer) if layer is not None else layers[0]
    heat = plots.load_heatmap(load, value=metric)
    bars = plots.expert_bars(load, layer)
    co = plots.coactivation_heatmap(
        registry.query(key, "coactivation", layer, flt), registry.run(key).num_experts(layer), layer
    )
    note = f"{int(load.groupby('layer')['tokens'].sum().max() or 0):,} routing slots per layer · {flt.describe()}"
    msg = None if load["tokens"].sum() else message("No token matches this filter.", "warning")
    return heat, bars, co, msg, note, plots.caption(f"load_heatmap_{metric}")


@guarded([CHILDREN])
def show_expert(state: Any, click: Any, phase: Any, label: Any, value: Any, steps: Any) -> Any:
    """Details of the clicked heatmap cell: tokens, top tokens, co-activated experts."""
    registry, key = current(state)
    if not click or not click.get("points"):
        return "Click a cell of the heatmap to see that expert."
    point = click["points"][0]
    layer = int(str(point["y"]).lstrip("L"))
    expert = int(point["x"])
    flt = filter_from(key, phase, label, value, steps)
    detail = registry.query(key, "expert_detail", layer, expert, flt)
    top = detail["top_tokens"].assign(token=lambda d: d["token"].map(repr))
    uniform = 1.0 / detail["num_experts"]
    parts = [
        html.H4(f"Layer {layer}, expert {expert}", id="load-detail-title"),
        html.P(
            f"{detail['tokens']:,} routing slots, share {detail['share']:.4f} "
            f"({detail['share'] / uniform:.2f}× uniform) · {flt.describe()}"
        ),
        html.Div(
            [
                html.Div(
                    [
                        html.H5("Most frequent tokens"),
                        table(top, [("token", "token"), ("token_id", "id"), ("count", "count")]),
                    ],
                    style={"flex": "1 1 300px"},
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
                    style={"flex": "1 1 300px"},
                ),
            ],
            style={"display": "flex", "gap": "24px", "flexWrap": "wrap"},
        ),
    ]
    return parts


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
        Input("app-version", "data"),
        State("load-steps", "value"),
        State("load-steps", "max"),
        State("load-layer", "value"),
    )(load_controls)
    app.callback(Output("load-value", "options"), Input("app-version", "data"), Input("load-label", "value"))(
        load_label_values
    )
    app.callback(
        Output("load-heatmap", "figure"),
        Output("load-bars", "figure"),
        Output("load-coactivation", "figure"),
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
    )(update_load)
    app.callback(
        Output("load-detail", "children"),
        Input("app-version", "data"),
        Input("load-heatmap", "clickData"),
        State("load-phase", "value"),
        State("load-label", "value"),
        State("load-value", "value"),
        State("load-steps", "value"),
    )(show_expert)

"""Time page: how routing changes over a run. One layer's expert × step heatmap (an expert
dying is a row turning black), and the balance metrics of every layer over steps, with the
same filters as the Load page (phase, label value, rank, step range)."""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, State, dcc, html, no_update

from routescope import plots
from routescope.dashboard.components import (
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
)
from routescope.dashboard.filters import step_axis
from routescope.dashboard.queries import MAX_STEP_BINS, balance_of_step_loads
from routescope.dashboard.urlstate import int_value, pick, read_fragment, write_fragment

PAGE = {"path": "/time", "name": "Time", "order": 2, "title": "routescope · time"}
METRICS = ("lift", "share")


def layout(**_query: Any) -> html.Div:
    return html.Div(
        [
            html.H2("Over time"),
            filter_bar("time"),
            html.Div(
                [
                    labelled("layer", dcc.Dropdown(id="time-layer", options=[], clearable=False), "160px"),
                    labelled(
                        "colour",
                        dcc.RadioItems(
                            id="time-metric",
                            options=[{"label": f" {m}", "value": m} for m in METRICS],
                            value="lift",
                            inline=True,
                        ),
                        "180px",
                    ),
                ],
                style=ROW,
            ),
            html.Div(id="time-message"),
            html.Div(id="time-note", style={"fontSize": "13px", "color": "#555"}),
            graph("time-heatmap", "step_heatmap_lift"),
            graph("time-balance", "balance_over_steps_figure"),
        ]
    )


@guarded([OPTIONS, OPTIONS, KEEP, KEEP, KEEP, KEEP, OPTIONS, KEEP, OPTIONS, KEEP, KEEP, KEEP])
def time_controls(
    state: Any, steps_now: Any = None, steps_max_now: Any = None, layer_now: Any = None, fragment: Any = None
) -> tuple:
    """(phase options, label options, step min, max, value, marks, layer options, layer,
    rank options, rank, phase, metric), with the layer and colour the URL asks for."""
    phases, labels, _, lo, hi, _steps, marks, ranks = filter_controls(state, None)
    steps = keep_step_range(steps_now, steps_max_now, lo, hi)
    url = read_fragment(fragment)
    registry, key = current(state)
    layers = registry.query(key, "summary")["moe_layers"]
    layer_now = layer_now if layer_now in layers else int_value(url.get("layer"))
    layer = layer_now if layer_now in layers else (layers[0] if layers else None)
    return (
        phases,
        labels,
        lo,
        hi,
        steps,
        marks,
        [{"label": plots.layer_name(ly), "value": ly} for ly in layers],
        layer,
        ranks,
        pick(url.get("rank"), [o["value"] for o in ranks], "all"),
        pick(url.get("phase"), [o["value"] for o in phases], "all"),
        pick(url.get("color"), list(METRICS), "lift"),
    )


@guarded([OPTIONS])
def time_label_values(state: Any, label: Any) -> list:
    return filter_controls(state, label)[2]


def time_fragment(fragment: Any, phase: Any, rank: Any, metric: Any, layer: Any) -> Any:
    new = write_fragment(
        fragment,
        {"phase": phase, "rank": rank, "color": None if metric == "lift" else metric, "layer": layer},
    )
    return no_update if new == (fragment or "") else new


@guarded([FIGURE, FIGURE, MESSAGE, KEEP, KEEP])
def update_time(
    state: Any,
    phase: Any,
    label: Any,
    value: Any,
    steps: Any,
    rank: Any,
    layer: Any,
    metric: Any,
) -> tuple:
    """(expert × step heatmap, balance over steps, message, note, heatmap caption)."""
    registry, key = current(state)
    flt = filter_from(key, phase, label, value, steps, rank)
    metric = metric if metric in METRICS else "lift"
    layers = registry.query(key, "summary")["moe_layers"]
    layer = int(layer) if layer is not None else layers[0]
    if layer not in layers:
        raise ValueError(f"layer {layer} is not a MoE layer of this run (MoE layers: {layers})")
    loads = registry.query(key, "step_loads", flt)
    balance = balance_of_step_loads(loads)  # pandas over the cached counts: no second pass
    run = registry.run(key)
    axis = "optimizer step" if step_axis(run) == "train_step" else "forward step"
    heat = plots.step_heatmap(loads, layer, run.num_experts(layer), value=metric, axis=axis)
    bins = loads["step_lo"].nunique() if len(loads) else 0
    width = int((loads["step_hi"] - loads["step_lo"]).max() + 1) if len(loads) else 0
    note = (
        f"{bins} bins of {width} step(s) each (at most {MAX_STEP_BINS} columns) · {flt.describe()}"
        if bins
        else flt.describe()
    )
    msg = None if len(loads) else message("No token matches this filter.", "warning")
    if len(loads) and bins < 2:
        msg = message("All selected tokens come from one step bin: nothing changes over time here.", "info")
    return (
        heat,
        plots.balance_over_steps_figure(balance, layer, axis=axis),
        msg,
        note,
        plots.caption(f"step_heatmap_{metric}"),
    )


def register(app: dash.Dash) -> None:
    dash.register_page(__name__, layout=layout, **PAGE)
    app.callback(
        Output("time-phase", "options"),
        Output("time-label", "options"),
        Output("time-steps", "min"),
        Output("time-steps", "max"),
        Output("time-steps", "value"),
        Output("time-steps", "marks"),
        Output("time-layer", "options"),
        Output("time-layer", "value"),
        Output("time-rank", "options"),
        Output("time-rank", "value"),
        Output("time-phase", "value"),
        Output("time-metric", "value"),
        Input("app-version", "data"),
        State("time-steps", "value"),
        State("time-steps", "max"),
        State("time-layer", "value"),
        State("app-url", "hash"),
    )(time_controls)
    register_step_boxes(app, "time")
    app.callback(Output("time-value", "options"), Input("app-version", "data"), Input("time-label", "value"))(
        time_label_values
    )
    app.callback(
        Output("app-url", "hash", allow_duplicate=True),
        State("app-url", "hash"),
        Input("time-phase", "value"),
        Input("time-rank", "value"),
        Input("time-metric", "value"),
        Input("time-layer", "value"),
        prevent_initial_call=True,
    )(time_fragment)
    app.callback(
        Output("time-heatmap", "figure"),
        Output("time-balance", "figure"),
        Output("time-message", "children"),
        Output("time-note", "children"),
        Output("time-heatmap-caption", "children"),
        Input("app-version", "data"),
        Input("time-phase", "value"),
        Input("time-label", "value"),
        Input("time-value", "value"),
        Input("time-steps", "value"),
        Input("time-rank", "value"),
        Input("time-layer", "value"),
        Input("time-metric", "value"),
    )(update_time)

"""Specialization page: label value × expert lift for one layer at a time, and the
repetition rate of top-1 experts between consecutive tokens against its uniform baseline."""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, State, dcc, html

from dashboard.components import (
    FIGURE,
    KEEP,
    MESSAGE,
    OPTIONS,
    ROW,
    current,
    graph,
    guarded,
    labelled,
    message,
)
from routescope import plots

PAGE = {
    "path": "/specialization",
    "name": "Specialization",
    "order": 4,
    "title": "routescope · specialization",
}


def layout(**_query: Any) -> html.Div:
    return html.Div(
        [
            html.H2("Specialization"),
            html.Div(
                [
                    labelled(
                        "label", dcc.Dropdown(id="specialization-label", options=[], clearable=False), "200px"
                    ),
                    labelled(
                        "layer", dcc.Dropdown(id="specialization-layer", options=[], clearable=False), "160px"
                    ),
                ],
                style=ROW,
            ),
            html.Div(id="specialization-message"),
            graph("specialization-heatmap", "specialization_heatmap"),
            graph("specialization-repetition", "repetition_figure"),
        ]
    )


@guarded([OPTIONS, KEEP, OPTIONS, KEEP])
def specialization_controls(state: Any, label_now: Any = None, layer_now: Any = None) -> tuple:
    """Labels and MoE layers of the run."""
    registry, key = current(state)
    info = registry.query(key, "summary")
    labels, layers = info["labels"], info["moe_layers"]
    label = label_now if label_now in labels else (labels[0] if labels else None)
    layer = layer_now if layer_now in layers else (layers[0] if layers else None)
    return (
        [{"label": name, "value": name} for name in labels],
        label,
        [{"label": plots.layer_name(ly), "value": ly} for ly in layers],
        layer,
    )


@guarded([FIGURE, MESSAGE])
def update_specialization(state: Any, label: Any, layer: Any) -> tuple:
    """(lift heatmap, message) for one label and layer."""
    registry, key = current(state)
    info = registry.query(key, "summary")
    if not info["labels"]:
        note = (
            "This run has no labels: record with rs.record(..., labels={'domain': ...}) to compare by label."
        )
        return plots.empty_figure("no labels in this run"), message(note, "info")
    label = label if label in info["labels"] else info["labels"][0]
    layer = int(layer) if layer is not None else info["moe_layers"][0]
    spec = registry.query(key, "specialization", label)
    return plots.specialization_heatmap(spec, label, layer), None


@guarded([FIGURE])
def update_repetition(state: Any) -> Any:
    """The repetition-rate figure (its own callback: it does not follow the label or layer)."""
    registry, key = current(state)
    return plots.repetition_figure(registry.query(key, "repetition"))


def register(app: dash.Dash) -> None:
    dash.register_page(__name__, layout=layout, **PAGE)
    app.callback(
        Output("specialization-label", "options"),
        Output("specialization-label", "value"),
        Output("specialization-layer", "options"),
        Output("specialization-layer", "value"),
        Input("app-version", "data"),
        State("specialization-label", "value"),
        State("specialization-layer", "value"),
    )(specialization_controls)
    app.callback(Output("specialization-repetition", "figure"), Input("app-version", "data"))(
        update_repetition
    )
    app.callback(
        Output("specialization-heatmap", "figure"),
        Output("specialization-message", "children"),
        Input("app-version", "data"),
        Input("specialization-label", "value"),
        Input("specialization-layer", "value"),
    )(update_specialization)

"""Specialization page: label value × expert lift for one layer at a time, and the
repetition rate of top-1 experts between consecutive tokens against its uniform baseline."""

from __future__ import annotations

from typing import Any

import dash
import numpy as np
import pandas as pd
from dash import Input, Output, State, dcc, html, no_update

from routescope import plots
from routescope.dashboard.components import (
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
from routescope.dashboard.urlstate import int_value, pick, read_fragment, register_fragment

BASELINES = ("uniform", "expert")

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
                    labelled(
                        "lift against",
                        dcc.RadioItems(
                            id="specialization-baseline",
                            options=[
                                {"label": " uniform (share × E)", "value": "uniform"},
                                {"label": " the expert's overall share", "value": "expert"},
                            ],
                            value="uniform",
                            inline=True,
                        ),
                        "420px",
                    ),
                ],
                style=ROW,
            ),
            html.Div(id="specialization-message"),
            graph("specialization-heatmap", "specialization_heatmap"),
            graph("specialization-repetition", "repetition_figure"),
        ]
    )


@guarded([OPTIONS, KEEP, OPTIONS, KEEP, KEEP])
def specialization_controls(
    state: Any, label_now: Any = None, layer_now: Any = None, fragment: Any = None
) -> tuple:
    """Labels and MoE layers of the run, and the label, layer and baseline the URL asks for."""
    registry, key = current(state)
    info = registry.query(key, "summary")
    labels, layers = info["labels"], info["moe_layers"]
    url = read_fragment(fragment)
    label_now = label_now if label_now in labels else url.get("label")
    layer_now = layer_now if layer_now in layers else int_value(url.get("layer"))
    label = label_now if label_now in labels else (labels[0] if labels else None)
    layer = layer_now if layer_now in layers else (layers[0] if layers else None)
    return (
        [{"label": name, "value": name} for name in labels],
        label,
        [{"label": plots.layer_name(ly), "value": ly} for ly in layers],
        layer,
        pick(url.get("lift"), list(BASELINES), "uniform"),
    )


def lift_against_expert(spec: pd.DataFrame, load: pd.DataFrame) -> pd.DataFrame:
    """Specialization rows with lift = share within the label value ÷ the expert's share over
    all tokens: the expert's load imbalance divided out (NaN for an expert with no token)."""
    overall = load.set_index(["layer", "expert"])["share"]
    base = overall.reindex(pd.MultiIndex.from_frame(spec[["layer", "expert"]])).to_numpy()
    return spec.assign(lift=spec["share"].to_numpy() / np.where(base > 0, base, np.nan))


@guarded([FIGURE, MESSAGE, KEEP])
def update_specialization(state: Any, label: Any, layer: Any, baseline: Any = "uniform") -> tuple:
    """(lift heatmap, message, caption) for one label and layer, lift against uniform or the expert's share."""
    registry, key = current(state)
    info = registry.query(key, "summary")
    if not info["labels"]:
        note = (
            "This run has no labels: record with rs.record(..., labels={'domain': ...}) to compare by label."
        )
        return plots.empty_figure("no labels in this run"), message(note, "info"), no_update
    label = label if label in info["labels"] else info["labels"][0]
    layer = int(layer) if layer is not None else info["moe_layers"][0]
    spec = registry.query(key, "specialization", label)
    if baseline == "expert":
        spec = lift_against_expert(spec, registry.query(key, "expert_load"))
        fig = plots.specialization_heatmap(spec, label, layer)
        fig.update_layout(title_text=f"Lift by {label} in layer {layer}, against each expert's overall share")
        return fig, None, plots.caption("specialization_heatmap_expert")
    return plots.specialization_heatmap(spec, label, layer), None, plots.caption("specialization_heatmap")


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
        Output("specialization-baseline", "value"),
        Input("app-version", "data"),
        State("specialization-label", "value"),
        State("specialization-layer", "value"),
        State("app-url", "hash"),
    )(specialization_controls)
    register_fragment(
        app,
        {"label": "specialization-label", "layer": "specialization-layer", "lift": "specialization-baseline"},
        {"lift": "uniform"},
    )
    app.callback(Output("specialization-repetition", "figure"), Input("app-version", "data"))(
        update_repetition
    )
    app.callback(
        Output("specialization-heatmap", "figure"),
        Output("specialization-message", "children"),
        Output("specialization-heatmap-caption", "children"),
        Input("app-version", "data"),
        Input("specialization-label", "value"),
        Input("specialization-layer", "value"),
        Input("specialization-baseline", "value"),
    )(update_specialization)

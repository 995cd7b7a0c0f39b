"""Compare page: two of the served runs through `routescope.compare`: per-expert load
deltas, balance per layer in both, router saturation, and the experts that changed state."""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, State, dcc, html

from dashboard.components import (
    CHILDREN,
    FIGURE,
    KEEP,
    MESSAGE,
    OPTIONS,
    ROW,
    graph,
    guarded,
    labelled,
    message,
    table,
)
from dashboard.runs import RunUnavailable, get_registry
from routescope import plots

PAGE = {"path": "/compare", "name": "Compare", "order": 7, "title": "routescope · compare"}


def layout(**_query: Any) -> html.Div:
    return html.Div(
        [
            html.H2("Compare two runs"),
            html.Div(
                [
                    labelled("run A", dcc.Dropdown(id="compare-run-a", options=[], clearable=False), "320px"),
                    labelled("run B", dcc.Dropdown(id="compare-run-b", options=[], clearable=False), "320px"),
                ],
                style=ROW,
            ),
            html.Div(id="compare-message"),
            graph("compare-delta", "load_delta_heatmap"),
            graph("compare-balance", "balance_change_figure"),
            graph("compare-saturation", "saturation_figure"),
            html.Div(id="compare-summary"),
        ]
    )


@guarded([OPTIONS, KEEP, OPTIONS, KEEP])
def compare_controls(state: Any, a_now: Any = None, b_now: Any = None) -> tuple:
    """Both dropdowns list the served runs; A defaults to the first, B to the second."""
    registry = get_registry()
    options = registry.options()
    keys = registry.keys
    a = a_now if a_now in keys else keys[0]
    b = b_now if b_now in keys else keys[min(1, len(keys) - 1)]
    return options, a, options, b


@guarded([FIGURE, FIGURE, FIGURE, CHILDREN, MESSAGE])
def update_compare(state: Any, key_a: Any, key_b: Any) -> tuple:
    """(load delta, balance change, saturation, tables, message) from `routescope.compare`."""
    registry = get_registry()
    keys = registry.keys
    key_a = key_a if key_a is not None else keys[0]
    key_b = key_b if key_b is not None else keys[min(1, len(keys) - 1)]
    for key in (key_a, key_b):
        if registry.query(key, "summary")["tokens"] == 0:
            raise RunUnavailable(f"{registry.name(key)} holds no tokens: nothing to compare")
    result = registry.query_pair(key_a, key_b, "comparison")
    notes = list(result.notes)
    if key_a == key_b:
        notes.insert(
            0, "Run A and run B are the same run: pick two different runs (serve two runs to compare)."
        )
    msg = message(" · ".join(notes), "warning") if notes else None
    return (
        plots.load_delta_heatmap(result.load),
        plots.balance_change_figure(result.balance),
        plots.saturation_figure(result.saturation),
        tables(result),
        msg,
    )


def tables(result: Any) -> html.Div:
    """Per-layer balance changes and the experts that died, revived, became hot or cooled."""
    bal = result.balance
    columns = [("layer", "layer")] + [
        (f"{m}{suffix}", f"{m} {name}")
        for m in ("cv", "max_violation")
        for suffix, name in (("_a", "A"), ("_b", "B"), ("_delta", "Δ"))
        if f"{m}{suffix}" in bal.columns
    ]
    changes = result.expert_changes
    return html.Div(
        [
            html.H4("Balance per layer (Δ = B − A)"),
            table(bal, columns, max_rows=200),
            html.H4(f"Experts that changed state ({len(changes)})"),
            table(
                changes,
                [
                    ("layer", "layer"),
                    ("expert", "expert"),
                    ("change", "change"),
                    ("share_a", "share A"),
                    ("share_b", "share B"),
                ],
                max_rows=100,
            )
            if len(changes)
            else html.P("No expert died, revived, became hot or cooled."),
        ],
        id="compare-table",
    )


def register(app: dash.Dash) -> None:
    dash.register_page(__name__, layout=layout, **PAGE)
    app.callback(
        Output("compare-run-a", "options"),
        Output("compare-run-a", "value"),
        Output("compare-run-b", "options"),
        Output("compare-run-b", "value"),
        Input("app-version", "data"),
        State("compare-run-a", "value"),
        State("compare-run-b", "value"),
    )(compare_controls)
    app.callback(
        Output("compare-delta", "figure"),
        Output("compare-balance", "figure"),
        Output("compare-saturation", "figure"),
        Output("compare-summary", "children"),
        Output("compare-message", "children"),
        Input("app-version", "data"),
        Input("compare-run-a", "value"),
        Input("compare-run-b", "value"),
    )(update_compare)

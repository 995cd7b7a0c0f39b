"""Compare page: two of the served runs side by side: per-expert load deltas, balance per
layer in both, and router saturation (mean top-1 weight, router entropy when recorded)."""

from __future__ import annotations

from typing import Any

import dash
import pandas as pd
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

PAGE = {"path": "/compare", "name": "Compare", "order": 6, "title": "routescope · compare"}


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
            html.Div(id="compare-summary"),
            graph("compare-delta", "load_delta_heatmap"),
            graph("compare-balance", "balance_change_figure"),
            graph("compare-saturation", "saturation_figure"),
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
    """(load delta, balance change, saturation, summary table, message)."""
    registry = get_registry()
    if key_a is None or key_b is None:
        key_a = key_a or registry.keys[0]
        key_b = key_b or registry.keys[min(1, len(registry.keys) - 1)]
    for key in (key_a, key_b):
        if registry.query(key, "summary")["tokens"] == 0:
            raise RunUnavailable(f"{registry.name(key)} holds no tokens: nothing to compare")
    info_a, info_b = registry.query(key_a, "summary"), registry.query(key_b, "summary")
    notes = []
    if key_a == key_b:
        notes.append(
            "Run A and run B are the same run: pick two different runs (start the dashboard with two runs)."
        )
    if info_a["moe_layers"] != info_b["moe_layers"] or info_a["num_experts"] != info_b["num_experts"]:
        notes.append(
            "The runs have different MoE layers or expert counts: only matching (layer, expert) cells compare."
        )
    load_a, load_b = registry.query(key_a, "expert_load"), registry.query(key_b, "expert_load")
    bal_a, bal_b = registry.query(key_a, "balance"), registry.query(key_b, "balance")
    sat_a, sat_b = registry.query(key_a, "saturation"), registry.query(key_b, "saturation")
    summary = summary_table(bal_a, bal_b, sat_a, sat_b)
    msg = message(" ".join(notes), "warning") if notes else None
    return (
        plots.load_delta_heatmap(load_a, load_b),
        plots.balance_change_figure(bal_a, bal_b),
        plots.saturation_figure(sat_a, sat_b),
        summary,
        msg,
    )


def summary_table(
    bal_a: pd.DataFrame, bal_b: pd.DataFrame, sat_a: pd.DataFrame, sat_b: pd.DataFrame
) -> html.Div:
    """Per layer: cv and top-1 weight in A and B, and their changes."""
    cols = ["layer", "cv", "max_violation", "norm_entropy"]
    df = bal_a[cols].merge(bal_b[cols], on="layer", how="outer", suffixes=("_a", "_b"))
    df = df.merge(sat_a[["layer", "top1_weight"]], on="layer", how="left").merge(
        sat_b[["layer", "top1_weight"]], on="layer", how="left", suffixes=("_a", "_b")
    )
    df["cv_change"] = df["cv_b"] - df["cv_a"]
    df["top1_change"] = df["top1_weight_b"] - df["top1_weight_a"]
    columns = [
        ("layer", "layer"),
        ("cv_a", "cv A"),
        ("cv_b", "cv B"),
        ("cv_change", "Δ cv"),
        ("max_violation_a", "max_vio A"),
        ("max_violation_b", "max_vio B"),
        ("top1_weight_a", "top-1 weight A"),
        ("top1_weight_b", "top-1 weight B"),
        ("top1_change", "Δ top-1"),
    ]
    return html.Div([html.H4("Per layer"), table(df, columns, max_rows=200)], id="compare-table")


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

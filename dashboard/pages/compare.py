"""Compare page: two of the served runs through `routescope.compare`: per-expert load
deltas, balance per layer in both, and the experts that changed state first (from the rollup
tables), then router saturation and token agreement in a callback of their own behind a
spinner (they match every token by content, the slow part on a large run)."""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, State, dcc, html

from routescope import plots
from routescope.dashboard.components import (
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
from routescope.dashboard.runs import RunUnavailable, get_registry
from routescope.dashboard.urlstate import read_fragment, register_fragment

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
            html.Div(
                [
                    graph("compare-delta", "load_delta_heatmap"),
                    graph("compare-balance", "balance_change_figure"),
                    dcc.Loading(
                        html.Div(
                            [
                                html.P(
                                    "Router saturation matches every token of A with B's by content: "
                                    "it follows the figures above on a large run.",
                                    id="compare-saturation-note",
                                ),
                                graph("compare-saturation", "saturation_figure"),
                                html.Div(id="compare-saturation-summary"),
                            ]
                        ),
                        type="circle",
                    ),
                ],
                id="compare-figures",
            ),
            html.Div(id="compare-summary"),
        ]
    )


@guarded([OPTIONS, KEEP, OPTIONS, KEEP])
def compare_controls(state: Any, a_now: Any = None, b_now: Any = None, fragment: Any = None) -> tuple:
    """Both dropdowns list the served runs; A defaults to the first, B to the second, or what
    the URL asks for."""
    registry = get_registry()
    options = registry.options()
    keys = registry.keys
    url = read_fragment(fragment)
    a_now = a_now if a_now in keys else url.get("a")
    b_now = b_now if b_now in keys else url.get("b")
    a = a_now if a_now in keys else keys[0]
    b = b_now if b_now in keys else keys[min(1, len(keys) - 1)]
    return options, a, options, b


GUIDANCE = (
    "Compare needs two different runs. Serve two runs (routescope dashboard RUN_A RUN_B) and pick one as "
    "A and the other as B: this page then shows the change of every expert's share, every balance metric "
    "of both runs per layer, and router saturation over the tokens the two runs share."
)
SHOWN, HIDDEN = {}, {"display": "none"}


def _pair(key_a: Any, key_b: Any) -> tuple[Any, Any, Any, str | None]:
    """(registry, A, B, guidance): guidance when fewer than two runs or the same one twice."""
    registry = get_registry()
    keys = registry.keys
    key_a = key_a if key_a is not None else keys[0]
    key_b = key_b if key_b is not None else keys[min(1, len(keys) - 1)]
    for key in (key_a, key_b):
        registry._slot(key)  # RunUnavailable for a key that is not served
    if len(keys) < 2 or key_a == key_b:
        return (
            registry,
            key_a,
            key_b,
            (GUIDANCE if len(keys) < 2 else "Run A and run B are the same run: pick two different runs."),
        )
    for key in (key_a, key_b):
        if registry.query(key, "summary")["tokens"] == 0:
            raise RunUnavailable(f"{registry.name(key)} holds no tokens: nothing to compare")
    return registry, key_a, key_b, None


@guarded([FIGURE, FIGURE, CHILDREN, MESSAGE, KEEP])
def update_compare(state: Any, key_a: Any, key_b: Any) -> tuple:
    """(load delta, balance change, tables, message, figures style): the parts that read the
    rollup tables. Router saturation follows in `update_saturation`.

    With one served run, or the same run on both sides, only guidance is shown: the
    figures would compare a run with itself.
    """
    registry, key_a, key_b, guidance = _pair(key_a, key_b)
    if guidance:
        empty = plots.empty_figure("pick two different runs")
        return empty, empty, None, message(guidance, "info"), HIDDEN
    result = registry.query_pair(key_a, key_b, "comparison", False)
    notes = list(result.notes)
    msg = message(" · ".join(notes), "warning") if notes else None
    return (
        plots.load_delta_heatmap(result.load),
        plots.balance_change_figure(result.balance),
        tables(result),
        msg,
        SHOWN,
    )


@guarded([FIGURE, CHILDREN])
def update_saturation(state: Any, key_a: Any, key_b: Any) -> tuple:
    """(saturation figure, saturation table and token agreement), computed after the rest."""
    registry, key_a, key_b, guidance = _pair(key_a, key_b)
    if guidance:
        return plots.empty_figure("pick two different runs"), None
    result = registry.query_pair(key_a, key_b, "saturation_comparison")
    return plots.saturation_figure(result.saturation), saturation_tables(result)


def tables(result: Any) -> html.Div:
    """Per-layer balance changes and the experts that died, revived, became hot or cooled."""
    bal = result.balance
    columns = [("layer", "layer")] + [
        (f"{m}{suffix}", f"{m} {name}")
        for m in ("tokens", "cv", "max_violation", "balancedness", "norm_entropy")
        for suffix, name in (("_a", "A"), ("_b", "B"), ("_delta", "Δ"))
        if f"{m}{suffix}" in bal.columns
    ]
    changes = result.expert_changes
    return html.Div(
        [
            html.H4(
                "Balance per layer (Δ = B − A; cv, max_violation: lower is better; balancedness, "
                "norm_entropy: higher is better)"
            ),
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


def saturation_tables(result: Any) -> html.Div:
    """Router saturation per layer and the token agreement over all common layers (SPEC 4.7)."""
    sat = result.saturation
    sat_columns = [
        (c, c.replace("_", " "))
        for c in ("layer", "top_k", "tokens_matched", "saturation", "top1_agreement", "exact_match")
        if c in sat.columns
    ]
    return html.Div(
        [
            html.H4("Router saturation per layer (tokens_matched: tokens of A whose content is in B)"),
            table(sat, sat_columns, max_rows=200),
            agreement_summary(result.token_agreement),
        ],
        id="compare-saturation-table",
    )


def agreement_summary(agreement: Any) -> html.P:
    """R3's statistics over all common layers (SPEC 4.7), in one sentence."""
    if agreement is None or not len(agreement) or not agreement["tokens_matched"].iloc[0]:
        return html.P("Token agreement: no token of A has its content in B.", id="compare-agreement")
    row = agreement.iloc[0]
    text = (
        f"Token agreement over {int(row['layers'])} common MoE layers: {int(row['tokens_matched']):,} "
        f"tokens matched; {row['any_layer_differs']:.1%} have a different top-k set in at least one "
        f"layer (the R3 statistic); {row['missing_routes']:.1%} of B's tokens have no routing "
        "(context tokens of an import)."
    )
    return html.P(text, id="compare-agreement")


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
        State("app-url", "hash"),
    )(compare_controls)
    register_fragment(app, {"a": "compare-run-a", "b": "compare-run-b"})
    app.callback(
        Output("compare-delta", "figure"),
        Output("compare-balance", "figure"),
        Output("compare-summary", "children"),
        Output("compare-message", "children"),
        Output("compare-figures", "style"),
        Input("app-version", "data"),
        Input("compare-run-a", "value"),
        Input("compare-run-b", "value"),
    )(update_compare)
    app.callback(
        Output("compare-saturation", "figure"),
        Output("compare-saturation-summary", "children"),
        Input("app-version", "data"),
        Input("compare-run-a", "value"),
        Input("compare-run-b", "value"),
    )(update_saturation)

"""Super Experts page: the calibration's largest expert outputs per layer with the two
thresholds, and the massive activations of the residual stream; without a calibration it
says so and gives the command that makes one."""

from __future__ import annotations

import shlex
from typing import Any

import dash
from dash import Input, Output, html

from dashboard.components import CHILDREN, FIGURE, MESSAGE, current, graph, guarded, message, table
from routescope import plots

PAGE = {"path": "/super-experts", "name": "Super Experts", "order": 5, "title": "routescope · super experts"}


def layout(**_query: Any) -> html.Div:
    return html.Div(
        [
            html.H2("Super Experts"),
            html.Div(id="super-experts-message"),
            graph("super-experts-scatter", "super_expert_scatter"),
            html.Div(id="super-experts-list"),
            graph("super-experts-massive", "massive_activation_figure"),
        ]
    )


def calibration_command(model_name: str, run_path: str) -> str:
    model = model_name if model_name else "M"
    return f"routescope super-experts --model {shlex.quote(model)} --data D --out {shlex.quote(run_path)}"


@guarded([FIGURE, CHILDREN, FIGURE, MESSAGE])
def update_super_experts(state: Any) -> tuple:
    """(scatter, list of Super Experts, massive-activation figure, message)."""
    registry, key = current(state, require_tokens=False)
    run = registry.run(key)
    found = registry.query(key, "super_experts")
    hidden = registry.query(key, "hidden_stats")
    if not found["has_data"]:
        cmd = calibration_command(str(run.manifest.get("model_name", "")), str(run.path))
        note = html.Div(
            [
                html.Div("This run has no Super Expert calibration. Make one with:"),
                html.Code(cmd, id="super-experts-command", style={"display": "block", "margin": "6px 0"}),
                html.Div(
                    "(D: a text file, folder or JSONL with a 'text' field; M: the model the run recorded.)"
                ),
            ],
            className="rs-message rs-info",
            style={
                "background": "#eef5fc",
                "border": "1px solid #9cc3e8",
                "padding": "8px 12px",
                "borderRadius": "6px",
            },
        )
        empty = plots.empty_figure("no calibration in this run")
        return empty, None, plots.massive_activation_figure(hidden), note
    experts = found["experts"]
    supers = experts[experts["is_super"].astype(bool)]
    layers = found.get("layers") or []
    searched = f"layers {min(layers)}–{max(layers)}" if layers else "no layer"
    listing = (
        html.Div(
            [
                html.H4(f"{len(supers)} Super Expert(s) (searched {searched})"),
                table(
                    supers,
                    [
                        ("layer", "layer"),
                        ("expert", "expert"),
                        ("shared", "shared"),
                        ("max_abs_output", "max |output|"),
                        ("channel", "channel"),
                    ],
                ),
            ]
        )
        if len(supers)
        else message(
            f"No expert passes both thresholds in the massive-activation layers ({searched}).", "info"
        )
    )
    scatter = plots.super_expert_scatter(experts, found["percentile_threshold"], found["max_threshold"])
    return scatter, listing, plots.massive_activation_figure(hidden), None


def register(app: dash.Dash) -> None:
    dash.register_page(__name__, layout=layout, **PAGE)
    app.callback(
        Output("super-experts-scatter", "figure"),
        Output("super-experts-list", "children"),
        Output("super-experts-massive", "figure"),
        Output("super-experts-message", "children"),
        Input("app-version", "data"),
    )(update_super_experts)

"""Super Experts page: the calibration's largest expert outputs per layer with the two
thresholds, and the massive activations of the residual stream; without a calibration it
says so and gives the command that makes one."""

from __future__ import annotations

import shlex
from typing import Any

import dash
from dash import Input, Output, html

from routescope import plots
from routescope.dashboard.components import CHILDREN, FIGURE, MESSAGE, current, graph, guarded, message, table

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
    rule = rule_text(found, searched, len(supers))
    listing = html.Div(
        [
            html.P(rule, id="super-experts-rule", style={"fontSize": "14px"}),
            html.P(massive_text(hidden), id="super-experts-massive-note", style={"fontSize": "14px"}),
            html.H4(f"{len(supers)} Super Expert(s) (searched {searched})"),
            table(link_channels(supers, hidden), LIST_COLUMNS)
            if len(supers)
            else message(f"No expert passes both thresholds in the searched layers ({searched}).", "info"),
        ]
    )
    scatter = plots.super_expert_scatter(
        experts, found["percentile_threshold"], found["max_threshold"], searched_layers=layers
    )
    return scatter, listing, plots.massive_activation_figure(hidden), None


LIST_COLUMNS = [
    ("layer", "layer"),
    ("expert", "expert"),
    ("shared", "shared"),
    ("max_abs_output", "max |output|"),
    ("ratio_to_median", "× median"),
    ("channel", "channel"),
    ("residual_channel", "massive channel after this layer"),
    ("coincides", "same channel?"),
]


def rule_text(found: dict[str, Any], searched: str, count: int) -> str:
    def num(value: Any) -> str:
        return "n/a" if value is None or value != value else f"{value:.4g}"

    return (
        f"Rule (arXiv 2507.23279, SPEC 4.6): an expert of the searched layers ({searched}, the first 75% "
        f"of decoder layers) whose largest output is above the 99.5th percentile ({num(found['percentile_threshold'])}) "
        f"and above max / 10 ({num(found['max_threshold'])}) of the {found.get('pooled_experts') or 0} experts "
        f"of those layers (median {num(found.get('median'))}). {count} expert(s) meet it."
    )


def massive_text(hidden: Any) -> str:
    if hidden is None or not len(hidden):
        return "This run has no residual-stream statistics (hidden_stats)."
    massive = hidden[hidden["is_massive"].astype(bool)]
    if not len(massive):
        return (
            "Residual stream: no layer meets the massive-activation rule (|h| > 100 and > 1000 × the median), "
            "so no Super Expert here is backed by a massive activation."
        )
    where = ", ".join(f"L{int(r.layer)} (channel {int(r.channel)})" for r in massive.itertuples())
    return f"Residual stream: massive activations (|h| > 100 and > 1000 × the median) after {where}."


def link_channels(supers: Any, hidden: Any) -> Any:
    """Each Super Expert with the residual stream's largest channel after its layer, and
    whether the two channels coincide (the paper's link between them)."""
    out = supers.copy()
    by_layer = {} if hidden is None or not len(hidden) else dict(zip(hidden["layer"], hidden["channel"]))
    massive = (
        {}
        if hidden is None or not len(hidden)
        else dict(zip(hidden["layer"], hidden["is_massive"].astype(bool)))
    )
    channels, same = [], []
    for layer, channel in zip(out["layer"], out["channel"]):
        residual = by_layer.get(layer)
        channels.append("n/a" if residual is None else str(int(residual)))
        if residual is None:
            same.append("n/a")
        elif int(residual) == int(channel):
            same.append("yes, massive" if massive.get(layer) else "yes (not massive)")
        else:
            same.append("no")
    return out.assign(residual_channel=channels, coincides=same)


def register(app: dash.Dash) -> None:
    dash.register_page(__name__, layout=layout, **PAGE)
    app.callback(
        Output("super-experts-scatter", "figure"),
        Output("super-experts-list", "children"),
        Output("super-experts-massive", "figure"),
        Output("super-experts-message", "children"),
        Input("app-version", "data"),
    )(update_super_experts)

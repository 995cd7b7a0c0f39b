"""Tokens page: pick a sequence and see, token by token, which expert each MoE layer chose
("expert lanes"), with all k choices and their weights on hover. A window of positions is
drawn at a time, so even a very long sequence sends a bounded payload."""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, State, dcc, html, no_update

from routescope import plots
from routescope.dashboard.components import (
    CHILDREN,
    FIGURE,
    KEEP,
    MESSAGE,
    OPTIONS,
    ROW,
    current,
    graph,
    guarded,
    labelled,
)
from routescope.dashboard.urlstate import int_value, read_fragment, register_fragment

PAGE = {"path": "/tokens", "name": "Tokens", "order": 6, "title": "routescope · tokens"}


def layout(**_query: Any) -> html.Div:
    return html.Div(
        [
            html.H2("Tokens"),
            html.Div(
                [
                    labelled("sequence", dcc.Dropdown(id="tokens-seq", options=[], clearable=False), "420px"),
                    labelled(
                        "or any sequence id",
                        dcc.Input(id="tokens-seq-id", type="number", min=0, step=1, debounce=True),
                        "160px",
                    ),
                    labelled(
                        "first position",
                        dcc.Input(id="tokens-start", type="number", min=0, step=1, value=0, debounce=True),
                        "160px",
                    ),
                    labelled(
                        "colour the text by the top-1 expert of",
                        dcc.Dropdown(id="tokens-layer", options=[], clearable=False),
                        "240px",
                    ),
                ],
                style=ROW,
            ),
            html.Div(id="tokens-message"),
            html.Div(id="tokens-window", style={"fontSize": "13px", "color": "#555", "margin": "6px 0"}),
            graph("tokens-lanes", "expert_lanes"),
            html.H4("Text of the window"),
            html.Div(
                id="tokens-text",
                style={
                    "fontFamily": "monospace",
                    "whiteSpace": "pre-wrap",
                    "fontSize": "13px",
                    "lineHeight": "1.8",
                },
            ),
        ]
    )


def sequence_label(row: Any, labels: list[str]) -> str:
    tags = " ".join(f"{lb}={row[lb]}" for lb in labels if lb in row and row[lb] is not None)
    return f"seq {int(row['seq_id'])} · {int(row['tokens'])} tokens" + (f" · {tags}" if tags else "")


@guarded([OPTIONS, KEEP, OPTIONS, KEEP, KEEP])
def tokens_controls(state: Any, seq_now: Any = None, layer_now: Any = None, fragment: Any = None) -> tuple:
    """The first sequences of the run (capped) as dropdown options, the MoE layers, and the
    sequence, layer and first position the URL asks for."""
    registry, key = current(state)
    layers = registry.query(key, "summary")["moe_layers"]
    url = read_fragment(fragment)
    layer_now = layer_now if layer_now in layers else int_value(url.get("layer"))
    layer_options = [{"label": plots.layer_name(ly), "value": ly} for ly in layers]
    layer = layer_now if layer_now in layers else (layers[0] if layers else None)
    seqs = registry.query(key, "sequences")
    labels = registry.run(key).labels
    options = [
        {"label": sequence_label(row, labels), "value": int(row["seq_id"])} for _, row in seqs.iterrows()
    ]
    values = {o["value"] for o in options}
    seq_now = seq_now if seq_now in values else int_value(url.get("seq"))
    seq = seq_now if seq_now in values else (options[0]["value"] if options else None)
    start = int_value(url.get("start"))
    return options, seq, layer_options, layer, start if start is not None and start >= 0 else no_update


@guarded([FIGURE, CHILDREN, CHILDREN, MESSAGE])
def update_tokens(state: Any, seq_id: Any, start: Any, typed_id: Any = None, layer: Any = None) -> tuple:
    """(expert lanes, window note, token text, message) for one sequence window.

    A sequence id typed in the box wins over the dropdown (which lists the first 500). The
    text is coloured by each token's top-1 expert in `layer` (the first MoE layer by default),
    in the lanes' colours.
    """
    registry, key = current(state)
    if typed_id not in (None, ""):
        seq_id = typed_id
    if seq_id is None:
        return plots.empty_figure("pick a sequence"), None, None, None
    seq_id, start = int(seq_id), max(0, int(start or 0))
    run = registry.run(key)
    length = registry.query(key, "sequence_length", seq_id)
    if length == 0:
        raise ValueError(f"sequence {seq_id} has no tokens in this run")
    lanes = registry.query(key, "lanes", seq_id, start)
    num_experts = max(run.num_experts(ly) for ly in run.moe_layers)
    shown = lanes["pos"].nunique() if len(lanes) else 0
    note = (
        f"positions {start}–{start + max(shown, 1) - 1} of {length} "
        f"(at most {registry.query(key, 'lane_window')} tokens at a time; change 'first position' to move)"
    )
    layer = int(layer) if layer is not None else run.moe_layers[0]
    if layer not in run.moe_layers:
        raise ValueError(f"layer {layer} is not a MoE layer of this run (MoE layers: {run.moe_layers})")
    at_layer = lanes[lanes["layer"] == layer] if len(lanes) else lanes
    text = [
        html.Span(
            str(tok),
            title=f"pos {int(pos)} · {plots.layer_name(layer)} top-1 expert {int(experts[0])}",
            className="tokens-text-token",
            style={
                "background": plots.translucent(plots.expert_color(int(experts[0])), 0.35),
                "borderBottom": f"3px solid {plots.expert_color(int(experts[0]))}",
                "margin": "0 1px",
            },
        )
        for pos, tok, experts in zip(at_layer["pos"], at_layer["token"], at_layer["experts"])
    ]
    return plots.expert_lanes(lanes, num_experts), note, text, None


def register(app: dash.Dash) -> None:
    dash.register_page(__name__, layout=layout, **PAGE)
    app.callback(
        Output("tokens-seq", "options"),
        Output("tokens-seq", "value"),
        Output("tokens-layer", "options"),
        Output("tokens-layer", "value"),
        Output("tokens-start", "value"),
        Input("app-version", "data"),
        State("tokens-seq", "value"),
        State("tokens-layer", "value"),
        State("app-url", "hash"),
    )(tokens_controls)
    app.callback(
        Output("tokens-lanes", "figure"),
        Output("tokens-window", "children"),
        Output("tokens-text", "children"),
        Output("tokens-message", "children"),
        Input("app-version", "data"),
        Input("tokens-seq", "value"),
        Input("tokens-start", "value"),
        Input("tokens-seq-id", "value"),
        Input("tokens-layer", "value"),
    )(update_tokens)
    register_fragment(
        app, {"seq": "tokens-seq", "start": "tokens-start", "layer": "tokens-layer"}, {"start": 0}
    )

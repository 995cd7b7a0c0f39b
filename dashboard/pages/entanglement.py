"""Entanglement page: mutual information of top-1 experts across consecutive MoE layers
against the shuffled baseline, the transition matrix of one pair, and a Sankey of the most
frequent top-1 pathways."""

from __future__ import annotations

import itertools
from typing import Any

import dash
from dash import Input, Output, State, dcc, html
from dash.exceptions import PreventUpdate

from routescope import plots
from routescope.dashboard.components import FIGURE, KEEP, MESSAGE, OPTIONS, current, graph, guarded, labelled
from routescope.dashboard.queries import PATHWAYS_MAX
from routescope.dashboard.urlstate import int_value, pick, read_fragment, register_fragment

PAGE = {"path": "/entanglement", "name": "Entanglement", "order": 3, "title": "routescope · entanglement"}


def layout(**_query: Any) -> html.Div:
    return html.Div(
        [
            html.H2("Cross-layer entanglement"),
            html.Div(id="entanglement-message"),
            graph("entanglement-mi", "entanglement_figure"),
            html.H3("Transitions between two layers"),
            labelled(
                "layer pair",
                dcc.Dropdown(id="entanglement-pair", options=[], clearable=False),
                "200px",
            ),
            html.Div(id="entanglement-pair-message"),
            graph("entanglement-transition", "transition_heatmap"),
            html.H3("Pathways"),
            labelled(
                "pathways shown (most frequent first)",
                dcc.Slider(
                    id="entanglement-top",
                    min=5,
                    max=PATHWAYS_MAX,
                    step=5,
                    value=10,
                    marks={v: str(v) for v in range(5, PATHWAYS_MAX + 1, 5)},
                ),
                "360px",
            ),
            # pathways need every token's path (no rollup can hold them): a run over
            # sampled.SAMPLE_ROWS routing rows is read through a sample, said under the title;
            # their own callback, with a spinner, started once the MI figure is answered
            # (`mi_then_ready`), so the two never share the server's cores and the figures
            # above never wait for them
            dcc.Loading(graph("entanglement-sankey", "pathway_sankey"), type="dot"),
            dcc.Store(id="entanglement-ready"),
            dcc.Store(id="entanglement-sankey-for"),
        ]
    )


def pair_value(layer: int, next_layer: int) -> str:
    return f"{layer}-{next_layer}"


@guarded([OPTIONS, KEEP, KEEP])
def entanglement_controls(state: Any, pair_now: Any = None, fragment: Any = None) -> tuple:
    """Consecutive MoE layer pairs of the run, and the pair and path count the URL asks for."""
    registry, key = current(state)
    layers = registry.query(key, "summary")["moe_layers"]
    pairs = list(itertools.pairwise(layers))
    options = [
        {"label": f"{plots.layer_name(a)} → {plots.layer_name(b)}", "value": pair_value(a, b)}
        for a, b in pairs
    ]
    values = [o["value"] for o in options]
    url = read_fragment(fragment)
    pair_now = pair_now if pair_now in values else url.get("pair")
    top = pick(int_value(url.get("paths")), list(range(5, PATHWAYS_MAX + 1, 5)), 10)
    return options, pair_now if pair_now in values else (values[0] if values else None), top


ONE_LAYER = "this model has one MoE layer: no pairs"


@guarded([FIGURE, MESSAGE])
def mi_figure(state: Any) -> tuple:
    """(MI figure, message): MI of every consecutive pair against its permutation baseline,
    from the pair rollups; it needs no layer pair, so it starts as soon as the run is known."""
    registry, key = current(state)
    if len(registry.run(key).moe_layers) < 2:
        return plots.empty_figure(ONE_LAYER), None
    return plots.entanglement_figure(registry.query(key, "entanglement")), None


@guarded([FIGURE, MESSAGE])
def transition_figure(state: Any, pair: Any) -> tuple:
    """(transition heatmap of the chosen pair, message)."""
    registry, key = current(state)
    run = registry.run(key)
    layers = run.moe_layers
    if len(layers) < 2:
        return plots.empty_figure(ONE_LAYER), None
    a, b = parse_pair(pair, layers)
    trans = registry.query(key, "transition", a, b)
    return plots.transition_heatmap(trans, a, b, run.num_experts(a), run.num_experts(b)), None


def entanglement_figures(state: Any, pair: Any) -> tuple:
    """(MI figure, transition heatmap, message): the page's first view, from the pair rollups."""
    mi, mi_msg = mi_figure(state)
    trans, trans_msg = transition_figure(state, pair)
    return mi, trans, mi_msg or trans_msg


@guarded([FIGURE])
def update_pathways(state: Any, top: Any) -> Any:
    """The Sankey of the most frequent top-1 pathways (reads every token's path)."""
    registry, key = current(state)
    layers = registry.run(key).moe_layers
    if len(layers) < 2:
        return plots.empty_figure(ONE_LAYER)
    found = registry.query(key, "pathways", int(top or 10))
    note = None if found["sample"] is None else f"counted over {found['sample'].describe()}"
    return plots.pathway_sankey(found["frame"], layers, note)


def ready_token(state: Any) -> str | None:
    """Which run and version the MI figure was answered for."""
    return f"{state.get('run')}@{state.get('version')}" if isinstance(state, dict) else None


def mi_then_ready(state: Any) -> tuple:
    """`mi_figure`, then the token that starts the pathways (also after an error)."""
    return (*mi_figure(state), ready_token(state))


def pathways_when_ready(ready: Any, top: Any, state: Any, drawn_for: Any) -> tuple:
    """The Sankey once the MI figure is answered, again only for another run, version or path
    count."""
    token = f"{ready}|{top}"
    if ready is None or token == drawn_for:
        raise PreventUpdate
    return update_pathways(state, top), token


def update_entanglement(state: Any, pair: Any, top: Any) -> tuple:
    """(MI figure, transition heatmap, Sankey, message): both callbacks' outputs at once."""
    mi, trans, msg = entanglement_figures(state, pair)
    return mi, trans, update_pathways(state, top), msg


def parse_pair(pair: Any, layers: list[int]) -> tuple[int, int]:
    """'a-b' from the dropdown, checked to be consecutive MoE layers of this run."""
    pairs = list(itertools.pairwise(layers))
    if pair is None:
        return pairs[0]
    try:
        a, b = (int(v) for v in str(pair).split("-"))
    except ValueError:
        raise ValueError(f"layer pair {pair!r} is not of the form 'a-b'") from None
    if (a, b) not in pairs:
        raise ValueError(f"layers {a} and {b} are not consecutive MoE layers of this run")
    return a, b


def register(app: dash.Dash) -> None:
    dash.register_page(__name__, layout=layout, **PAGE)
    app.callback(
        Output("entanglement-pair", "options"),
        Output("entanglement-pair", "value"),
        Output("entanglement-top", "value"),
        Input("app-version", "data"),
        State("entanglement-pair", "value"),
        State("app-url", "hash"),
    )(entanglement_controls)
    register_fragment(app, {"pair": "entanglement-pair", "paths": "entanglement-top"}, {"paths": 10})
    app.callback(  # the MI figure needs no pair: it starts with the controls, not after them
        Output("entanglement-mi", "figure"),
        Output("entanglement-message", "children"),
        Output("entanglement-ready", "data"),
        Input("app-version", "data"),
    )(mi_then_ready)
    app.callback(
        Output("entanglement-transition", "figure"),
        Output("entanglement-pair-message", "children"),
        Input("app-version", "data"),
        Input("entanglement-pair", "value"),
    )(transition_figure)
    app.callback(
        Output("entanglement-sankey", "figure"),
        Output("entanglement-sankey-for", "data"),
        Input("entanglement-ready", "data"),
        Input("entanglement-top", "value"),
        State("app-version", "data"),
        State("entanglement-sankey-for", "data"),
    )(pathways_when_ready)

"""Placement page: an expert-parallel plan for the run's loads, as per-GPU load bars with the
contiguous layout ("before") next to the chosen plan ("after"), max / mean GPU load of each,
per layer and for the step (Σ over layers of the busiest GPU ÷ Σ of the means, never loads
added across layers: `routescope.analysis.expert_parallel.model_imbalance`), and the plan's
slots. An optional split builds the plan on steps <= X and evaluates it on
steps > X, since a plan is only worth what it does on future traffic (docs/placement.md)."""

from __future__ import annotations

from typing import Any

import dash
import pandas as pd
from dash import Input, Output, State, dcc, html

from routescope import plots
from routescope.dashboard.components import (
    CAPTION,
    CARD,
    CHILDREN,
    FIGURE,
    KEEP,
    MESSAGE,
    OPTIONS,
    ROW,
    current,
    guarded,
    labelled,
    table,
)
from routescope.dashboard.urlstate import int_value, pick, read_fragment, register_fragment
from routescope.plots.placement import CAPTION as GPU_LOAD_CAPTION
from routescope.plots.placement import IMBALANCE_CAPTION, MODEL_LABEL

PAGE = {"path": "/placement", "name": "Placement", "order": 8, "title": "routescope · placement"}
METHODS = ("contiguous", "lpt", "eplb")
METHOD_NOTES = {
    "contiguous": "experts in id order, E/N per GPU (no loads used)",
    "lpt": "longest processing time first, then swaps off the busiest GPU",
    "eplb": "DeepSeek EPLB: hottest experts replicated, replicas packed by load",
}
DEFAULT_METHOD = "lpt"
EP_SIZES = (8, 4, 2)  # default EP size: the largest that leaves at least two experts per GPU
MAX_EP_SIZE = 1024
MAX_REDUNDANT_PER_EXPERT = 4  # redundant slots offered: at most 4 × E
NUMBER = {"type": "number", "step": 1, "debounce": True, "style": {"width": "90px"}}


def layout(**_query: Any) -> html.Div:
    return html.Div(
        [
            html.H2("Expert-parallel placement"),
            html.Div(
                [
                    labelled("EP size (GPUs)", dcc.Input(id="placement-ep", min=1, **NUMBER), "110px"),
                    labelled(
                        "redundant slots", dcc.Input(id="placement-redundant", min=0, **NUMBER), "120px"
                    ),
                    labelled(
                        "method",
                        dcc.Dropdown(
                            id="placement-method",
                            options=[{"label": m, "value": m} for m in METHODS],
                            clearable=False,
                        ),
                        "140px",
                    ),
                    labelled(
                        "layer", dcc.Dropdown(id="placement-layer", options=[], clearable=False), "140px"
                    ),
                    labelled(
                        "fit on steps ≤ X, evaluate on steps > X",
                        dcc.Input(id="placement-fit", placeholder="off", **NUMBER),
                        "260px",
                    ),
                ],
                style=ROW,
            ),
            html.Div(id="placement-hint", style={"fontSize": "12px", "color": "#555", "marginTop": "4px"}),
            html.Div(id="placement-message"),
            html.Div(id="placement-note", style={"fontSize": "13px", "color": "#555"}),
            html.Div(id="placement-stats", style={**ROW, "margin": "8px 0"}),
            html.Div(
                [
                    dcc.Graph(
                        id="placement-gpus",
                        config={"displaylogo": False},
                        figure=plots.empty_figure("loading…"),
                    ),
                    html.P(GPU_LOAD_CAPTION, id="placement-gpus-caption", style=CAPTION),
                ]
            ),
            html.H3("Every MoE layer"),
            html.Div(id="placement-layers"),
            html.H3("The plan"),
            html.Div(id="placement-plan", style={"maxHeight": "420px", "overflowY": "auto"}),
        ]
    )


def default_ep_size(num_experts: int) -> int:
    """The largest of 8, 4, 2 GPUs leaving at least two experts per GPU (as the HTML report), else 1."""
    return next((n for n in EP_SIZES if num_experts % n == 0 and num_experts // n >= 2), 1)


@guarded([KEEP, KEEP, KEEP, OPTIONS, KEEP, KEEP, KEEP, KEEP, CHILDREN])
def placement_controls(
    state: Any,
    fragment: Any = None,
    ep_now: Any = None,
    redundant_now: Any = None,
    method_now: Any = None,
    layer_now: Any = None,
    fit_now: Any = None,
) -> tuple:
    """(EP size, redundant, method, layer options, layer, fit min, fit max, fit, hint): the
    current value when there is one, else what the URL asks for, else the default."""
    registry, key = current(state)
    info = registry.query(key, "summary")
    choices = registry.query(key, "filter_choices")
    url = read_fragment(fragment)
    layers = info["moe_layers"]
    experts = info["num_experts"] or [1]
    ep = ep_now if ep_now is not None else int_value(url.get("ep"))
    ep = ep if ep is not None and 1 <= ep <= MAX_EP_SIZE else default_ep_size(experts[0])
    redundant = redundant_now if redundant_now is not None else int_value(url.get("redundant"))
    redundant = redundant if redundant is not None and redundant >= 0 else 0
    method = pick(method_now, list(METHODS), None) or pick(url.get("method"), list(METHODS), DEFAULT_METHOD)
    layer = layer_now if layer_now in layers else int_value(url.get("layer"))
    layer = layer if layer in layers else (layers[0] if layers else None)
    lo, hi = choices["step_min"] or 0, choices["step_max"] or 0
    fit = fit_now if fit_now is not None else int_value(url.get("fit"))
    hint = (
        f"E = {', '.join(map(str, experts))} experts per layer; slots per GPU = (E + redundant) / EP size. "
        + (
            f"Steps {lo}–{hi}: a split X in {lo}–{hi - 1} fits the plan on steps ≤ X and draws steps > X; "
            "empty: fit and draw all steps."
            if hi > lo
            else f"The run has one step ({lo}): no split possible."
        )
    )
    layer_options = [{"label": plots.layer_name(ly), "value": ly} for ly in layers]
    return ep, redundant, method, layer_options, layer, lo, max(lo, hi - 1), fit, hint


def check_inputs(ep: Any, redundant: Any, method: Any, fit: Any, num_experts: int, steps: tuple) -> tuple:
    """(ep_size, redundant, method, fit step or None) as ints, or ValueError saying what to enter."""
    if ep is None or ep == "":
        raise ValueError("Enter an EP size: the number of GPUs the experts are spread over (e.g. 4).")
    if int_value(ep) is None or int_value(ep) != ep:
        raise ValueError(f"EP size must be a whole number of GPUs, got {ep!r}.")
    if not 1 <= int(ep) <= MAX_EP_SIZE:
        raise ValueError(f"EP size must lie in 1–{MAX_EP_SIZE} GPUs, got {ep}.")
    redundant = 0 if redundant in (None, "") else redundant
    if int_value(redundant) is None or int_value(redundant) != redundant or redundant < 0:
        raise ValueError(f"redundant slots must be a whole number ≥ 0, got {redundant!r}.")
    if redundant > MAX_REDUNDANT_PER_EXPERT * num_experts:
        raise ValueError(
            f"at most {MAX_REDUNDANT_PER_EXPERT} × E = {MAX_REDUNDANT_PER_EXPERT * num_experts} redundant "
            f"slots on this page, got {redundant}."
        )
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not known; use one of {', '.join(METHODS)}.")
    lo, hi = steps
    if fit in (None, ""):
        return int(ep), int(redundant), str(method), None
    if int_value(fit) is None or int_value(fit) != fit:
        raise ValueError(f"the split step must be a whole number, got {fit!r}.")
    if not lo <= fit < hi:
        raise ValueError(
            f"split at step {fit}: both windows need tokens, so X must lie in {lo}–{hi - 1} "
            f"(this run has steps {lo}–{hi}); leave it empty to use all steps."
        )
    return int(ep), int(redundant), str(method), int(fit)


@guarded([FIGURE, CHILDREN, CHILDREN, CHILDREN, MESSAGE, CHILDREN])
def update_placement(state: Any, ep: Any, redundant: Any, method: Any, layer: Any, fit: Any = None) -> tuple:
    """(per-GPU load figure, before / after cards, per-layer table, plan table, message, note)."""
    registry, key = current(state)
    info = registry.query(key, "summary")
    choices = registry.query(key, "filter_choices")
    if len(info["num_experts"]) != 1:
        raise ValueError(
            f"a placement needs the same number of experts in every MoE layer; this run has {info['num_experts']}."
        )
    steps = (choices["step_min"] or 0, choices["step_max"] or 0)
    ep, redundant, method, fit = check_inputs(ep, redundant, method, fit, info["num_experts"][0], steps)
    layers = info["moe_layers"]
    layer = int(layer) if layer is not None else layers[0]
    if layer not in layers:
        raise ValueError(f"layer {layer} is not a MoE layer of this run (MoE layers: {layers})")
    data = registry.query(key, "placement", ep, redundant, method, fit)
    labels = {"contiguous": "contiguous (before)", method: f"{method} (after)"}
    if method == "contiguous":
        labels = {"contiguous": "contiguous"}
    fig = plots.gpu_load_figure({labels[m]: data["gpu_loads"][m] for m in labels}, layer)
    window = "steps > " + str(fit) if fit is not None else "all steps"
    fitted = f"steps ≤ {fit}" if fit is not None else "all steps"
    note = (
        f"{ep} GPUs × {(info['num_experts'][0] + redundant) // ep} slots ({redundant} redundant); plans built on "
        f"{fitted} ({int(data['fit_slots'].get(layer, 0)):,} routing slots in {plots.layer_name(layer)}), "
        f"loads drawn for {window} ({int(data['test_slots'].get(layer, 0)):,} routing slots)."
    )
    return (
        fig,
        stat_cards(data, layer, labels, fit is not None),
        layer_table(data, method, fit is not None),
        plan_table(data, layer),
        None,
        note,
    )


def stat_cards(data: dict[str, Any], layer: int, labels: dict[str, str], split: bool) -> list[html.Div]:
    """One card per plan: max / mean GPU load on the drawn window (and in sample with a split)."""
    cards = []
    for m, title in labels.items():
        row = data["evaluation"][m].set_index("layer").loc[layer]
        lines = [
            html.Div(title, style={"fontWeight": "bold"}),
            html.Div(f"max/mean {row['imbalance']:.3f}", className="placement-imbalance"),
            html.Div(f"max {row['max_gpu_load']:,.1f} · mean {row['mean_gpu_load']:,.1f} tokens per GPU"),
            html.Div(f"ep_balancedness {row['ep_balancedness']:.3f}"),
            html.Div(
                f"{MODEL_LABEL}: Σ max / Σ mean {data['model'][m]['imbalance']:.3f}",
                className="placement-step-imbalance",
            ),
        ]
        if split:
            fit_row = data["in_sample"][m].set_index("layer").loc[layer]
            lines.append(html.Div(f"in sample (fit window): max/mean {fit_row['imbalance']:.3f}"))
        lines.append(html.Div(METHOD_NOTES[m], style={"color": "#555"}))
        cards.append(
            html.Div(
                lines, className="placement-card", style={**CARD, "fontSize": "12px", "minWidth": "220px"}
            )
        )
    return cards


def layer_table(data: dict[str, Any], method: str, split: bool) -> html.Div:
    """max / mean GPU load per MoE layer and for the step (last row), contiguous against the
    plan (out of sample with a split), as bars and as a table."""
    from routescope.analysis.expert_parallel import model_imbalance

    names = list(dict.fromkeys(("contiguous", method)))
    per_layer = pd.concat([data["evaluation"][m].assign(plan=m) for m in names], ignore_index=True)
    model = pd.DataFrame([{"plan": m, **data["model"][m]} for m in names])
    figure = plots.imbalance_figure(per_layer, model)
    before = data["evaluation"]["contiguous"].set_index("layer")["imbalance"]
    after = data["evaluation"][method].set_index("layer")["imbalance"]
    df = pd.DataFrame({"layer": before.index, "before": before.to_numpy(), "after": after.to_numpy()})
    step = {"layer": MODEL_LABEL, "before": data["model"]["contiguous"]["imbalance"]}
    step["after"] = data["model"][method]["imbalance"]
    columns = [("layer", "layer"), ("before", "contiguous max/mean")]
    if method != "contiguous":
        columns.append(("after", f"{method} max/mean"))
    if split:
        df["in_sample"] = data["in_sample"][method].set_index("layer")["imbalance"].to_numpy()
        step["in_sample"] = model_imbalance(data["in_sample"][method])["imbalance"]
        columns.append(("in_sample", f"{method} max/mean in sample"))
    df = pd.concat([df.astype({"layer": object}), pd.DataFrame([step])], ignore_index=True)
    return html.Div(
        [
            dcc.Graph(figure=figure, config={"displaylogo": False}, id="placement-step-figure"),
            html.P(IMBALANCE_CAPTION, style=CAPTION),
            table(df, columns, max_rows=len(df)),
        ]
    )


def plan_table(data: dict[str, Any], layer: int) -> html.Div:
    """The plan's slots in one layer: gpu, slot, expert, its replicas, and the slot's tokens
    on the drawn window (the expert's tokens split evenly over its replicas)."""
    plan = data["plan"]
    rows = plan[plan["layer"] == layer][["gpu", "slot", "expert"]].reset_index(drop=True)
    rows["replicas"] = rows["expert"].map(rows["expert"].value_counts())
    loads = data["test_loads"]
    tokens = loads[loads["layer"] == layer].set_index("expert")["tokens"]
    rows["tokens"] = rows["expert"].map(tokens).fillna(0).to_numpy(dtype=float) / rows["replicas"]
    columns = [("gpu", "gpu"), ("slot", "slot"), ("expert", "expert"), ("replicas", "replicas")]
    return table(rows, [*columns, ("tokens", "tokens on this slot")], len(rows))


def register(app: dash.Dash) -> None:
    dash.register_page(__name__, layout=layout, **PAGE)
    app.callback(
        Output("placement-ep", "value"),
        Output("placement-redundant", "value"),
        Output("placement-method", "value"),
        Output("placement-layer", "options"),
        Output("placement-layer", "value"),
        Output("placement-fit", "min"),
        Output("placement-fit", "max"),
        Output("placement-fit", "value"),
        Output("placement-hint", "children"),
        Input("app-version", "data"),
        State("app-url", "hash"),
        State("placement-ep", "value"),
        State("placement-redundant", "value"),
        State("placement-method", "value"),
        State("placement-layer", "value"),
        State("placement-fit", "value"),
    )(placement_controls)
    register_fragment(
        app,
        {
            "ep": "placement-ep",
            "redundant": "placement-redundant",
            "method": "placement-method",
            "layer": "placement-layer",
            "fit": "placement-fit",
        },
        {"redundant": 0, "method": DEFAULT_METHOD},
    )
    app.callback(
        Output("placement-gpus", "figure"),
        Output("placement-stats", "children"),
        Output("placement-layers", "children"),
        Output("placement-plan", "children"),
        Output("placement-message", "children"),
        Output("placement-note", "children"),
        Input("app-version", "data"),
        Input("placement-ep", "value"),
        Input("placement-redundant", "value"),
        Input("placement-method", "value"),
        Input("placement-layer", "value"),
        Input("placement-fit", "value"),
    )(update_placement)

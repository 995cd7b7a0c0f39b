"""Overview page: what the run is (from the manifest), per-layer balance cards, the balance
chart across layers, and alerts for dead and hot experts."""

from __future__ import annotations

import math
from typing import Any

import dash
import pandas as pd
from dash import Input, Output, State, dcc, html, no_update

from routescope import plots
from routescope.dashboard.components import (
    CARD,
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
    message,
)
from routescope.dashboard.queries import ALL
from routescope.dashboard.urlstate import pick, read_fragment, write_fragment

PAGE = {"path": "/", "name": "Overview", "order": 0, "title": "routescope · overview"}
MAX_ALERTS = 40


def layout(**_query: Any) -> html.Div:
    return html.Div(
        [
            html.H2("Overview"),
            html.Div(id="overview-message"),
            html.Div(id="overview-summary"),
            html.H3("Per layer"),
            labelled(
                "expert-parallel size (adds ep_balancedness)",
                dcc.Dropdown(
                    id="overview-ep", options=[{"label": "off", "value": "off"}], value="off", clearable=False
                ),
                "320px",
            ),
            html.Div(id="overview-kpis", style={**ROW, "marginTop": "8px"}),
            graph("overview-balance", "balance_figure"),
            html.H3("Alerts"),
            html.Div(id="overview-alerts"),
        ]
    )


@guarded([OPTIONS, KEEP])
def overview_controls(state: Any, fragment: Any = None) -> tuple:
    """EP sizes that split every MoE layer's experts evenly (contiguous placement), and the
    one the URL fragment asks for."""
    registry, key = current(state, require_tokens=False)
    experts = registry.query(key, "summary")["num_experts"] or [1]
    common = math.gcd(*experts)
    sizes = [n for n in range(2, common + 1) if common % n == 0]
    options = [{"label": "off", "value": "off"}] + [{"label": f"{n} GPUs", "value": str(n)} for n in sizes]
    return options, pick(read_fragment(fragment).get("ep"), [o["value"] for o in options], "off")


def overview_fragment(fragment: Any, ep: Any) -> Any:
    new = write_fragment(fragment, {"ep": None if ep in (None, "off") else ep})
    return no_update if new == (fragment or "") else new


@guarded([CHILDREN, CHILDREN, FIGURE, CHILDREN, MESSAGE])
def update_overview(state: Any, ep: Any = None) -> tuple:
    """(summary, KPI cards, balance figure, alerts, message) for the selected run; with an EP
    size, the cards add ep_balancedness (SPEC 4.1, experts placed contiguously)."""
    registry, key = current(state, require_tokens=False)
    info = registry.query(key, "summary")
    summary = summary_block(info)
    if info["tokens"] == 0:
        note = "This run holds no tokens yet" + ("." if info["complete"] else "; it is still being written.")
        return summary, None, plots.empty_figure("no tokens"), None, message(note, "warning")
    ep_size = int(ep) if ep not in (None, "", "off") else None
    bal = registry.query(key, "balance", ALL, ep_size)
    dead = registry.query(key, "dead_experts")
    hot = registry.query(key, "hot_experts")
    near = near_dead(registry.query(key, "expert_load"))
    cards = kpi_cards(bal, dead, hot, near)
    found = alerts(dead, hot, near, info.get("training_alerts"))
    return summary, cards, plots.balance_figure(bal), found, None


def near_dead(load: pd.DataFrame) -> pd.DataFrame:
    """Experts that got some tokens but a share of at most NEAR_DEAD_LIFT / E, with their lift."""
    if load.empty:
        return load.assign(lift=[])
    lift = load["share"] * load.groupby("layer")["expert"].transform("count")
    out = load.assign(lift=lift)
    return out[(out["tokens"] > 0) & (out["lift"] <= plots.NEAR_DEAD_LIFT)]


def summary_block(info: dict[str, Any]) -> html.Div:
    state = "complete" if info["complete"] else "still recording (or stopped before finishing)"
    facts = [
        ("model", info["model_name"] or "(unknown)"),
        ("model type", info["model_type"]),
        ("decoder layers", str(info["num_hidden_layers"])),
        ("MoE layers", f"{len(info['moe_layers'])}: {', '.join(map(str, info['moe_layers']))}"),
        ("routed experts per layer", ", ".join(map(str, info["num_experts"]))),
        ("top-k", ", ".join(map(str, info["top_k"]))),
        ("shared experts", str(info["num_shared_experts"] or 0)),
        ("tokens", f"{info['tokens']:,} in {info['sequences']:,} sequences"),
        ("labels", ", ".join(info["labels"]) or "(none)"),
        ("state", state),
        ("verified", verified_text(info)),
        ("tables", ", ".join(info["tables"]) or "(none)"),
    ]
    rows = [
        html.Tr(
            [html.Th(k, style={"textAlign": "left", "paddingRight": "16px", "color": "#555"}), html.Td(v)]
        )
        for k, v in facts
    ]
    return html.Table(html.Tbody(rows), id="overview-facts", style={"fontSize": "14px"})


def verified_text(info: dict[str, Any]) -> str:
    """Whether the model type and transformers version are in routescope's verified table."""
    if info.get("verified") is None:
        return "not stated (imported or older run)"
    if info["verified"]:
        return f"yes (transformers {info.get('transformers') or '?'})"
    return f"NO: {info.get('unverified_reason') or 'not in the verified table'}"


def per_layer(df: pd.DataFrame) -> pd.Series:
    return df.groupby("layer").size() if len(df) else pd.Series(dtype=int)


def kpi_cards(bal: pd.DataFrame, dead: pd.DataFrame, hot: pd.DataFrame, near: pd.DataFrame) -> list[html.Div]:
    """One card per MoE layer. Units: tokens are tokens; routing slots are tokens × k."""
    cards = []
    dead_n, hot_n, near_n = per_layer(dead), per_layer(hot), per_layer(near)
    for _, row in bal.iterrows():
        layer = int(row["layer"])
        tokens = int(row["tokens"])
        k = int(row["top_k"]) if "top_k" in row and pd.notna(row["top_k"]) else None
        slots = (
            int(row["routing_slots"]) if "routing_slots" in row and pd.notna(row["routing_slots"]) else None
        )
        n_dead, n_near = int(dead_n.get(layer, 0)), int(near_n.get(layer, 0))
        lines = [
            html.Div(plots.layer_name(layer), style={"fontWeight": "bold"}),
            html.Div(f"{tokens:,} tokens · E={int(row['num_experts'])}" + (f" · k={k}" if k else "")),
            html.Div(f"{slots:,} routing slots" if slots is not None else ""),
            html.Div(f"cv {row['cv']:.3f} · max_vio {row['max_violation']:.2f}"),
            html.Div(f"balancedness {row['balancedness']:.3f}"),
            html.Div(f"norm_entropy {row['norm_entropy']:.3f}"),
            html.Div(
                f"dead {n_dead} · near-dead {n_near} · hot {int(hot_n.get(layer, 0))}",
                className="overview-kpi-dead" if n_dead or n_near else None,
                style={"color": "#b00020", "fontWeight": "bold"} if n_dead or n_near else None,
            ),
        ]
        if "ep_balancedness" in row and pd.notna(row["ep_balancedness"]):
            lines.append(
                html.Div(
                    f"ep_balancedness {row['ep_balancedness']:.3f} (EP={int(row['ep_size'])})",
                    className="overview-kpi-ep",
                )
            )
        if "aux_loss" in row and pd.notna(row["aux_loss"]):
            lines.append(html.Div(f"aux_loss {row['aux_loss']:.4f}"))
        cards.append(
            html.Div(lines, className="overview-kpi", style={**CARD, "fontSize": "12px", "minWidth": "150px"})
        )
    return cards


def training_alert_text(alert: dict[str, Any]) -> str:
    """One line for an alert rs.watch raised during training (manifest `training.alerts`)."""
    where = f"training: layer {alert['layer']} at train step {alert['train_step']}: "
    if alert["kind"] == "max_violation":
        return where + f"max_violation {alert['value']:.3f} passed {alert['reference']:.3f}"
    return where + f"dead fraction rose from {alert['reference']:.3f} to {alert['value']:.3f}"


def alerts(
    dead: pd.DataFrame,
    hot: pd.DataFrame,
    near: pd.DataFrame | None = None,
    training: list[dict[str, Any]] | None = None,
) -> html.Div:
    near = near if near is not None else pd.DataFrame(columns=["layer", "expert", "tokens", "share", "lift"])
    items: list[Any] = [
        html.Li(training_alert_text(a), className="overview-training-alert", style={"color": "#b00020"})
        for a in (training or [])[:MAX_ALERTS]
    ]
    for _, row in dead.head(MAX_ALERTS).iterrows():
        layer, e = int(row["layer"]), int(row["expert"])
        evidence = ""
        if "p_uniform_miss" in row and pd.notna(row["p_uniform_miss"]):
            evidence = f" (a uniform router would miss it with probability {row['p_uniform_miss']:.2g})"
        items.append(html.Li(f"dead: layer {layer} expert {e}: no token routed to it{evidence}"))
    for _, row in near.head(MAX_ALERTS).iterrows():
        items.append(
            html.Li(
                f"near-dead: layer {int(row['layer'])} expert {int(row['expert'])}: {int(row['tokens']):,} "
                f"tokens routed to it, share {row['share']:.4f} ({row['lift']:.2f}× uniform)"
            )
        )
    for _, row in hot.head(MAX_ALERTS).iterrows():
        items.append(
            html.Li(
                f"hot: layer {int(row['layer'])} expert {int(row['expert'])}: share {row['share']:.3f}, "
                f"{row['ratio']:.1f}× uniform"
            )
        )
    more = len(training or []) + len(dead) + len(near) + len(hot) - len(items)
    if more > 0:
        items.append(html.Li(f"… and {more} more"))
    if not items:
        return message(
            "No dead, near-dead or hot experts (near-dead: share ≤ 0.1/E; hot: share ≥ 2/E).", "info"
        )
    return html.Ul(items, id="overview-alert-list")


def register(app: dash.Dash) -> None:
    dash.register_page(__name__, layout=layout, **PAGE)
    app.callback(
        Output("overview-summary", "children"),
        Output("overview-kpis", "children"),
        Output("overview-balance", "figure"),
        Output("overview-alerts", "children"),
        Output("overview-message", "children"),
        Input("app-version", "data"),
        Input("overview-ep", "value"),
    )(update_overview)
    app.callback(
        Output("overview-ep", "options"),
        Output("overview-ep", "value"),
        Input("app-version", "data"),
        State("app-url", "hash"),
    )(overview_controls)
    app.callback(
        Output("app-url", "hash", allow_duplicate=True),
        State("app-url", "hash"),
        Input("overview-ep", "value"),
        prevent_initial_call=True,
    )(overview_fragment)

"""Overview page: the doctor's verdict first (SPEC 4.8), then what the run is (from the
manifest), the layers x metric view (one row per MoE layer, coloured by the doctor's bands,
rows ordered by any metric), the balance chart across layers, and the alerts: grouped,
the ten that matter most, then "N more" opening the full table (issue 33 item 4)."""

from __future__ import annotations

import math
from typing import Any

import dash
import pandas as pd
from dash import Input, Output, State, dash_table, dcc, html, no_update

import routescope as rs
from routescope import plots
from routescope.dashboard.components import (
    CHILDREN,
    FIGURE,
    KEEP,
    MESSAGE,
    MESSAGE_STYLES,
    OPTIONS,
    ROW,
    current,
    format_cell,
    graph,
    guarded,
    labelled,
    message,
)
from routescope.dashboard.queries import ALL
from routescope.dashboard.urlstate import pick, read_fragment, write_fragment

PAGE = {"path": "/", "name": "Overview", "order": 0, "title": "routescope · overview"}
TOP_ALERTS = 10  # alerts listed before "N more" (DoctorThresholds.top_findings)
MAX_TABLE = 2000  # rows of the full findings table sent to the browser
ORDER_OPTIONS = [
    ("layer", "layer"),
    ("findings", "doctor's worst finding"),
    ("cv", "cv"),
    ("gini", "Gini"),
    ("max_violation", "max_violation"),
    ("dead", "dead experts"),
    ("hot", "hot experts"),
    ("norm_entropy", "norm_entropy"),
]
VERDICT_KIND = {"ok": "info", "info": "info", "warning": "warning", "critical": "error"}


def layout(**_query: Any) -> html.Div:
    return html.Div(
        [
            html.H2("Overview"),
            html.Div(id="overview-verdict"),
            html.Div(id="overview-message"),
            html.Div(id="overview-summary"),
            html.H3("Alerts"),
            html.Div(id="overview-alerts"),
            html.H3("Per layer"),
            html.Div(
                [
                    labelled(
                        "expert-parallel size (adds ep_balancedness)",
                        dcc.Dropdown(
                            id="overview-ep",
                            options=[{"label": "off", "value": "off"}],
                            value="off",
                            clearable=False,
                        ),
                        "320px",
                    ),
                    labelled(
                        "order layers by (worst first)",
                        dcc.Dropdown(
                            id="overview-order",
                            options=[{"label": t, "value": v} for v, t in ORDER_OPTIONS],
                            value="layer",
                            clearable=False,
                        ),
                        "260px",
                    ),
                ],
                style=ROW,
            ),
            html.Div(id="overview-kpis", style={"marginTop": "8px"}),
            graph("overview-balance", "balance_figure"),
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


@guarded([CHILDREN, CHILDREN, FIGURE, CHILDREN, MESSAGE, CHILDREN])
def update_overview(state: Any, ep: Any = None, order: Any = "layer") -> tuple:
    """(summary, layers x metric view, balance figure, alerts, message, verdict) for the
    selected run; with an EP size the view adds ep_balancedness (SPEC 4.1, experts placed
    contiguously); `order` sorts its rows by a metric, worst first."""
    registry, key = current(state, require_tokens=False)
    info = registry.query(key, "summary")
    summary = summary_block(info)
    if info["tokens"] == 0:
        note = "This run holds no tokens yet" + ("." if info["complete"] else "; it is still being written.")
        return summary, None, plots.empty_figure("no tokens"), None, message(note, "warning"), None
    ep_size = int(ep) if ep not in (None, "", "off") else None
    bal = registry.query(key, "balance", ALL, ep_size)
    load = registry.query(key, "expert_load")
    findings = registry.query(key, "doctor", ALL)
    health = layer_health(bal, load, findings)
    view = dcc.Graph(
        id="overview-layer-health",
        figure=plots.layer_health_figure(health, health_bands(), order or "layer"),
        config={"displaylogo": False},
    )
    layers_view = html.Div(
        [view, html.P(plots.caption("layer_health_figure"), style={"color": "#555", "fontSize": "13px"})]
    )
    found = alerts(findings, info.get("training_alerts"))
    return summary, layers_view, plots.balance_figure(bal), found, None, verdict_block(findings)


def health_bands() -> dict[str, float]:
    """The doctor's bands the layer view colours by (DoctorThresholds' defaults)."""
    th = rs_thresholds()
    return {
        "cv": th.cv_band,
        "gini": th.gini_band,
        "hot_factor": th.hot_factor,
        "dead_fraction": th.dead_fraction_band,
    }


def rs_thresholds() -> Any:
    return rs.DoctorThresholds()


def layer_health(bal: pd.DataFrame, load: pd.DataFrame, findings: pd.DataFrame) -> pd.DataFrame:
    """One row per MoE layer: its balance, Gini, dead / near-dead / hot counts, and the number
    and worst severity of the doctor's warnings about it."""
    rank = {name: i for i, name in enumerate(rs.SEVERITIES)}
    th = rs_thresholds()
    out = bal.copy()
    if load.empty:
        return out
    loads = load.assign(lift=load["share"] * load.groupby("layer")["expert"].transform("count"))
    per_layer = loads.groupby("layer").agg(
        dead=("tokens", lambda t: int((t == 0).sum())),
        near_dead=("lift", lambda v: int(((v > 0) & (v <= plots.NEAR_DEAD_LIFT)).sum())),
        hot=("lift", lambda v: int((v >= th.hot_factor).sum())),
        gini=("tokens", lambda t: rs.gini(t.to_numpy())),
    )
    out = out.merge(per_layer.reset_index().astype({"layer": out["layer"].dtype}), on="layer", how="left")
    about = findings[findings["layer"].notna() & findings["severity"].isin(["warning", "critical"])]
    counts = about.groupby("layer").size()
    worst = (
        findings[findings["layer"].notna()].groupby("layer")["severity"].agg(lambda s: max(s, key=rank.get))
    )
    layers = out["layer"].astype(int)
    out["worst"] = [worst.get(layer, "ok") for layer in layers]
    out["findings"] = [
        f"{int(counts.get(layer, 0))} {out_worst}" if counts.get(layer, 0) else out_worst
        for layer, out_worst in zip(layers, out["worst"])
    ]
    return out


def verdict_block(findings: pd.DataFrame) -> html.Div:
    """The doctor's verdict as the page's first line (its own class: a critical verdict is a
    finding about the run, not an error of the page)."""
    v = rs.doctor_verdict(findings)
    style = {
        **MESSAGE_STYLES[VERDICT_KIND[v["severity"]]],
        "padding": "8px 12px",
        "borderRadius": "6px",
        "margin": "8px 0",
        "fontWeight": "bold",
    }
    return html.Div(
        f"Doctor: {v['headline']}",
        id="overview-verdict-text",
        className=f"rs-verdict rs-verdict-{v['severity']}",
        style=style,
    )


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


def finding_text(row: Any) -> str:
    """One alert line: finding, where, evidence."""
    where = []
    for col, word in (("layer", "layer"), ("expert", "expert"), ("step", "step")):
        value = getattr(row, col)
        if value is not None and not pd.isna(value):
            where.append(f"{word} {int(value)}")
    return f"{row.finding}: {' '.join(where) or 'run'}: {row.evidence}"


def training_alert_text(alert: dict[str, Any]) -> str:
    """One line for an alert rs.watch raised during training (manifest `training.alerts`)."""
    where = f"training: layer {alert['layer']} at train step {alert['train_step']}: {alert['kind']}: "
    if alert.get("text"):
        return where + alert["text"]
    if alert["kind"] == "max_violation":
        return where + f"max_violation {alert['value']:.3f} passed {alert['reference']:.3f}"
    return where + f"dead fraction rose from {alert['reference']:.3f} to {alert['value']:.3f}"


SEVERITY_COLOR = {"critical": "#b00020", "warning": "#8a5a00", "info": "#1a4a73"}


def alerts(findings: pd.DataFrame, training: list[dict[str, Any]] | None = None) -> html.Div:
    """The doctor's findings grouped, the TOP_ALERTS that matter most (most severe, then the
    largest), then "N more" opening the full table; rs.watch's training alerts below."""
    shown = findings[findings["severity"] != "ok"]
    parts: list[Any] = []
    groups = rs.group_findings(findings)
    if not groups.empty:
        parts.append(
            html.Ul(
                [
                    html.Li(
                        f"{g.finding} ({g.severity}): {g.count}"
                        + (f" in {g.layers} layer(s)" if g.layers else ""),
                        style={"color": SEVERITY_COLOR.get(g.severity)},
                    )
                    for g in groups.itertuples(index=False)
                ],
                id="overview-alert-groups",
            )
        )
        parts.append(
            html.Ol(
                [
                    html.Li(
                        [
                            html.B(f"{row.severity} "),
                            finding_text(row),
                            html.Br(),
                            html.Small(f"→ {row.suggestion}"),
                        ],
                        style={"color": SEVERITY_COLOR.get(row.severity), "marginBottom": "4px"},
                    )
                    for row in shown.head(TOP_ALERTS).itertuples(index=False)
                ],
                id="overview-alert-list",
            )
        )
        more = len(shown) - TOP_ALERTS
        if more > 0:
            parts.append(
                html.Details(
                    [html.Summary(f"… and {more} more: the full table"), findings_table(shown)],
                    id="overview-alert-more",
                )
            )
    if training:
        lines = [
            html.Li(training_alert_text(a), className="overview-training-alert")
            for a in training[:TOP_ALERTS]
        ]
        if len(training) > TOP_ALERTS:
            lines.append(html.Li(f"… and {len(training) - TOP_ALERTS} more training alerts"))
        parts += [html.H4("During training (rs.watch)"), html.Ul(lines, style={"color": "#b00020"})]
    if not parts:
        return message("No findings: every check of the doctor passed.", "info")
    return html.Div(parts)


FINDING_COLUMNS = ("severity", "finding", "layer", "expert", "step", "evidence", "sql")


def findings_table(shown: pd.DataFrame) -> dash_table.DataTable:
    """Every finding (up to MAX_TABLE) in one paged, sortable table: one component, not a
    component per cell (hundreds of findings as HTML cells kept Chromium busy for a minute)."""
    rows = shown.head(MAX_TABLE).astype(object).where(shown.head(MAX_TABLE).notna(), "–")
    return dash_table.DataTable(
        id="overview-alert-table",
        columns=[{"name": c, "id": c} for c in FINDING_COLUMNS],
        data=[{c: format_cell(rec[c]) for c in FINDING_COLUMNS} for rec in rows.to_dict("records")],
        page_size=25,
        sort_action="native",
        filter_action="native",
        style_table={"overflowX": "auto"},
        style_cell={"textAlign": "left", "fontSize": "13px", "whiteSpace": "normal", "maxWidth": "520px"},
    )


def register(app: dash.Dash) -> None:
    dash.register_page(__name__, layout=layout, **PAGE)
    app.callback(
        Output("overview-summary", "children"),
        Output("overview-kpis", "children"),
        Output("overview-balance", "figure"),
        Output("overview-alerts", "children"),
        Output("overview-message", "children"),
        Output("overview-verdict", "children"),
        Input("app-version", "data"),
        Input("overview-ep", "value"),
        Input("overview-order", "value"),
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

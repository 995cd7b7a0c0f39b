"""`routescope report RUN --html FILE`: the report as one self-contained HTML file (no server).

Takes the report `routescope report` collected (balance, dead / hot experts, entanglement,
Super Experts) and the open run, draws the main plotly figures (balance, load lift heatmap,
entanglement, Super Experts, per-GPU load of a placement) and writes one file with plotly.js
inlined, so it opens offline and can be attached to a PR or a review. Reads the run only.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

import pandas as pd

from routescope.commands.report_sections import report_sections

TABLE_ROWS = 50  # rows of a table shown in the file before "… N more"
EP_SIZES = (8, 4, 2)  # the placement section uses the first that splits the experts into several per GPU


def figure_sections(run: Any, report: dict[str, Any]) -> list[tuple]:
    """(heading, figure, caption) for each figure the run supports; the placement section adds
    its numbers as an HTML table."""
    from routescope import plots

    where = report["run"].get("where")
    sections = [
        (
            "Load balance per MoE layer",
            plots.balance_figure(report["balance"]),
            plots.caption("balance_figure"),
        ),
        (
            "Expert load (share × E)",
            plots.load_heatmap(run.expert_load(where=where), "lift"),
            plots.caption("load_heatmap_lift"),
        ),
    ]
    if len(run.moe_layers) > 1 and report["entanglement"] is not None and not report["entanglement"].empty:
        sections.append(
            (
                "Cross-layer entanglement",
                plots.entanglement_figure(report["entanglement"]),
                plots.caption("entanglement_figure"),
            )
        )
    placement = placement_section(run, where)
    if placement is not None:
        sections.append(placement)
    if run.has_table("expert_activations"):
        sections.append(
            (
                "Super Experts",
                plots.super_expert_scatter(run.expert_activations()),
                plots.caption("super_expert_scatter"),
            )
        )
    return sections


def placement_section(run: Any, where: str | None) -> tuple[str, Any, str, str] | None:
    """max / mean GPU load per layer and for the step (Σ max / Σ mean over layers), contiguous
    vs lpt, at the largest of EP_SIZES that leaves >= 2 experts per GPU; the figure, its
    caption, and the numbers as a table."""
    from routescope.analysis.expert_parallel import compare_plans
    from routescope.analysis.placement import build_plan
    from routescope.plots.placement import IMBALANCE_CAPTION, imbalance_figure

    sizes = {run.num_experts(layer) for layer in run.moe_layers}
    if len(sizes) != 1:
        return None
    num_experts = sizes.pop()
    ep_size = next((n for n in EP_SIZES if num_experts % n == 0 and num_experts // n >= 2), None)
    if ep_size is None:
        return None
    loads = run.expert_load(where=where)
    if not loads["tokens"].sum():
        return None
    per_layer, model = compare_plans(
        loads, {m: build_plan(loads, ep_size, 0, m) for m in ("contiguous", "lpt")}
    )
    ranked = " < ".join(f"{r.plan} {r.imbalance:.3f}" for r in model.sort_values("imbalance").itertuples())
    caption = (
        f"{IMBALANCE_CAPTION} Step time relative to perfect balance at ep_size={ep_size}: {ranked}. "
        "`routescope placement RUN --ep-size N` for other sizes and methods."
    )
    figure = imbalance_figure(per_layer, model, f"Busiest GPU ÷ mean GPU load, {ep_size} GPUs")
    numbers = placement_table(per_layer, model)
    columns = list(numbers.columns)
    return (f"Expert-parallel placement, {ep_size} GPUs", figure, caption, table_html(numbers, columns, ""))


def placement_table(per_layer: pd.DataFrame, model: pd.DataFrame) -> pd.DataFrame:
    """One row per layer and a last `step` row (Σ max / Σ mean); per plan, max / mean GPU load
    and ep_balancedness (mean / max)."""
    wide = per_layer.pivot(index="layer", columns="plan", values=["imbalance", "ep_balancedness"])
    rows = pd.DataFrame({"layer": [str(int(ly)) for ly in wide.index]})
    step = {"layer": "step (Σ max / Σ mean)"}
    for plan in model["plan"]:
        total = model.set_index("plan").loc[plan]
        for column, label in (("imbalance", "max/mean"), ("ep_balancedness", "ep_balancedness")):
            rows[f"{plan} {label}"] = wide[(column, plan)].to_numpy()
            step[f"{plan} {label}"] = total[column]
    return pd.concat([rows, pd.DataFrame([step])], ignore_index=True)


def table_html(df: pd.DataFrame | None, columns: list[str], empty: str) -> str:
    if df is None or df.empty:
        return f"<p class='empty'>{html.escape(empty)}</p>"
    cols = [c for c in columns if c in df.columns]
    more = len(df) - TABLE_ROWS
    body = (
        df[cols]
        .head(TABLE_ROWS)
        .to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0, escape=True)
    )
    return body + (f"<p class='more'>… {more} more rows (routescope report --json)</p>" if more > 0 else "")


def facts_html(facts: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(', '.join(map(str, v)) if isinstance(v, list) else str(v))}</td></tr>"
        for k, v in facts.items()
        if v is not None
    )
    return f"<table class='facts'>{rows}</table>"


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em}td,th{padding:2px 10px;text-align:right}
table.facts th{text-align:left;color:#555}.caption{color:#555;font-size:.85em}
.banner{background:#fdd;border:1px solid #c00;padding:.6em;font-weight:bold}.verdict{font-weight:bold}.empty,.more{color:#777}
"""


def doctor_html(findings: pd.DataFrame | None) -> list[str]:
    """The doctor's verdict and its most telling warnings (SPEC 4.8), first in the file."""
    if findings is None:
        return []
    from routescope.analysis.doctor import verdict

    v = verdict(findings)
    serious = findings[findings["severity"].isin(["critical", "warning"])]
    cls = "banner" if v["severity"] == "critical" else "verdict"
    parts = [f"<p class='{cls}' id='doctor-verdict'>Doctor: {html.escape(v['headline'])}</p>"]
    if not serious.empty:
        cols = ["severity", "finding", "layer", "expert", "step", "evidence", "suggestion"]
        parts.append(table_html(serious.head(10), cols, "").replace("text-align: right;", ""))
        if len(serious) > 10:
            parts.append(f"<p class='more'>… {len(serious) - 10} more: routescope doctor RUN --all</p>")
    return parts


def render_html(run: Any, report: dict[str, Any]) -> str:
    """The whole document: facts, figures with captions, and the report's tables."""
    from plotly.offline import get_plotlyjs

    facts = report["run"]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>routescope report: {html.escape(str(facts['path']))}</title>",
        f"<style>{STYLE}</style><script type='text/javascript'>{get_plotlyjs()}</script></head><body>",
        f"<h1>routescope report: {html.escape(str(facts['path']))}</h1>",
    ]
    if not facts.get("complete"):
        parts.append(
            "<p class='banner'>INCOMPLETE RUN: still being written, or its recording crashed; "
            "the numbers cover only the parts flushed so far.</p>"
        )
    parts += doctor_html(report.get("doctor"))
    if facts.get("damage"):  # analysis/quick_check.py
        problems = "; ".join(html.escape(p) for p in facts["damage"])
        parts.append(
            f"<p class='banner'>DAMAGED RUN: {problems}. The numbers cannot be trusted: run "
            f"<code>routescope check {html.escape(str(facts['path']))}</code> for every failed invariant.</p>"
        )
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    parts += [facts_html({**facts, "generated": stamp}), "<h2>Figures</h2>"]
    for heading, fig, caption, *numbers in figure_sections(run, report):
        parts.append(f"<h3>{html.escape(heading)}</h3>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False}))
        parts.append(f"<p class='caption'>{html.escape(caption)}</p>")
        parts.extend(numbers)  # a section's numbers as an HTML table, where it has them
    tables = report_sections(report)
    parts.append("<h2>Tables</h2>")
    for title, df, cols, empty in tables:
        parts.append(f"<h3>{html.escape(title)}</h3>{table_html(df, cols, empty)}")
    for name, reason in report.get("skipped", {}).items():
        parts.append(f"<p class='empty'>Skipped {html.escape(name)}: {html.escape(reason)}.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html_report(run: Any, report: dict[str, Any], path: str | Path) -> Path:
    """Write the report to `path` (written under a temporary name, then renamed)."""
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"--html {path}: the report file must end in .html")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_html(run, report), encoding="utf-8")
    tmp.replace(path)
    return path

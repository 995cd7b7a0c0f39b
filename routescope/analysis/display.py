"""HTML summary of a Run for Jupyter: the manifest facts and the headline routing metrics.

`Run._repr_html_` calls `run_html`; nothing here queries Parquet directly, it calls the Run's
metric methods. Every string from the run (paths, labels, model names) is escaped.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import pandas as pd

MANIFEST_FACTS = (
    ("model", "model_name"),
    ("model type", "model_type"),
    ("decoder layers", "num_hidden_layers"),
    ("tokens", "tokens"),
)
BALANCE_COLUMNS = ("cv", "max_violation", "balancedness", "norm_entropy", "aux_loss")
ENTANGLEMENT_COLUMNS = (
    "layer",
    "next_layer",
    "mutual_info_bits",
    "baseline_mutual_info_bits",
    "norm_mutual_info",
    "top1_predictability",
)
MAX_TABLE_ROWS = 12


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _compact(values: Any) -> str:
    """`{'1': 16, '2': 16}` -> `16`; mixed values listed per layer."""
    if isinstance(values, dict):
        distinct = sorted({str(v) for v in values.values()})
        if len(distinct) == 1:
            return distinct[0]
        return ", ".join(f"L{k}: {v}" for k, v in values.items())
    if isinstance(values, list | tuple):
        return ", ".join(str(v) for v in values)
    return str(values)


def _row(key: str, value: Any) -> str:
    return (
        f"<tr><th style='text-align:left'>{_esc(key)}</th><td style='text-align:left'>{_esc(value)}</td></tr>"
    )


def _table(df: pd.DataFrame, columns: tuple[str, ...] | list[str]) -> str:
    cols = [c for c in columns if c in df.columns]
    head = "".join(f"<th>{_esc(c)}</th>" for c in cols)
    body = []
    for _, rec in df[cols].head(MAX_TABLE_ROWS).iterrows():
        body.append("<tr>" + "".join(f"<td>{_esc(_fmt(rec[c]))}</td>" for c in cols) + "</tr>")
    more = ""
    if len(df) > MAX_TABLE_ROWS:
        more = f"<tr><td colspan='{len(cols)}'>… {len(df) - MAX_TABLE_ROWS} more rows</td></tr>"
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}{more}</tbody></table>"


def _metric(run: Any, name: str, **kwargs: Any) -> tuple[pd.DataFrame | None, str | None]:
    """Call a metric method if the Run has it; (frame, None) or (None, why not)."""
    method: Callable[..., pd.DataFrame] | None = getattr(run, name, None)
    if method is None:
        return None, f"{name}() is not available"
    try:
        return method(**kwargs), None
    except Exception as exc:  # a summary must render even when one metric cannot
        return None, f"{name}() failed: {type(exc).__name__}: {exc}"


def run_html(run: Any) -> str:
    """An HTML summary of `run`: manifest facts, balance per layer, dead / hot experts, entanglement."""
    m = run.manifest
    state = "complete" if m.get("complete") else "INCOMPLETE (still recording, or the recording crashed)"
    facts = [_row("path", run.path)]
    facts += [_row(key, m[field]) for key, field in MANIFEST_FACTS if field in m]
    facts += [
        _row("MoE layers", _compact(m.get("moe_layers", []))),
        _row("experts per layer", _compact(m.get("num_experts", {}))),
        _row("top-k", _compact(m.get("top_k", {}))),
        _row("labels", ", ".join(m.get("labels", [])) or "none"),
        _row("state", state),
    ]
    parts = [
        "<div class='routescope-run'>",
        f"<h4 style='margin:0.2em 0'>routescope run {_esc(getattr(run.path, 'name', run.path))}</h4>",
        f"<table>{''.join(facts)}</table>",
    ]
    notes: list[str] = []

    balance, why = _metric(run, "balance")
    if balance is not None and not balance.empty:
        parts.append("<h5 style='margin:0.6em 0 0.2em'>Load balance per MoE layer</h5>")
        parts.append(_table(balance, ("layer", "num_experts", "tokens", *BALANCE_COLUMNS)))
    elif why:
        notes.append(why)

    dead, why_dead = _metric(run, "dead_experts")
    hot, why_hot = _metric(run, "hot_experts")
    counts = []
    for name, df, why in (("dead experts", dead, why_dead), ("hot experts (≥ 2/E)", hot, why_hot)):
        if df is not None:
            listed = ", ".join(
                f"L{int(r.layer)}/e{int(r.expert)}" for r in df.head(MAX_TABLE_ROWS).itertuples()
            )
            extra = f" … (+{len(df) - MAX_TABLE_ROWS})" if len(df) > MAX_TABLE_ROWS else ""
            counts.append(_row(f"{name}: {len(df)}", (listed + extra) or "none"))
        elif why:
            notes.append(why)
    if counts:
        parts.append(f"<table>{''.join(counts)}</table>")

    ent, why = _metric(run, "entanglement")
    if ent is not None and not ent.empty:
        parts.append("<h5 style='margin:0.6em 0 0.2em'>Cross-layer entanglement (top-1 experts)</h5>")
        parts.append(_table(ent, ENTANGLEMENT_COLUMNS))
    elif why:
        notes.append(why)

    if notes:
        parts.append("<p style='color:#7f7f7f'>" + "<br>".join(_esc(n) for n in notes) + "</p>")
    parts.append("</div>")
    return "\n".join(parts)

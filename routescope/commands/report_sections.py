"""The tables of `routescope report`: one list of (title, frame, columns, empty text), shared by
the terminal report (`cli.py`) and the one-file HTML report (`html_report.py`)."""

from __future__ import annotations

from typing import Any

import pandas as pd

Section = tuple[str, Any, list[str], str]

BALANCE_COLUMNS = [
    "layer",
    "num_experts",
    "tokens",
    "cv",
    "max_violation",
    "balancedness",
    "norm_entropy",
    "aux_loss",
    "aux_loss_step_mean",
    "ep_balancedness",
    "ep_balancedness_step_mean",
]


def fmt(value: Any) -> str:
    """A cell or a fact as report text: 4 significant digits, lists joined, missing as a dash."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def report_sections(report: dict[str, Any]) -> list[Section]:
    """The report's tables in order; a table whose data the run lacks (None) is left out."""
    sections: list[Section] = [
        ("Balance per MoE layer", report["balance"], BALANCE_COLUMNS, "no MoE layer"),
        (
            "Dead experts (no token)",
            report["dead_experts"],
            ["layer", "expert", "tokens", "tokens_seen", "p_uniform_miss"],
            "none",
        ),
        ("Hot experts", report["hot_experts"], ["layer", "expert", "tokens", "share", "ratio"], "none"),
        (
            "Cross-layer entanglement (slot-0 experts)",
            report["entanglement"],
            [
                "layer",
                "next_layer",
                "mutual_info_bits",
                "baseline_mutual_info_bits",
                "norm_mutual_info",
                "cond_entropy_bits",
                "top1_predictability",
            ],
            "fewer than two MoE layers",
        ),
    ]
    sections = [section for section in sections if section[1] is not None]
    if report.get("super_experts") is not None:
        th = report.get("super_expert_thresholds") or {}
        sections.append(
            (
                f"Super Experts (a > P{fmt(th.get('quantile'))} = {fmt(th.get('percentile_threshold'))} "
                f"and > max × {fmt(th.get('ratio'))} = {fmt(th.get('max_threshold'))}, over the "
                f"{fmt(th.get('pooled_experts'))} experts of layers {fmt(th.get('layers'))}; "
                f"median {fmt(th.get('median'))})",
                report["super_experts"],
                ["layer", "expert", "shared", "max_abs_output", "ratio_to_median", "channel", "tokens_seen"],
                "none above both thresholds",
            )
        )
    if report.get("massive_activations") is not None:
        sections.append(
            (
                "Residual stream per decoder layer (massive: |h| > 100 and > 1000 × median |h|)",
                report["massive_activations"],
                ["layer", "max_abs", "median_abs", "ratio_to_median", "channel", "is_massive"],
                "no hidden_stats",
            )
        )
    return sections

"""`routescope doctor RUN`: the run's findings with evidence and suggestions (SPEC 4.8).

Exit codes: 0 healthy (nothing above info), 1 warnings, 3 critical findings; 2 bad input (no
such run, a bad --where or threshold), as every command. The findings are `run.doctor()`
(analysis/doctor.py); the terminal shows the verdict, the findings grouped, the most telling
ones, then "N more" (all of them with --all or --json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

import pandas as pd

from routescope.analysis.doctor import exit_code, group_findings, verdict
from routescope.analysis.doctor_rules import SEVERITY_RANK, DoctorThresholds

STYLE = {"critical": "bold red", "warning": "yellow", "info": "cyan", "ok": "green"}


def add_doctor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run directory or URI (s3://, gs://, ...)")
    parser.add_argument("--where", help="SQL predicate over the tokens view, e.g. \"phase = 'prefill'\"")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document: verdict and every finding"
    )
    parser.add_argument("--all", action="store_true", help="print every finding, not only the top ones")
    parser.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override one threshold, e.g. --threshold alpha=1e-6 (names: "
        + ", ".join(f.name for f in dataclasses.fields(DoctorThresholds))
        + "; defaults and sources in docs/doctor.md)",
    )
    parser.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="read a run with corrupt parts: skip them (the doctor then reports the run as damaged)",
    )


def parse_thresholds(items: list[str]) -> DoctorThresholds:
    """`NAME=VALUE` overrides of DoctorThresholds; ValueError naming a bad one."""
    fields = {f.name: f for f in dataclasses.fields(DoctorThresholds)}
    values: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in fields:
            raise ValueError(
                f"--threshold {item!r}: expected NAME=VALUE with NAME one of {', '.join(fields)}"
            )
        kind = int if isinstance(fields[name].default, int) else float
        try:
            values[name] = kind(text)
        except ValueError:
            raise ValueError(f"--threshold {item!r}: {text!r} is not a {kind.__name__}") from None
    return DoctorThresholds(**values)


def findings_document(findings: pd.DataFrame, path: str) -> dict[str, Any]:
    from routescope.analysis.metrics import to_records

    return {
        "path": path,
        "verdict": verdict(findings),
        "groups": to_records(group_findings(findings)),
        "findings": to_records(findings.astype(object).where(findings.notna(), None)),
    }


def render_findings(
    findings: pd.DataFrame,
    path: str,
    limit: int | None,
    console: Any = None,
    least: str = "info",
    passed: bool = True,
) -> None:
    """Verdict, the findings grouped, then the top `limit` findings (None: all) of severity
    `least` or worse with their evidence; `passed` also lists the checks that found nothing."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    v = verdict(findings)
    console.print(f"[{STYLE[v['severity']]}]DOCTOR {v['headline']}[/{STYLE[v['severity']]}]  ({path})")
    groups = group_findings(findings)
    if not groups.empty:
        console.print(
            "  "
            + "; ".join(
                f"{g.finding} ({g.severity}): {g.count}" + (f" in {g.layers} layer(s)" if g.layers else "")
                for g in groups.itertuples(index=False)
            )
        )
    shown = findings[findings["severity"].map(SEVERITY_RANK) >= max(SEVERITY_RANK[least], 1)]
    top = shown if limit is None else shown.head(limit)
    if not top.empty:
        table = Table(show_edge=False, header_style="bold", show_lines=False)
        for col in ("severity", "finding", "layer", "expert", "step", "evidence"):
            table.add_column(col, overflow="fold")
        for row in top.itertuples(index=False):
            cells = [row.severity, row.finding] + [
                "–" if pd.isna(v) else str(int(v)) for v in (row.layer, row.expert, row.step)
            ]
            table.add_row(
                *cells,
                f"{row.evidence}\n[dim]→ {row.suggestion}[/dim]"
                + (f"\n[dim]sql: {row.sql}[/dim]" if isinstance(row.sql, str) and row.sql else ""),
                style=STYLE[row.severity] if row.severity == "critical" else None,
            )
        console.print(table)
    more = len(shown) - len(top)
    if more > 0:
        console.print(f"… {more} more: routescope doctor {path} --all (or --json) lists every finding")
    ok = findings[findings["severity"] == "ok"]
    if passed and len(ok):
        console.print(f"[green]passed:[/green] {', '.join(ok['finding'])}")


def doctor_command(args: argparse.Namespace) -> int:
    """Findings with evidence and suggestions; exit 0 healthy, 1 warnings, 3 critical."""
    import routescope as rs
    from routescope.analysis.querying import quiet_selection

    thresholds = parse_thresholds(args.threshold)
    with quiet_selection():
        with rs.open_run(args.run, skip_corrupt=args.skip_corrupt) as run:
            findings = run.doctor(thresholds=thresholds, where=args.where, progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps(findings_document(findings, str(args.run)), indent=2, default=str))
    else:
        from rich.console import Console

        console = Console() if sys.stdout.isatty() else Console(width=160)
        render_findings(findings, str(args.run), None if args.all else thresholds.top_findings, console)
    return exit_code(findings)


__all__ = [
    "add_doctor_arguments",
    "doctor_command",
    "findings_document",
    "parse_thresholds",
    "render_findings",
]

"""The `routescope` command line: `routescope <command> [options]` (SPEC section 5).

COMMANDS maps each command name to (add_arguments, run): add_arguments fills the command's
argparse sub-parser, run takes the parsed namespace and returns the exit code. Add a
command by adding one entry. Bad input (RouteScopeError, ValueError, FileNotFoundError, a
usage error) ends with one line on stderr, `routescope: error: ...`, and exit code 2; a run
that another writer holds (RunBusyError) ends the same way with exit code 4 (EXIT_BUSY).
The commands here only call the public API (`rs.open_run`, Run methods, `rs.compare`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import pandas as pd

from routescope.analysis.querying import first_choice_unknown, quiet_selection
from routescope.analysis.quick_check import quick_check
from routescope.commands.attach import add_run_arguments, run_command
from routescope.commands.check import add_check_arguments, check_command
from routescope.commands.compare import add_compare_arguments, compare_command
from routescope.commands.console import add_skip_corrupt_argument, output_console, status, table
from routescope.commands.doctor import add_doctor_arguments, doctor_command
from routescope.commands.engine_options import add_engine_arguments, spark_option
from routescope.commands.import_run import add_import_arguments, import_command
from routescope.commands.index import add_index_arguments, index_command
from routescope.commands.placement import add_placement_arguments, placement_command
from routescope.commands.profile import (
    add_demo_arguments,
    add_profile_arguments,
    profile_command,
    record_demo,
)
from routescope.commands.report_banners import damage_banner, incomplete_banner
from routescope.commands.report_sections import fmt, report_sections
from routescope.commands.super_experts import add_super_experts_arguments, super_experts_command
from routescope.dashboard.command import add_dashboard_arguments, dashboard_command
from routescope.errors import RouteScopeError, RunBusyError

AddArguments = Callable[[argparse.ArgumentParser], None]
RunCommand = Callable[[argparse.Namespace], int]
PROG = "routescope"
# Exit codes besides 0 and 2 (bad input); `doctor` uses 3 for critical findings.
EXIT_BUSY = 4  # another writer holds the run (RunBusyError): retry later or pass --wait
TOP_FINDINGS = 10  # the doctor's findings `report` shows under its verdict (DoctorThresholds.top_findings)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def show_warning(
    message: Warning | str, category: type[Warning], filename: str = "", *args: Any, **kwargs: Any
) -> None:
    """A warning as one line on stderr, `routescope: warning: ...` (no file name or source line);
    another package's warning keeps its own name (`warning from pyspark: ...`), never ours."""
    text = one_line(message if isinstance(message, BaseException) else Exception(message))
    if text in _SHOWN:  # the same warning from another call site of one command: once is enough
        return
    _SHOWN.add(text)
    origin = warning_origin(text, category, filename)
    where = "warning" if origin == PROG else f"warning from {origin}"
    print(f"{PROG}: {where}: {text.removeprefix('routescope: ')}", file=sys.stderr)


def warning_origin(text: str, category: type[Warning], filename: str) -> str:
    """`routescope` for our warnings (their text starts with it, their class is ours, or they
    come from any file outside an installed package), else the installed package that warned."""
    if text.startswith("routescope") or category.__module__.startswith("routescope"):
        return PROG
    parts = Path(filename or "").parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts[:-1]:
            top = parts[parts.index(marker) + 1].removesuffix(".py")
            return PROG if top == "routescope" else top
    return PROG


_SHOWN: set[str] = set()


# -- report ---------------------------------------------------------------------------
def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run directory")
    parser.add_argument("--where", help="SQL predicate over the tokens view, e.g. \"phase = 'prefill'\"")
    parser.add_argument(
        "--hot-factor", type=float, default=2.0, help="hot: share >= factor / E (default 2.0)"
    )
    parser.add_argument(
        "--ep-size",
        type=int,
        help="also show ep_balancedness with the experts placed contiguously on this many GPUs",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.add_argument("--html", metavar="FILE", help="also write a one-file HTML report")
    parser.add_argument(
        "--follow",
        action="store_true",
        help="a run still being written: print the latest step's balance (train_step for a training "
        "run) each time a new step lands, until the run is complete. It sees what the writer has "
        "flushed: a part every flush_seconds (default 10 s; rs.record / rs.watch(..., flush_seconds=1), "
        "profile --flush-seconds) or when rows_per_part fill",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=2.0,
        help="seconds between reads with --follow (default 2; steps still appear only as the writer flushes)",
    )
    add_engine_arguments(parser)
    add_skip_corrupt_argument(parser)


COUNTS_ONLY_SKIP = (
    "this run holds per-expert counts only (imported from an engine's counters); it needs per-token routing"
)


def collect_report(
    run: Any, where: str | None = None, hot_factor: float = 2.0, ep_size: int | None = None
) -> dict[str, Any]:
    """Everything `report` shows, as manifest facts and DataFrames."""
    import routescope as rs

    m = run.manifest
    damage = getattr(run, "damage", None)
    facts = {
        "path": getattr(run, "uri", None) or str(run.path),  # a run on object storage keeps its s3://
        "damage": quick_check(run) if damage is None else damage,  # cheap invariants (quick_check.py)
        "model_type": m.get("model_type"),
        "model_name": m.get("model_name"),
        "num_hidden_layers": m.get("num_hidden_layers"),
        "moe_layers": run.moe_layers,
        "num_experts": sorted({run.num_experts(layer) for layer in run.moe_layers}),
        "top_k": sorted({run.top_k(layer) for layer in run.moe_layers}),
        "labels": run.labels,
        "tokens": m.get("tokens"),
        "complete": run.complete,
        "skipped_corrupt_parts": m.get("skipped_corrupt_parts"),
        "where": where,
        "sample": m.get("sample"),
        "sample_seed": m.get("sample_seed"),
        "verified": m.get("verified"),  # None: an imported or older run, which does not say
        "unverified_reason": m.get("unverified_reason"),
        "transformers": (m.get("versions") or {}).get("transformers"),
        "tokens_matched": run.token_count(where) if where else m.get("tokens"),
    }
    report: dict[str, Any] = {
        "run": facts,
        # the verdict first (SPEC 4.8): the same findings as `routescope doctor`
        "doctor": run.doctor(where=where) if facts["tokens_matched"] else None,
        "balance": run.balance(where=where, ep_size=ep_size),
        "dead_experts": run.dead_experts(where=where),
        "hot_experts": run.hot_experts(factor=hot_factor, where=where),
        "entanglement": None,
        "skipped": {},
        "super_experts": None,
        "super_expert_thresholds": None,
        "massive_activations": None,
    }
    # Sections that need per-token routing: a counts-only run skips them and says why.
    for name, section in (("entanglement", lambda: run.entanglement(where=where)),):
        if run.manifest.get("counts_only"):
            report["skipped"][name] = COUNTS_ONLY_SKIP
        elif why := first_choice_unknown(run, name, where):  # an import without slot order
            report["skipped"][name] = why
        else:
            report[name] = section()
    if run.has_table("expert_activations"):
        acts = run.expert_activations()
        classified = rs.classify_super_experts(acts, int(m.get("num_hidden_layers") or 0))
        report["super_experts"] = classified[classified["is_super"]].reset_index(drop=True)
        report["super_expert_thresholds"] = dict(classified.attrs.get("thresholds", {}))
    if run.has_table("hidden_stats"):
        report["massive_activations"] = rs.classify_massive(run.hidden_stats())
    return report


BALANCE_LEGEND = (
    "[dim]cv, max_violation: lower is better, 0 = uniform.  balancedness, norm_entropy, ep_balancedness:\n"
    "higher is better, 1 = uniform.  aux_loss: lower is better; top-k = {k} under uniform routing.[/dim]"
)


def render_report_tables(report: dict[str, Any]) -> None:
    console = output_console()
    facts = report["run"]
    if not facts["complete"]:
        console.print(incomplete_banner(facts["path"], facts.get("skipped_corrupt_parts")))
    if facts.get("damage"):
        console.print(damage_banner(facts["path"], facts["damage"]))
    console.print(
        f"[bold]routescope report[/bold] {facts['path']}  model_type {facts['model_type']}  "
        f"tokens {facts['tokens']}  MoE layers {len(facts['moe_layers'])}  experts {fmt(facts['num_experts'])}  "
        f"top-k {fmt(facts['top_k'])}" + (f"  where: {facts['where']}" if facts["where"] else "")
    )
    sections = report_sections(report)
    if report.get("doctor") is not None:
        from routescope.commands.doctor import render_findings

        render_findings(report["doctor"], facts["path"], TOP_FINDINGS, console, least="warning", passed=False)
    if facts.get("verified") is False:
        console.print(
            f"[yellow]Unverified: {facts.get('unverified_reason') or 'not in the verified table'} "
            f"(recorded with transformers {facts.get('transformers') or '?'}).[/yellow]"
        )
    if facts["sample"]:
        console.print(
            f"[yellow]Sampled run: every figure comes from {facts['sample']:.2%} of the sequences "
            f"(seed {facts['sample_seed']}), not from all of them.[/yellow]"
        )
    if facts["where"] and not facts["tokens_matched"]:
        console.print(
            f"[bold yellow]No token matches --where {facts['where']!r}: nothing to report.[/bold yellow]"
        )
        return
    for title, df, cols, empty in sections:
        console.print()
        console.print(table(title, df, cols, empty))
        if title.startswith("Balance"):
            console.print(BALANCE_LEGEND.format(k=fmt(facts["top_k"])))
    for name, reason in report.get("skipped", {}).items():
        console.print()
        console.print(f"[yellow]Skipped {name}: {reason}.[/yellow]")
    if not facts["complete"]:
        console.print()
        console.print("[bold red]INCOMPLETE RUN[/bold red]: see the warning at the top.")
    if facts.get("damage"):
        console.print()
        console.print(
            f"[bold red]DAMAGED RUN[/bold red]: see the warning at the top (routescope check {facts['path']})."
        )


def render_report_json(report: dict[str, Any]) -> None:
    from routescope.analysis.metrics import to_records
    from routescope.commands.doctor import findings_document

    doc = {k: (to_records(v) if isinstance(v, pd.DataFrame) else v) for k, v in report.items()}
    if report.get("doctor") is not None:
        found = findings_document(report["doctor"], report["run"]["path"])
        doc["doctor"] = {
            "verdict": found["verdict"],
            "groups": found["groups"],
            "findings": found["findings"],
        }
    print(json.dumps(doc, indent=2, default=str))


REPORT_RENDERERS: dict[str, Callable[[dict[str, Any]], None]] = {
    "table": render_report_tables,
    "json": render_report_json,
}


def report_command(args: argparse.Namespace) -> int:
    """Terminal summary of a run: balance, dead and hot experts, entanglement, Super Experts."""
    import routescope as rs

    if getattr(args, "follow", False):
        from routescope.commands.follow import follow

        with quiet_selection():
            follow(args.run, interval=args.interval, where=args.where)
        return 0
    # the report says itself when --where selects nothing (no warning per metric)
    with status(f"analysing {args.run} …"), quiet_selection():
        run = rs.open_run(
            args.run,
            skip_corrupt=getattr(args, "skip_corrupt", False),
            engine=getattr(args, "engine", "duckdb"),
            spark=spark_option(args),
        )
        try:
            report = collect_report(
                run, where=args.where, hot_factor=args.hot_factor, ep_size=getattr(args, "ep_size", None)
            )
            if args.html:
                from routescope.commands.html_report import write_html_report

                write_html_report(run, report, args.html)
        finally:
            run.close()
    REPORT_RENDERERS["json" if args.json else "table"](report)
    if args.html:  # on stderr, so `--json` output stays one JSON document
        print(f"wrote {args.html}", file=sys.stderr)
    return 0


# -- demo -----------------------------------------------------------------------------
def demo_command(args: argparse.Namespace) -> int:
    """Record the bundled model on the bundled corpus, report, then serve the dashboard."""
    out = record_demo(args)  # the recording lives in commands/profile.py; the chaining here
    code = main(["report", str(out)])
    if code or args.no_dashboard:
        return code
    return main(["dashboard", str(out), "--host", args.host, "--port", str(args.port)])


# -- entry point ----------------------------------------------------------------------
COMMANDS: dict[str, tuple[AddArguments, RunCommand]] = {
    "demo": (add_demo_arguments, demo_command),
    "profile": (add_profile_arguments, profile_command),
    "report": (add_report_arguments, report_command),
    "compare": (add_compare_arguments, compare_command),
    "super-experts": (add_super_experts_arguments, super_experts_command),
    "dashboard": (add_dashboard_arguments, dashboard_command),
    "import": (add_import_arguments, import_command),
    "placement": (add_placement_arguments, placement_command),
    "run": (add_run_arguments, run_command),
    "check": (add_check_arguments, check_command),
    "doctor": (add_doctor_arguments, doctor_command),
    "index": (add_index_arguments, index_command),
}


def build_parser() -> ArgumentParser:
    from routescope import __version__

    parser = ArgumentParser(prog=PROG, description="Expert-routing observability for MoE models.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add_arguments, run) in COMMANDS.items():
        doc = (run.__doc__ or "").strip().splitlines()
        command = sub.add_parser(name, help=doc[0] if doc else None, description=doc[0] if doc else None)
        add_arguments(command)
        command.set_defaults(handler=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default sys.argv[1:]), run the command, return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (2) and --help / --version (0)
        return exc.code if isinstance(exc.code, int) else 2
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            _SHOWN.clear()
            warnings.showwarning = show_warning
            return int(args.handler(args) or 0)
    except RunBusyError as exc:  # its own code: a script can retry later, or pass --wait
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_BUSY
    except (RouteScopeError, ValueError, FileNotFoundError) as exc:
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `routescope report RUN | head`: the reader has all it wants
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())

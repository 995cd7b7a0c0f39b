"""`routescope compare RUN_A RUN_B`: what changed between two runs (load and balance deltas,
dead/hot changes, router saturation and token agreement)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from routescope.commands.console import add_skip_corrupt_argument, output_console, status, table


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_a", metavar="RUN_A", help="the reference run")
    parser.add_argument("run_b", metavar="RUN_B", help="the run compared against it")
    parser.add_argument("--where", help="SQL predicate over the tokens view, applied to both runs")
    parser.add_argument(
        "--hot-factor", type=float, default=2.0, help="hot: share >= factor / E (default 2.0)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    add_skip_corrupt_argument(parser)


def render_compare_tables(result: Any) -> None:
    console = output_console()
    console.print(f"[bold]routescope compare[/bold] A {result.run_a}  →  B {result.run_b}")
    for note in result.notes:
        style = "bold red" if "INCOMPLETE" in note else "yellow"
        console.print(f"[{style}]{note}[/{style}]")
    bal_cols = ["layer", "tokens_a", "tokens_b", "cv_a", "cv_b", "cv_delta"]
    bal_cols += [f"{name}_delta" for name in ("max_violation", "balancedness", "norm_entropy", "aux_loss")]
    sections = [
        ("Balance per MoE layer (delta = B − A)", result.balance, bal_cols, "no common layer"),
        (
            "Experts that changed state",
            result.expert_changes,
            ["layer", "expert", "change", "share_a", "share_b"],
            "none",
        ),
        (
            "Router saturation (tokens with the same content, token ids up to them, in both runs)",
            result.saturation,
            ["layer", "top_k", "tokens_matched", "saturation", "top1_agreement", "exact_match"],
            "no token in common",
        ),
        (
            "Token agreement over all common layers (any_layer_differs: R3's statistic; "
            "missing_routes: B's tokens with no routing)",
            result.token_agreement,
            ["tokens_matched", "any_layer_differs", "missing_routes", "layers"],
            "no token in common",
        ),
    ]
    biggest = result.load.reindex(result.load["share_delta"].abs().sort_values(ascending=False).index)
    sections.append(
        (
            "Largest share changes",
            biggest,
            ["layer", "expert", "share_a", "share_b", "share_delta", "tokens_a", "tokens_b"],
            "no experts",
        )
    )
    for title, df, cols, empty in sections:
        console.print()
        console.print(table(title, df, cols, empty))


def render_compare_json(result: Any) -> None:
    print(json.dumps(result.to_dict(), indent=2, default=str))


COMPARE_RENDERERS: dict[str, Callable[[Any], None]] = {
    "table": render_compare_tables,
    "json": render_compare_json,
}


def compare_command(args: argparse.Namespace) -> int:
    """What changed between two runs: load and balance deltas, dead/hot changes, router saturation."""
    import routescope as rs

    skip = getattr(args, "skip_corrupt", False)
    with status(f"comparing {args.run_a} and {args.run_b} …"):
        with rs.open_run(args.run_a, skip_corrupt=skip) as a, rs.open_run(args.run_b, skip_corrupt=skip) as b:
            result = rs.compare(a, b, where=args.where, hot_factor=args.hot_factor)
    COMPARE_RENDERERS["json" if args.json else "table"](result)
    return 0

"""`routescope placement RUN --ep-size N`: build an expert-parallel plan from a run's loads.

Prints, per MoE layer, the max / mean GPU load of the contiguous layout and of the plan, then
the same for the step (Σ over layers of the busiest GPU ÷ Σ of the means: layers run one after
another, so loads are never added across layers; `expert_parallel.model_imbalance`), and writes the plan (`--out`: .csv, .parquet, or an engine file with `--format sglang|vllm`) and the
loads (`--loads-out`) in the formats docs/placement.md describes. Reads the run only (no torch).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pandas as pd

from routescope.analysis.expert_parallel import model_imbalance
from routescope.analysis.placement import METHODS, evaluate_placement, step_loads
from routescope.export.placement import FORMATS, write_loads, write_plan

TABLE_SUFFIXES = (".csv", ".parquet", ".json")


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run directory")
    parser.add_argument("--ep-size", type=int, required=True, help="GPUs in the expert-parallel group")
    parser.add_argument("--redundant", type=int, default=0, help="extra expert slots in total (default 0)")
    parser.add_argument("--method", choices=METHODS, default="lpt", help="placement method (default lpt)")
    parser.add_argument(
        "--where", help="SQL predicate over the tokens view: the loads the plan is built from"
    )
    parser.add_argument(
        "--evaluate-where", help="evaluate the plan on these tokens instead (e.g. later steps)"
    )
    parser.add_argument("--num-groups", type=int, help="expert groups (eplb hierarchical policy)")
    parser.add_argument("--num-nodes", type=int, default=1, help="server nodes (eplb hierarchical policy)")
    parser.add_argument(
        "--out", help="write the plan: .csv / .parquet / .json table, or an engine file with --format"
    )
    parser.add_argument("--format", choices=FORMATS, help="engine file layout for --out and --loads-out")
    parser.add_argument("--loads-out", help="write the loads in the --format engine's layout")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="read a run with corrupt or truncated parts: skip them and say what was skipped",
    )


def engine_facts(run: Any, ep_size: int) -> dict[str, Any]:
    layers = run.moe_layers
    sizes = {run.num_experts(layer) for layer in layers}
    if len(sizes) != 1:
        raise ValueError(
            f"engine files need one expert count for every MoE layer; this run has {sorted(sizes)}"
        )
    m = run.manifest
    return {
        "moe_layers": layers,
        "num_hidden_layers": int(m.get("num_hidden_layers") or max(layers) + 1),
        "num_experts": sizes.pop(),
        "ep_size": ep_size,
        "model": m.get("model_name") or m.get("model_type"),
    }


def compare_to_contiguous(
    run: Any, plan: pd.DataFrame, args: argparse.Namespace
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per layer: imbalance (max / mean GPU load) of the contiguous layout and of the plan; and
    the model-level figure of both (`model_imbalance`)."""
    where = args.evaluate_where if args.evaluate_where is not None else args.where
    loads = run.expert_load(where=where)
    base = run.placement(args.ep_size, args.redundant, "contiguous", where=args.where)
    before = evaluate_placement(loads, base)
    after = evaluate_placement(loads, plan)
    model = {"contiguous": model_imbalance(before), args.method: model_imbalance(after)}
    per_layer = pd.DataFrame(
        {
            "layer": after["layer"],
            "routing_slots": after["routing_slots"].round().astype("int64"),
            "contiguous_imbalance": before["imbalance"],
            f"{args.method}_imbalance": after["imbalance"],
            "max_gpu_load": after["max_gpu_load"],
            "mean_gpu_load": after["mean_gpu_load"],
            "ep_balancedness": after["ep_balancedness"],
        }
    )
    return per_layer, model


def write_table(path: Path, plan: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        plan.to_parquet(path, index=False)
    elif path.suffix == ".json":
        path.write_text(plan.to_json(orient="records") + "\n", encoding="utf-8")
    else:
        plan.to_csv(path, index=False)


def placement_command(args: argparse.Namespace) -> int:
    """Expert-parallel placement plan (contiguous, lpt, DeepSeek eplb) from a run's loads."""
    import routescope as rs

    if args.out and not args.format and Path(args.out).suffix not in TABLE_SUFFIXES:
        raise ValueError(
            f"--out {args.out}: use a {', '.join(TABLE_SUFFIXES)} file, or pass --format sglang|vllm"
        )
    if args.format and not (args.out or args.loads_out):
        raise ValueError(
            f"--format {args.format} writes engine files: add --out FILE (the plan) or --loads-out FILE (the loads)"
        )
    if args.loads_out and not args.format:
        raise ValueError("--loads-out needs --format sglang or --format vllm")
    with rs.open_run(args.run, skip_corrupt=getattr(args, "skip_corrupt", False)) as run:
        plan = run.placement(
            args.ep_size,
            args.redundant,
            args.method,
            where=args.where,
            num_groups=args.num_groups,
            num_nodes=args.num_nodes,
        )
        summary, model = compare_to_contiguous(run, plan, args)
        written = []
        if args.out:
            if args.format:
                write_plan(args.out, args.format, plan, engine_facts(run, args.ep_size))
            else:
                write_table(Path(args.out), plan)
            written.append(args.out)
        if args.loads_out:
            write_loads(
                args.loads_out,
                args.format,
                step_loads(run, where=args.where),
                engine_facts(run, args.ep_size),
            )
            written.append(args.loads_out)
    if args.json:
        doc = {
            "summary": summary.to_dict(orient="records"),
            "model": model,
            "plan": plan.to_dict(orient="records"),
            "written": written,
        }
        print(json.dumps(doc, indent=2, default=float))
        return 0
    print_summary(args, plan, summary, model, written)
    return 0


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def step_row(summary: pd.DataFrame, model: dict[str, Any], method: str) -> list[object]:
    """The table's last row: the step, Σ over layers of the busiest GPU ÷ Σ of the means."""
    after = model[method]
    cells = {
        "layer": "step (Σ max / Σ mean)",
        "routing_slots": int(summary["routing_slots"].sum()),
        "contiguous_imbalance": model["contiguous"]["imbalance"],
        f"{method}_imbalance": after["imbalance"],
        "max_gpu_load": after["step_load"],
        "mean_gpu_load": after["balanced_load"],
        "ep_balancedness": after["ep_balancedness"],
    }
    return [cells[col] for col in summary.columns]


def print_summary(
    args: argparse.Namespace,
    plan: pd.DataFrame,
    summary: pd.DataFrame,
    model: dict[str, Any],
    written: list[str],
) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console() if Console().is_terminal else Console(width=160)
    per_gpu = len(plan) // plan["layer"].nunique() // args.ep_size
    console.print(
        f"[bold]routescope placement[/bold] {args.run}  ep_size {args.ep_size}  redundant {args.redundant}  "
        f"method {args.method}  slots per GPU {per_gpu}"
        + (f"  evaluated on: {args.evaluate_where}" if args.evaluate_where else "")
    )
    table = Table(title="GPU load, max / mean (1.0 = even)", title_justify="left", show_edge=False)
    for col in summary.columns:
        table.add_column(col, justify="right")
    for row in summary.itertuples(index=False):
        table.add_row(*(_cell(v) for v in row))
    table.add_section()
    table.add_row(*(_cell(v) for v in step_row(summary, model, args.method)))
    console.print(table)
    console.print(
        "step: each layer waits for its busiest GPU, so the step takes Σ max over layers; "
        "loads are not added across layers"
    )
    for path in written:
        console.print(f"wrote {path}")

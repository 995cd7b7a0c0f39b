"""`routescope import megatron DIR --out RUN`: Megatron-Core router traces into a run.

`commands/import_run.py` registers the sub-command; the reading lives in
`routescope/importers/megatron/` (docs/importers.md).
"""

from __future__ import annotations

import argparse

from routescope.importers.core.files import check_output_dir
from routescope.importers.core.tables import write_imported_run
from routescope.importers.megatron.importer import DECODE_MAX_TOKENS, MODES


def add_megatron_parser(engines: argparse._SubParsersAction) -> None:
    """The `megatron` sub-command of `routescope import`."""
    parser = engines.add_parser(
        "megatron",
        help="Megatron-Core router traces (--moe-routing-trace-path: router_trace_rank{r}.jsonl + sidecars)",
        description="Convert the router_trace_rank{r}.jsonl files (and logits_rank{r}.bin, router_state_rank{r}.pt) "
        "that Megatron-Core's RouterTracer writes into one run.",
    )
    parser.add_argument("trace_dir", metavar="DIR", help="the --moe-routing-trace-path directory")
    parser.add_argument("--out", required=True, help="run directory to write")
    parser.add_argument(
        "--num-experts",
        type=int,
        help="routed experts per layer (default: the logits sidecar's width, else the router-state dump)",
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        help="training: every forward is phase prefill; inference: a rank's first step is prefill, later "
        "small steps decode (default: phase unknown)",
    )
    parser.add_argument(
        "--decode-max-tokens",
        type=int,
        default=DECODE_MAX_TOKENS,
        help=f"with --mode inference: a later step with at most this many rows is decode (default {DECODE_MAX_TOKENS})",
    )
    parser.add_argument(
        "--pipeline-stages",
        type=int,
        default=1,
        help="pipeline-parallel size P: rank r is on stage r // (ranks / P), whose layers are renumbered "
        "after the earlier stages' (default 1)",
    )
    parser.add_argument(
        "--layers-per-stage",
        type=int,
        help="decoder layers per pipeline stage (default: one more than the highest traced layer)",
    )
    parser.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="skip bad records (a truncated last line, inconsistent topk, an id >= E, a missing rank) and "
        "count them in the manifest instead of stopping",
    )
    parser.add_argument("--model-type", default="", help="model_type to put in the manifest")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run at --out")


def import_megatron_command(args: argparse.Namespace) -> int:
    """Read the trace directory and write the run."""
    from routescope.importers.megatron import import_megatron

    check_output_dir(args.out)
    imported = import_megatron(
        args.trace_dir,
        num_experts=args.num_experts,
        mode=args.mode,
        pipeline_stages=args.pipeline_stages,
        layers_per_stage=args.layers_per_stage,
        skip_corrupt=args.skip_corrupt,
        decode_max_tokens=args.decode_max_tokens,
    )
    out = write_imported_run(
        imported, args.out, model_type=args.model_type, overwrite=args.overwrite, sources=[args.trace_dir]
    )
    extra = imported.extra
    print(
        f"imported {imported.token_count()} tokens from ranks {extra['ranks']} (megatron, MoE layers "
        f"{imported.moe_layers}, slot order {extra['slot_order']}) into {out}"
    )
    skipped = extra["skipped_records"]["counts"]
    if skipped:
        print(f"skipped: {', '.join(f'{n} {reason}' for reason, n in skipped.items())}")
    if extra["slot_order_unknown_tokens"]:
        print(
            f"{extra['slot_order_unknown_tokens']} tokens have no logits, so their slot order is unknown: "
            "entanglement and repetition refuse them (trace with --moe-routing-trace-capture-logits)"
        )
    return 0

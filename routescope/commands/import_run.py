"""`routescope import {sglang,vllm} FILE --out RUN` (and `import megatron DIR`, commands/import_megatron.py): convert serving-engine routing dumps into a run.

With `--model CONFIG` (and optionally `--prompts FILE`) FILE holds server responses, the
rollouts RL frameworks replay (importers/responses.py); without it, recorder dumps and
routed-experts arrays as before.

The CLI (`routescope/cli.py`) registers `add_import_arguments` and `import_command`; the
parsing lives in `routescope/importers/`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from routescope.commands.attach import parse_labels
from routescope.commands.import_megatron import add_megatron_parser, import_megatron_command
from routescope.commands.profile import add_wait_argument, wait_option
from routescope.errors import RouteScopeError
from routescope.importers.core.errors import one_clean_line
from routescope.importers.core.files import check_output_dir
from routescope.importers.core.tables import parse_layers, write_imported_run


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    engines = parser.add_subparsers(dest="engine", metavar="{sglang,vllm,megatron}", required=True)
    sglang = engines.add_parser(
        "sglang",
        help="SGLang expert-distribution-recorder dumps (.pt, .csv) or server responses (.json, .jsonl)",
        description="Convert what SGLang writes into a run. Accepted inputs: (1) ExpertDistributionRecorder "
        ".pt dumps, one per rank: per_token mode gives tokens + routing, the count modes (per_pass, stat, "
        "stat_approx) a counts-only run (table expert_counts; --top-k required); (2) the oldest layout, "
        "expert_distribution_rank{R}_timestamp{T}.csv counts; (3) with --model CONFIG, server responses "
        "(JSON lines or a JSON list of /generate records whose meta_info carries routed_experts, as "
        "RL rollouts keep them; --prompts for records without prompt ids). docs/replay.md has the layouts.",
    )
    sglang.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help=".pt dump(s) or oldest-layout .csv, one per rank; or one .json/.jsonl of server responses "
        "with --model",
    )
    sglang.add_argument("--top-k", type=int, help="experts per token (required for the count modes)")
    sglang.add_argument(
        "--tp-size",
        type=int,
        help="ranks that saw the same tokens (plain tensor parallelism): keep one copy of their data "
        "(stat mode: divide the all-reduced counts); default: detect identical rank data, 1 for stat",
    )
    vllm = engines.add_parser(
        "vllm",
        help="vLLM routed_experts arrays (before 0.21 and 0.21+ response layouts)",
        description="Convert vLLM routed_experts arrays (.npy, .npz, .pt, .json, .jsonl) into a run.",
    )
    vllm.add_argument("files", nargs=1, metavar="FILE", help=".npy / .npz / .pt / .json / .jsonl")
    vllm.add_argument(
        "--moe-layers",
        help="decoder-layer index of each entry of the layer axis (as many as the axis has), or the MoE "
        "entries of a decoder-layer axis, e.g. '1-26' (default: all-zero dense layers are dropped)",
    )
    vllm.add_argument(
        "--prompt-len",
        type=int,
        help="prompt tokens of each bare array (no prompt ids or length in the file): rows before it "
        "are prefill, the rest decode (default: phase 'unknown')",
    )
    for sub in (sglang, vllm):
        sub.add_argument(
            "--model",
            metavar="CONFIG",
            help="server responses (JSON lines or a JSON list): the served model's config.json or model folder, "
            "which says which decoder layers are MoE (docs/replay.md)",
        )
        sub.add_argument(
            "--prompts",
            metavar="FILE",
            help="with --model: prompt token ids, one list per line in the order of the response records, "
            "for records that do not carry them",
        )
        sub.add_argument("--out", required=True, help="run directory to write")
        sub.add_argument("--num-experts", type=int, help="routed experts per layer (default: from the dump)")
        sub.add_argument("--model-type", default="", help="model_type to put in the manifest")
        add_batch_options(sub)
    add_megatron_parser(engines)


def add_batch_options(sub: argparse.ArgumentParser) -> None:
    """Options every import subcommand shares: how the batch joins the run at --out."""
    mode = sub.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace an existing run at --out")
    mode.add_argument(
        "--append",
        action="store_true",
        help="add this file as a further batch of the run at --out (e.g. one rollout step after "
        "another): seq_ids and steps continue after the run's, the manifest counts the whole run",
    )
    sub.add_argument(
        "--labels",
        action="append",
        default=[],
        metavar="K=V",
        help="label every imported token, e.g. --labels rollout_step=12 (repeatable; a VARCHAR column of "
        "tokens, like recorded labels: where=\"rollout_step = '12'\", specialization(by='rollout_step'))",
    )
    add_wait_argument(sub)


def batch_options(args: argparse.Namespace) -> dict[str, Any]:
    """write_imported_run's keyword arguments from the shared options."""
    return {
        "overwrite": args.overwrite,
        "append": getattr(args, "append", False),
        "labels": parse_labels(getattr(args, "labels", None) or []),
        "wait": wait_option(getattr(args, "wait", None)),
    }


def import_command(args: argparse.Namespace) -> int:
    """Convert SGLang expert-distribution dumps, vLLM routed_experts arrays or Megatron router traces into a run."""
    if args.engine == "megatron":
        return import_megatron_command(args)
    check_output_dir(args.out)
    if args.model is not None:
        return _import_responses(args)
    if args.prompts is not None:
        raise ValueError(
            "--prompts goes with --model CONFIG (server responses); pass the served model's config"
        )
    if args.engine == "sglang" and any(str(f).lower().endswith((".json", ".jsonl")) for f in args.files):
        raise ValueError(
            f"{args.files[0]}: SGLang server responses need --model CONFIG (the served model's config.json or "
            "folder) to know which decoder layers are MoE"
        )
    if args.engine == "sglang":
        from routescope.importers.sglang import import_sglang

        imported = import_sglang(
            args.files, top_k=args.top_k, num_experts=args.num_experts, tp_size=args.tp_size
        )
    else:
        from routescope.importers.vllm import import_vllm

        imported = import_vllm(
            args.files[0],
            moe_layers=parse_layers(args.moe_layers),
            num_experts=args.num_experts,
            prompt_len=args.prompt_len,
        )
    out = write_imported_run(
        imported, args.out, model_type=args.model_type, sources=args.files, **batch_options(args)
    )
    kind = "expert counts" if imported.counts_only else f"{imported.token_count()} tokens"
    print(
        f"imported {kind} ({imported.engine} {imported.mode}, MoE layers {imported.moe_layers}) into {out}"
        + _run_total(args, out)
    )
    return 0


def _run_total(args: argparse.Namespace, out: Any) -> str:
    if not getattr(args, "append", False):
        return ""
    from routescope.store.manifest import read_manifest

    return f" (appended: the run now holds {read_manifest(out).get('tokens', 0)} tokens)"


# Options of the dump / array importers that a model config answers for server responses.
_DUMP_OPTIONS = {
    "--num-experts": "num_experts",
    "--top-k": "top_k",
    "--tp-size": "tp_size",
    "--moe-layers": "moe_layers",
}


def _import_responses(args: argparse.Namespace) -> int:
    """Server responses (SGLang meta_info / sgl_ext, vLLM choices) with the model config."""
    from routescope.importers.responses import import_response_file

    if len(args.files) != 1:
        raise ValueError(f"--model reads one file of server responses, got {len(args.files)} files")
    given = [option for option, attr in _DUMP_OPTIONS.items() if getattr(args, attr, None) is not None]
    if given:
        raise ValueError(
            f"{', '.join(given)} do not apply to server responses: --model CONFIG gives the MoE layers, "
            "experts and top-k"
        )
    imported, layout = import_response_file(args.engine, args.files[0], args.model, prompts=args.prompts)
    out = write_imported_run(
        imported,
        args.out,
        model_type=args.model_type or layout.model_type,
        sources=args.files,
        **batch_options(args),
    )
    extra = imported.extra
    print(
        f"imported {imported.token_count()} tokens of {extra['sequences']} sequences from {extra['requests']} "
        f"{args.engine} responses (MoE layers {imported.moe_layers}) into {out}" + _run_total(args, out)
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (until the CLI registers the command): python -m routescope.commands.import_run."""
    parser = argparse.ArgumentParser(prog="routescope import")
    add_import_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return import_command(args)
    except (RouteScopeError, ValueError, FileNotFoundError) as exc:
        print(f"routescope: error: {one_clean_line(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

"""`routescope super-experts`: calibrate a model on a corpus and print its Super Experts.

The CLI (`routescope/cli.py`) registers `add_super_experts_arguments` and
`super_experts_command`; the work is `routescope.capture.calibration.activations.calibrate`, imported
when the command runs (building the CLI's parser stays torch-free).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np
import pandas as pd

from routescope.analysis.superexperts import DEFAULT_QUANTILE, DEFAULT_RATIO, Calibration
from routescope.commands.inputs import TextRecord, bundled_corpus, bundled_model, read_texts
from routescope.commands.profile import DTYPES, load_model

EXPERT_COLUMNS = (
    ("layer", "layer"),
    ("expert", "expert"),
    ("max |out|", "max_abs_output"),
    ("channel", "channel"),
    ("x median", "ratio_to_median"),
    ("tokens", "tokens_seen"),
    ("super", "is_super"),
)
HIDDEN_COLUMNS = (
    ("layer", "layer"),
    ("max |h|", "max_abs"),
    ("median |h|", "median_abs"),
    ("x median", "ratio_to_median"),
    ("channel", "channel"),
    ("seq", "seq_id"),
    ("pos", "pos"),
    ("massive", "is_massive"),
)


def add_super_experts_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="local model folder or hub id (default: the bundled model)")
    parser.add_argument(
        "--data", help="text file, folder of .txt, or JSONL with a text field (default: bundled corpus)"
    )
    parser.add_argument("--out", help="run directory to write expert_activations and hidden_stats into")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text")
    parser.add_argument("--max-texts", type=int, default=64, help="calibration texts, spread over the corpus")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per text (truncation)")
    parser.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE, help="percentile threshold")
    parser.add_argument("--ratio", type=float, default=DEFAULT_RATIO, help="fraction of the largest maximum")
    parser.add_argument(
        "--layers", type=int, nargs="+", help="decoder layers a Super Expert may be in (default: first 75%%)"
    )
    parser.add_argument("--top", type=int, default=10, help="experts to list")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto")


def _check(args: argparse.Namespace) -> None:
    for name in ("max_texts", "batch_size", "max_length", "top"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.quantile <= 100:
        raise ValueError("--quantile must be in (0, 100]")
    if not 0 <= args.ratio <= 1:
        raise ValueError("--ratio must be in [0, 1]")


def calibration_texts(records: list[TextRecord], max_texts: int) -> list[str]:
    """At most `max_texts` texts taken evenly across the corpus (so every domain is in)."""
    texts = [r.text for r in records if r.text.strip()]
    step = max(1, math.ceil(len(texts) / max_texts))
    return texts[::step][:max_texts]


def super_experts_command(args: argparse.Namespace) -> int:
    """Find Super Experts and massive activations with a calibration pass (optionally into a run)."""
    from routescope.capture.calibration.activations import calibrate

    _check(args)
    records = read_texts(args.data or bundled_corpus(), args.text_field, [])
    model, tokenizer = load_model(args.model or bundled_model(), args.device, args.dtype)
    texts = calibration_texts(records, args.max_texts)
    batches = [texts[i : i + args.batch_size] for i in range(0, len(texts), args.batch_size)]
    result = calibrate(
        model,
        batches,
        tokenizer=tokenizer,
        quantile=args.quantile,
        ratio=args.ratio,
        layers=args.layers,
        out=args.out,
        max_length=args.max_length,
    )
    print_calibration(result, top=args.top)
    if args.out:
        print(f"wrote expert_activations and hidden_stats to {args.out}")
    return 0


def expert_label(expert: int, shared: bool) -> str:
    """'3' for routed expert 3, 'shared' (or 'shared 1', ...) for a shared expert."""
    if shared:
        return f"shared {expert}" if expert else "shared"
    return str(expert)


def _cell(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else ""
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _table(title: str, df: pd.DataFrame, columns: tuple[tuple[str, str], ...], highlight: str) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for header, _ in columns:
        table.add_column(header, justify="right")
    for row in df.itertuples(index=False):
        values = row._asdict()
        style = "bold red" if values.get(highlight) else None
        table.add_row(*(_cell(values[key]) for _, key in columns), style=style)
    return table


def print_calibration(result: Calibration, top: int = 10) -> None:
    """Rich tables: the top experts by max |down_proj output|, and the per-layer hidden statistics."""
    from rich.console import Console

    console = Console()
    t = result.thresholds
    experts = result.experts.head(top).copy()
    experts["expert"] = [expert_label(e, s) for e, s in zip(experts["expert"], experts["shared"])]
    console.print(
        _table(
            f"Top experts by max |down_proj output| ({result.tokens} tokens, {result.batches} batches)",
            experts,
            EXPERT_COLUMNS,
            "is_super",
        )
    )
    found = result.experts[result.experts["is_super"]]
    listing = ", ".join(
        f"layer {r.layer} {'' if r.shared else 'expert '}{expert_label(r.expert, r.shared)}"
        for r in found.itertuples()
    )
    console.print(
        f"Super Experts: {len(found)} ({listing or 'none'}); thresholds: > {_cell(t['percentile_threshold'])} "
        f"(p{t['quantile']:g}) and > {_cell(t['max_threshold'])} ({t['ratio']:g} x max), "
        f"layers {t['layers'][0] if t['layers'] else '-'}..{t['layers'][-1] if t['layers'] else '-'}"
    )
    title = "Residual stream per decoder layer (massive: |h| > 100 and > 1000 x median)"
    console.print(_table(title, result.hidden, HIDDEN_COLUMNS, "is_massive"))
    massive = [str(v) for v in result.hidden.loc[result.hidden["is_massive"], "layer"]]
    console.print(
        f"Massive activations in {len(massive)} layer(s)" + (f": {', '.join(massive)}" if massive else "")
    )

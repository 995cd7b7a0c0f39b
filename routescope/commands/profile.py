"""`routescope profile` and `routescope demo`: record a model on a corpus, batch by batch.

`profile_corpus` is the library function behind both; the CLI (`routescope/cli.py`)
registers the argument builders and command functions defined here, and chains `demo`'s
recording (`record_demo`) with its own `report` and `dashboard` commands, so nothing here
imports the CLI back. torch loads inside the functions that run a model: building the
parser for `routescope report` must not import it.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

import routescope as rs
from routescope.commands.inputs import TextRecord, bundled_corpus, bundled_model, read_texts
from routescope.store.manifest import MANIFEST_NAME
from routescope.store.rundir import RunDirectory, RunExistsError

# --dtype choices: "auto" (the checkpoint's dtype) or a torch dtype, by name.
DTYPES = {"auto": "auto", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def load_model(name: str | Path, device: str = "cpu", dtype: str = "auto") -> tuple[Any, Any]:
    """A causal LM and its tokenizer from a local folder, or a hub id where a hub is reachable."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = str(name)
    local = Path(text).expanduser()
    if not local.exists() and (text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text):
        raise FileNotFoundError(f"model path {text} does not exist")
    if (local / MANIFEST_NAME).is_file():
        raise ValueError(
            f"--model {text} is a routescope run directory, not a model: pass a model folder or hub id "
            f"(read the run with `routescope report {text}`)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(text)
        torch_dtype = "auto" if DTYPES[dtype] == "auto" else getattr(torch, DTYPES[dtype])
        model = AutoModelForCausalLM.from_pretrained(text, dtype=torch_dtype)
    except OSError as exc:
        raise ValueError(f"could not load model {text!r}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model.to(device).eval(), tokenizer


def batches(records: list[TextRecord], batch_size: int) -> Iterator[tuple[dict[str, str], list[str]]]:
    """Consecutive records with the same labels, batch_size at a time (labels apply per forward)."""
    for labels, group in groupby(records, key=lambda r: tuple(sorted(r.labels.items()))):
        texts = [r.text for r in group]
        for i in range(0, len(texts), batch_size):
            yield dict(labels), texts[i : i + batch_size]


@dataclass(frozen=True)
class Profiled:
    """What one `profile_corpus` call did: the run, the tokens it recorded (prompt and
    generated) and the run's total afterwards (larger with --append), and the batches run."""

    out: Path
    recorded: int
    run_total: int
    batches: int
    planned: int


def cut_to_budget(enc: dict[str, Any], budget: int, tokenizer: Any) -> dict[str, Any]:
    """The first `budget` prompt tokens of a tokenized batch: whole rows while they fit, then
    the first tokens of the next row (re-padded on the tokenizer's side); later rows dropped."""
    rows = []
    for ids, mask in zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist(), strict=True):
        if budget <= 0:
            break
        kept = [t for t, m in zip(ids, mask, strict=True) if m][:budget]
        rows.append(kept)
        budget -= len(kept)
    return dict(tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt"))


def profile_corpus(
    model: Any,
    tokenizer: Any,
    records: list[TextRecord],
    out: str | Path,
    *,
    batch_size: int = 8,
    max_length: int = 256,
    max_tokens: int | None = None,
    generate: int = 0,
    overwrite: bool = False,
    append: bool = False,
    router_stats: bool = True,
    progress: bool = True,
    wait: bool | float = False,
    flush_seconds: float = 10.0,
) -> Profiled:
    """Record `model` on `records` into `out`.

    `max_tokens`: record at most that many prompt tokens: the batch that reaches the limit is
    cut (whole rows, then the first tokens of one row), so exactly `max_tokens` prompt tokens
    are recorded when the corpus has them; with `generate`, generated tokens come on top."""
    import torch

    device = next(model.parameters()).device
    if generate:
        tokenizer.padding_side = "left"  # decoder-only generation continues from the last column
    planned = list(batches(records, batch_size))
    seen = done = 0
    mode = "overwrite" if overwrite else "append" if append else "create"
    record = rs.record(
        model, out, router_stats=router_stats, mode=mode, wait=wait, flush_seconds=flush_seconds
    )
    with record as rec, torch.no_grad():
        before = rec.tokens  # the run's tokens when this command took the lock (append)
        bar = tqdm(planned, desc="recording", unit="batch", disable=not progress)
        for labels, texts in bar:
            if labels:
                rec.set_labels(**labels)
            enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            size = int(enc["attention_mask"].sum())
            cut = bool(max_tokens) and seen + size > max_tokens
            if cut:
                enc = cut_to_budget(enc, max_tokens - seen, tokenizer)
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            if generate:
                model.generate(
                    **enc, max_new_tokens=generate, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
            else:
                model(**enc)
            taken = int(enc["attention_mask"].sum())
            seen += taken
            done += 1
            bar.set_postfix_str(f"prompt tokens={seen:,}")
            if max_tokens and seen >= max_tokens:
                left = len(planned) - done  # counted here: tqdm's bar.n lags until it redraws
                if left > 0 or cut:
                    how = f"the last batch cut to {taken:,} of its {size:,} prompt tokens; " if cut else ""
                    bar.write(f"--max-tokens {max_tokens:,} reached: {how}{left} batches not recorded")
                break
        bar.close()
    total = rec.tokens
    return Profiled(Path(out), total - before, total, done, len(planned))


def balanced(records: list[TextRecord], label: str, per_value: int) -> list[TextRecord]:
    """The first `per_value` records of each value of `label`, in corpus order."""
    taken: dict[str | None, int] = {}
    chosen = []
    for record in records:
        value = record.labels.get(label)
        if taken.get(value, 0) < per_value:
            taken[value] = taken.get(value, 0) + 1
            chosen.append(record)
    return chosen


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="local model folder or hub id (default: the bundled model)")
    parser.add_argument(
        "--data", help="text file, folder, or JSONL with a text field (default: bundled corpus)"
    )
    parser.add_argument("--out", required=True, help="run directory to write")
    _add_common(parser)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text")
    parser.add_argument("--labels", nargs="*", help="JSONL fields to record as labels (default: all others)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per sequence (truncation)")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        metavar="T",
        help="record at most T prompt tokens: the batch that reaches T is cut (whole rows, then the first "
        "tokens of one row), so exactly T are recorded when the data has them (--generate adds its tokens)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto")
    parser.add_argument(
        "--generate", type=int, default=0, metavar="N", help="generate N new tokens per prompt"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run at --out")
    parser.add_argument("--append", action="store_true", help="add to an existing run at --out")
    add_wait_argument(parser)
    parser.add_argument(
        "--flush-seconds",
        type=float,
        default=10.0,
        metavar="S",
        help="write a part at least every S seconds (default 10): what `report --follow` and the "
        "dashboard of the live run can see",
    )
    parser.add_argument("--no-router-stats", action="store_true", help="skip router_stats / router_tokens")


def _check(args: argparse.Namespace) -> None:
    for name in ("batch_size", "max_length"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError("--max-tokens must be at least 1")
    if getattr(args, "flush_seconds", 1.0) <= 0:
        raise ValueError("--flush-seconds must be more than 0")
    if args.generate < 0:
        raise ValueError("--generate must be 0 or more")
    if args.overwrite and getattr(args, "append", False):
        raise ValueError("--overwrite and --append exclude each other: pick one")


def check_out(out: str | Path, overwrite: bool, append: bool) -> None:
    """Refuse an --out that already holds a run before any model is loaded (what rs.record would say later)."""
    run_dir = RunDirectory(out)
    if not (overwrite or append) and ((Path(out) / MANIFEST_NAME).exists() or run_dir.own_parts_exist()):
        raise RunExistsError(f"--out {out} already holds a routescope run; pass --overwrite or --append")


def add_wait_argument(parser: argparse.ArgumentParser) -> None:
    """--wait [SECONDS] for the commands that write a run (store/lock.py: one writer at a time)."""
    parser.add_argument(
        "--wait",
        nargs="?",
        type=float,
        const=-1.0,
        metavar="SECONDS",
        help="another writer holds the run: wait for it (as long as it takes, or SECONDS) "
        "instead of failing at once",
    )


def wait_option(value: float | None) -> bool | float:
    """--wait: absent -> fail at once, bare -> wait as long as it takes, SECONDS -> that long."""
    if value is None:
        return False
    if value == -1.0:
        return True
    if value < 0:
        raise ValueError("--wait takes a number of seconds >= 0 (or nothing: wait as long as it takes)")
    return value


def profile_command(args: argparse.Namespace) -> int:
    """Record a model on text files, a folder or JSONL into a run directory."""
    _check(args)
    check_out(args.out, args.overwrite, args.append)
    records = read_texts(args.data or bundled_corpus(), args.text_field, args.labels)
    model, tokenizer = load_model(args.model or bundled_model(), args.device, args.dtype)
    result = profile_corpus(
        model,
        tokenizer,
        records,
        args.out,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_tokens=args.max_tokens,
        generate=args.generate,
        overwrite=args.overwrite,
        append=args.append,
        router_stats=not args.no_router_stats,
        wait=wait_option(args.wait),
        flush_seconds=args.flush_seconds,
    )
    held = f" (the run now holds {result.run_total})" if args.append else ""
    print(f"recorded {result.recorded} tokens into {result.out}{held}")
    return 0


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="run directory (replaced if present)")
    parser.add_argument("--per-domain", type=int, default=48, help="records of each domain to record")
    parser.add_argument("--no-dashboard", action="store_true", help="print the report and stop")
    parser.add_argument("--no-super-experts", action="store_true", help="skip the Super Expert calibration")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8050)


def record_demo(args: argparse.Namespace) -> Path:
    """`demo`'s recording: the bundled model on the bundled corpus (+ Super Experts) into args.out."""
    if args.per_domain < 1:
        raise ValueError("--per-domain must be at least 1")
    records = balanced(read_texts(bundled_corpus()), "domain", args.per_domain)
    model, tokenizer = load_model(bundled_model())
    out = Path(args.out)
    if out.exists() and (out / "manifest.json").exists():
        shutil.rmtree(out)
    profile_corpus(model, tokenizer, records, out, batch_size=8, max_length=128)
    if not args.no_super_experts and hasattr(rs, "find_super_experts"):
        texts = [r.text for r in records[::10]][:32]
        rs.find_super_experts(model, texts, tokenizer=tokenizer, out=out)
    return out

"""Reading Megatron-Core router traces: `router_trace_rank{r}.jsonl`, one file per global rank.

The format is the one `megatron/core/transformer/moe/router_trace.py` (NVIDIA/Megatron-LM
PR #5220, merged as c1560d94) writes: one `json.dumps` line per (step, block, layer) router
call, keys `step`, `stage`, `block`, `layer`, `rank`, `num_tokens`, `topk`, [`mtp_idx`],
[`hs_offset`, `hs_bytes`, `hs_shape`], [`logit_offset`, `logit_bytes`, `logit_shape`],
`top_indices`. Every check here names the file and the line; with `skip_corrupt` a bad
record is skipped and counted instead (`Skips`).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from routescope.importers.core.errors import ImportFormatError

TRACE_GLOB = "router_trace_rank*.jsonl"
_TRACE_NAME = re.compile(r"router_trace_rank(\d+)\.jsonl$")
BLOCKS = ("decoder", "mtp")
MAX_EXPERT_ID = np.iinfo(np.int16).max  # routing.expert is SMALLINT
SKIP_HINT = "pass --skip-corrupt to skip such records and count them"
LayerKey = tuple[str, int | None, int]  # (block, mtp_idx, layer) as Megatron keys a router


@dataclass
class TraceRecord:
    """One router call of one rank: its [num_tokens, topk] expert ids and where its logits lie."""

    path: Path
    line: int
    rank: int
    step: int
    block: str
    mtp_idx: int | None
    layer: int
    top: np.ndarray  # [num_tokens, topk] int64, columns as written
    logits_at: tuple[int, int, list[int]] | None = None  # (offset, bytes, shape) in logits_rank{r}.bin

    @property
    def key(self) -> LayerKey:
        return (self.block, self.mtp_idx, self.layer)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class Skips:
    """What `--skip-corrupt` skipped: counts per reason and the first few places."""

    skip_corrupt: bool
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def bad(self, where: str, reason: str, message: str) -> None:
        """Raise ImportFormatError for `message`, or (skip_corrupt) count it under `reason`."""
        if not self.skip_corrupt:
            raise ImportFormatError(f"{where}: {message}; {SKIP_HINT}")
        self.counts[reason] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{where}: {message}")

    def as_dict(self) -> dict[str, Any]:
        return {"counts": dict(sorted(self.counts.items())), "examples": list(self.examples)}


def find_trace_files(trace_dir: Path, skips: Skips) -> dict[int, Path]:
    """rank -> trace file; a gap in the ranks is a missing rank (an error unless skip_corrupt)."""
    if not trace_dir.exists():
        raise FileNotFoundError(
            f"{trace_dir} does not exist; expected the --moe-routing-trace-path directory"
        )
    if not trace_dir.is_dir():
        raise ImportFormatError(
            f"{trace_dir} is a file; give the directory Megatron wrote (--moe-routing-trace-path), "
            "which holds router_trace_rank{r}.jsonl"
        )
    files = {}
    for path in sorted(trace_dir.glob(TRACE_GLOB)):
        found = _TRACE_NAME.search(path.name)
        if found:
            files[int(found.group(1))] = path
    if not files:
        raise ImportFormatError(
            f"{trace_dir} holds no router_trace_rank{{r}}.jsonl; run Megatron with --moe-routing-trace-path"
        )
    for rank in range(max(files) + 1):
        if rank not in files:
            skips.bad(
                str(trace_dir / f"router_trace_rank{rank}.jsonl"),
                "missing_rank",
                f"missing: ranks {sorted(files)} have trace files but rank {rank} has none",
            )
    return files


def read_trace_file(path: Path, rank: int, skips: Skips) -> list[TraceRecord]:
    """Every valid record of one rank's trace file, in file order."""
    records: list[TraceRecord] = []
    size = path.stat().st_size
    with (
        open(path, "rb") as handle,
        tqdm(total=size, unit="B", unit_scale=True, desc=f"rank {rank}", leave=False, disable=None) as bar,
    ):
        for number, raw in enumerate(handle, start=1):
            bar.update(len(raw))
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(raw)
            except ValueError as exc:
                if not raw.endswith(b"\n"):
                    skips.bad(
                        where, "truncated_line", "the last line is cut off (the job was killed while writing)"
                    )
                else:
                    skips.bad(where, "bad_json", f"not a JSON object ({exc.msg} at column {exc.colno})")
                continue
            record = _record(obj, path, number, rank, skips)
            if record is not None:
                records.append(record)
    return records


def _int(obj: dict[str, Any], key: str) -> int | None:
    value = obj.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _record(obj: Any, path: Path, line: int, rank: int, skips: Skips) -> TraceRecord | None:
    where = f"{path}:{line}"
    if not isinstance(obj, dict):
        skips.bad(where, "bad_record", "not a JSON object")
        return None
    missing = [key for key in ("step", "layer", "rank", "num_tokens", "topk") if _int(obj, key) is None]
    if missing or "top_indices" not in obj:
        missing += [] if "top_indices" in obj else ["top_indices"]
        skips.bad(
            where,
            "bad_record",
            f"missing or non-integer {', '.join(missing)} (not a Megatron router trace record)",
        )
        return None
    if obj["rank"] != rank:
        skips.bad(where, "bad_record", f"rank {obj['rank']} in a file named for rank {rank}")
        return None
    block = obj.get("block", "decoder")
    mtp_idx = _int(obj, "mtp_idx")
    if block not in BLOCKS or (block == "mtp") != (mtp_idx is not None):
        skips.bad(
            where,
            "bad_record",
            f"block {block!r} with mtp_idx {obj.get('mtp_idx')!r}; expected decoder, or mtp with mtp_idx",
        )
        return None
    if obj.get("stage", "pre_dispatch") != "pre_dispatch":
        skips.bad(where, "bad_record", f"stage {obj.get('stage')!r}; only 'pre_dispatch' records are known")
        return None
    n, k = obj["num_tokens"], obj["topk"]
    try:
        top = np.asarray(obj["top_indices"], dtype=np.int64)
    except (ValueError, TypeError, OverflowError):
        top = None
    if top is None or (top.shape != (n, k) and not (n == 0 and top.size == 0)):
        shape = "ragged rows" if top is None else f"shape {list(top.shape)}"
        skips.bad(where, "inconsistent_topk", f"top_indices has {shape}, but num_tokens {n} and topk {k}")
        return None
    top = top.reshape(n, k)
    if top.size and (top.min() < 0 or top.max() > MAX_EXPERT_ID):
        bad = int(top.min()) if top.min() < 0 else int(top.max())
        skips.bad(where, "bad_expert_id", f"expert id {bad} is not in 0..{MAX_EXPERT_ID}")
        return None
    top = top.astype(np.int16)  # the routing table's type; a quarter of the memory
    logits_at = None
    if "logit_offset" in obj:
        offset, nbytes, shape = obj.get("logit_offset"), obj.get("logit_bytes"), obj.get("logit_shape")
        if not (isinstance(offset, int) and isinstance(nbytes, int) and isinstance(shape, list)):
            skips.bad(
                where, "bad_logits", "logit_offset / logit_bytes / logit_shape are not integers and a list"
            )
            return None
        logits_at = (offset, nbytes, shape)
    return TraceRecord(path, line, rank, obj["step"], block, mtp_idx, obj["layer"], top, logits_at)


def check_topk(records: list[TraceRecord], skips: Skips) -> tuple[list[TraceRecord], dict[LayerKey, int]]:
    """Records whose topk agrees with the first record of their layer (over all ranks); topk per layer."""
    top_k: dict[LayerKey, int] = {}
    kept = []
    for record in records:
        k = record.top.shape[1]
        first = top_k.setdefault(record.key, k)
        if k != first:
            skips.bad(
                record.where,
                "inconsistent_topk",
                f"topk {k} for {describe(record.key)}, which earlier records route with topk {first}",
            )
            continue
        kept.append(record)
    return kept, top_k


def describe(key: LayerKey) -> str:
    block, mtp_idx, layer = key
    return f"decoder layer {layer}" if block == "decoder" else f"MTP {mtp_idx} layer {layer}"

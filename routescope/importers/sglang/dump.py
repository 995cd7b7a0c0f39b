"""Reading SGLang expert-distribution dumps: loading, mode detection, records, maps, rank copies.

Shared by the per-token importer (`importer.py`) and the count importer (`counts.py`).
Layouts follow sgl-project/sglang `python/sglang/srt/eplb/expert_distribution.py`
(`_DetailAccumulator.dump`, `_StatAccumulator.dump`), the older
`python/sglang/srt/managers/expert_distribution.py`, and the oldest CSV dump; see
docs/scale_out.md for the commits read.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from routescope.importers.core.errors import ImportFormatError
from routescope.importers.core.files import check_input_file, load_torch_file

EXPECTED = (
    "an SGLang expert-distribution dump: a torch.save'd dict with 'records' (per_token / per_pass mode; "
    "records hold 'topk_ids_of_layer' [num_layers, num_tokens, top_k] or 'global_physical_count' "
    "[num_layers, num_physical_experts]) or 'logical_count' ([passes,] num_layers, num_logical_experts; "
    "stat / stat_approx mode), or the oldest CSV dump with header layer_id,expert_id,count"
)
PRIMARY = "primary"  # sglang _SINGLE_PASS_GATHERER_KEY_PRIMARY; other keys are sub-batch / draft gatherers
CSV_HEADER = ["layer_id", "expert_id", "count"]
_CSV_RANK = re.compile(r"rank(\d+)")


@dataclass
class Dump:
    """One loaded file: its path, the parsed object and its detected mode."""

    path: Path
    data: Any
    mode: str


@dataclass
class Record:
    """One per-pass record of a `records` dump, with where it came from."""

    path: Path
    index: int
    fields: dict[str, Any]
    forward_pass_id: int
    rank: int
    mapping: np.ndarray | None


@dataclass
class Skipped:
    """Records left out on purpose, counted by reason for the manifest."""

    reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, reason: str) -> None:
        self.reasons[reason] += 1

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.reasons.items()))


def load_dumps(paths: list[str | Path]) -> list[Dump]:
    """Load every file and detect its mode; all files must share one mode."""
    if not paths:
        raise ValueError("no SGLang dump given: pass one .pt (or .csv) file per rank")
    dumps = []
    for raw in paths:
        path = check_input_file(raw, "an SGLang expert-distribution dump (.pt or .csv)")
        if path.suffix.lower() == ".csv":
            dumps.append(Dump(path, read_csv_counts(path), "csv"))
            continue
        data = load_torch_file(path, "an SGLang expert-distribution dump")
        dumps.append(Dump(path, data, detect_mode(data, path)))
    modes = sorted({d.mode for d in dumps})
    if len(modes) > 1:
        named = ", ".join(f"{d.path} ({d.mode})" for d in dumps)
        raise ImportFormatError(f"dumps mix recorder modes: {named}; import one mode at a time")
    return dumps


def detect_mode(data: Any, path: Path) -> str:
    """'per_token', 'per_pass' or 'stat' from the keys of a loaded dump."""
    if not isinstance(data, dict):
        raise ImportFormatError(f"{path}: holds a {type(data).__name__}; expected {EXPECTED}")
    if "logical_count" in data:
        return "stat"
    records = data.get("records")
    if isinstance(records, (list, tuple)):
        if not records:
            raise ImportFormatError(f"{path}: 'records' is empty: the recorder dumped no forward pass")
        for index, record in enumerate(records):
            if not isinstance(record, dict):
                raise ImportFormatError(
                    f"{path}: record {index} is a {type(record).__name__}; each record must be a dict "
                    "(SGLang _DetailAccumulator records)"
                )
        if any("topk_ids_of_layer" in r for r in records):
            return "per_token"
        if all("global_physical_count" in r for r in records):
            return "per_pass"
        raise ImportFormatError(
            f"{path}: records hold neither 'topk_ids_of_layer' (per_token) nor 'global_physical_count' "
            f"(per_pass); keys of record 0: {', '.join(map(repr, records[0])) or 'none'}"
        )
    keys = ", ".join(map(repr, data)) or "none"
    raise ImportFormatError(f"{path}: keys {keys}; expected {EXPECTED}")


def as_array(value: Any, path: Path, what: str) -> np.ndarray:
    """A tensor / list / array as an integer NumPy array; anything else is refused by name."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except ValueError as exc:
        raise ImportFormatError(f"{path}: {what} is ragged ({exc})") from None
    if array.dtype == object or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise ImportFormatError(f"{path}: {what} has dtype {array.dtype}; expected integers")
    return array.astype(np.int64)


def physical_map(data: dict[str, Any], path: Path, num_layers: int) -> np.ndarray | None:
    """`last_physical_to_logical_map` [num_layers, num_physical] of a records dump, checked."""
    mapping = data.get("last_physical_to_logical_map")
    if mapping is None:
        return None
    mapping = as_array(mapping, path, "last_physical_to_logical_map")
    if mapping.ndim != 2 or mapping.shape[0] != num_layers:
        raise ImportFormatError(
            f"{path}: last_physical_to_logical_map has shape {tuple(mapping.shape)}; expected "
            f"[num_layers={num_layers}, num_physical_experts]"
        )
    if mapping.size and mapping.min() < 0:
        raise ImportFormatError(f"{path}: last_physical_to_logical_map holds a negative expert id")
    return mapping


def iter_records(dumps: list[Dump], skipped: Skipped) -> list[Record]:
    """Every primary-gatherer record of every dump, sorted by (forward_pass_id, rank)."""
    out = []
    for dump in dumps:
        records = dump.data["records"]
        for index, fields in enumerate(records):
            key = fields.get("gatherer_key", PRIMARY)
            if key != PRIMARY:
                skipped.add(f"gatherer_key {key}")
                continue
            fid = fields.get("forward_pass_id", index)
            rank = fields.get("rank", 0)
            if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (fid, rank)):
                raise ImportFormatError(
                    f"{dump.path}: record {index} has forward_pass_id {fid!r} and rank {rank!r}; expected integers"
                )
            out.append(Record(dump.path, index, fields, int(fid), int(rank), None))
    out.sort(key=lambda r: (r.forward_pass_id, r.rank))
    seen: dict[tuple[int, int], Record] = {}
    for record in out:
        key = (record.forward_pass_id, record.rank)
        if key in seen:
            first = seen[key]
            raise ImportFormatError(
                f"{record.path}: record {record.index} repeats forward_pass_id {key[0]} of rank {key[1]} "
                f"(already in {first.path}, record {first.index}); pass each rank's dump once"
            )
        seen[key] = record
    return out


def collapse_rank_copies(
    by_pass: dict[int, list[tuple[int, bytes, Any]]], tp_size: int | None, source: str
) -> tuple[dict[int, list[Any]], int]:
    """Per pass, the items to keep once ranks that saw the same tokens are collapsed.

    `by_pass` maps forward_pass_id to (rank, content key, item). With plain tensor
    parallelism every rank records the same tokens, and summing them would multiply
    every count by the number of ranks. `tp_size` None (auto): when, in every pass with
    more than one rank, all ranks hold identical content, keep one copy; otherwise keep
    all (data-parallel ranks see different tokens). 1: keep all. N > 1: every distinct
    content must appear exactly N times in each pass, and one copy of each is kept.
    Returns the kept items per pass and the number of copies collapsed into one.
    """
    multi = {fid: items for fid, items in by_pass.items() if len(items) > 1}
    if tp_size is None:
        identical = bool(multi) and all(len({key for _, key, _ in items}) == 1 for items in multi.values())
        copies = max(len(items) for items in multi.values()) if identical else 1
        if not identical:
            return {fid: [item for *_, item in items] for fid, items in by_pass.items()}, 1
        return {fid: [items[0][2]] for fid, items in by_pass.items()}, copies
    if tp_size == 1:
        return {fid: [item for *_, item in items] for fid, items in by_pass.items()}, 1
    kept: dict[int, list[Any]] = {}
    for fid, items in by_pass.items():
        groups: dict[bytes, list[Any]] = {}
        for _, key, item in items:
            groups.setdefault(key, []).append(item)
        sizes = sorted({len(g) for g in groups.values()})
        if sizes != [tp_size]:
            raise ImportFormatError(
                f"{source}: forward pass {fid}: --tp-size {tp_size} expects each rank's data to appear "
                f"{tp_size} times, found copy counts {sizes}; check the files and the tensor-parallel size"
            )
        kept[fid] = [g[0] for g in groups.values()]
    return kept, tp_size


def content_key(*arrays: Any) -> bytes:
    """A byte string equal for equal arrays (shape and values), for comparing ranks."""
    parts = []
    for array in arrays:
        array = np.asarray(array if array is not None else [], dtype=np.int64)
        parts.append(repr(array.shape).encode() + array.tobytes())
    return b"|".join(parts)


def read_csv_counts(path: Path) -> dict[str, Any]:
    """The oldest SGLang dump (`expert_distribution_rank{R}_timestamp{T}.csv`): per-layer expert counts."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ImportFormatError(f"{path}: not a UTF-8 text file; expected {EXPECTED}") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows or [c.strip() for c in rows[0]] != CSV_HEADER:
        head = ",".join(rows[0]) if rows else ""
        raise ImportFormatError(
            f"{path}: CSV header is {head[:80]!r}; expected 'layer_id,expert_id,count' (SGLang's oldest dump)"
        )
    entries = []
    for line, row in enumerate(rows[1:], start=2):
        try:
            layer, expert, count = (int(c) for c in row)
        except ValueError:
            raise ImportFormatError(
                f"{path}: line {line} is {','.join(row)[:80]!r}; expected three integers layer_id,expert_id,count"
            ) from None
        if layer < 0 or expert < 0 or count < 0:
            raise ImportFormatError(f"{path}: line {line} has a negative value; ids and counts must be >= 0")
        entries.append((layer, expert, count))
    if not entries:
        raise ImportFormatError(f"{path}: the CSV has a header but no counts")
    found = _CSV_RANK.search(path.name)
    return {"entries": entries, "rank": int(found.group(1)) if found else None}

"""SGLang count dumps (per_pass, stat / stat_approx, the oldest CSV) -> counts-only ImportedRun.

Called by `import_sglang` (sglang.py) once the files are loaded. per_pass records of all
ranks are summed per `forward_pass_id`, as SGLang's own
`python/sglang/srt/eplb/eplb_simulator/reader.py` (`read_mode_per_pass`) does.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from routescope.importers.core.tables import ImportedRun, ImportFormatError, counts_to_table
from routescope.importers.sglang.dump import (
    Dump,
    Skipped,
    as_array,
    collapse_rank_copies,
    content_key,
    iter_records,
    physical_map,
)


def import_counts(
    dumps: list[Dump], mode: str, top_k: int, num_experts: int | None, tp_size: int | None
) -> ImportedRun:
    """Counts [passes, layers, logical experts] from the dumps, written as expert_counts."""
    skipped = Skipped()
    extra: dict = {}
    if mode == "per_pass":
        counts, copies = _per_pass(dumps, skipped, tp_size)
        extra["skipped_records"] = skipped.as_dict()
    elif mode == "csv":
        counts, copies = _csv(dumps, tp_size)
    else:
        counts, copies, order = _stat(dumps, tp_size)
        extra["step_order"] = order
    extra["rank_copies_collapsed"] = copies
    source = ", ".join(str(d.path) for d in dumps)
    num_layers, width = counts.shape[1:]
    layers = [int(layer) for layer in np.flatnonzero(counts.sum(axis=(0, 2)) > 0)]
    if not layers:
        raise ImportFormatError(
            f"{source}: every count is zero, so no MoE layer was routed; nothing to import"
        )
    experts = num_experts or width
    if experts < width and counts[:, :, experts:].any():
        used = int(np.flatnonzero(counts.sum(axis=(0, 1)))[-1])
        raise ValueError(f"--num-experts {experts} is too small: {source} counts expert id {used}")
    if experts > width:
        counts = np.concatenate(
            [counts, np.zeros((*counts.shape[:2], experts - width), counts.dtype)], axis=2
        )
    table = counts_to_table(counts[:, layers, :experts], layers)
    return ImportedRun(
        engine="sglang",
        mode=mode,
        num_hidden_layers=num_layers,
        num_experts={layer: experts for layer in layers},
        top_k={layer: int(top_k) for layer in layers},
        expert_counts=table,
        extra={"forward_passes": len(counts), **extra},
    )


def _per_pass(dumps: list[Dump], skipped: Skipped, tp_size: int | None) -> tuple[np.ndarray, int]:
    by_pass: dict[int, list] = defaultdict(list)
    shape = None
    for record in iter_records(dumps, skipped):
        counts = as_array(
            record.fields["global_physical_count"],
            record.path,
            f"record {record.index}: global_physical_count",
        )
        if counts.ndim != 2:
            raise ImportFormatError(
                f"{record.path}: record {record.index}: global_physical_count has shape {tuple(counts.shape)}; "
                "expected [num_layers, num_physical_experts] (SGLang per_pass mode)"
            )
        if counts.size and counts.min() < 0:
            raise ImportFormatError(
                f"{record.path}: record {record.index}: global_physical_count is negative"
            )
        data = next(d.data for d in dumps if d.path == record.path)
        logical = _to_logical(
            counts, physical_map(data, record.path, counts.shape[0]), record.path, record.index
        )
        if shape is not None and logical.shape != shape:
            raise ImportFormatError(
                f"{record.path}: record {record.index} counts {logical.shape} [layers, experts], earlier records {shape}"
            )
        shape = logical.shape
        by_pass[record.forward_pass_id].append((record.rank, content_key(logical), logical))
    if shape is None:
        raise ImportFormatError(f"no primary records in {', '.join(str(d.path) for d in dumps)}")
    kept, copies = collapse_rank_copies(by_pass, tp_size, ", ".join(str(d.path) for d in dumps))
    return np.stack([np.sum(kept[fid], axis=0) for fid in sorted(kept)]), copies


def _to_logical(counts: np.ndarray, mapping: np.ndarray | None, path: Path, index: int) -> np.ndarray:
    if mapping is None:
        return counts
    if mapping.shape != counts.shape:
        raise ImportFormatError(
            f"{path}: record {index}: global_physical_count has shape {tuple(counts.shape)} but "
            f"last_physical_to_logical_map has {tuple(mapping.shape)}; they must match [num_layers, num_physical]"
        )
    logical = np.zeros((counts.shape[0], int(mapping.max()) + 1), dtype=np.int64)
    for layer in range(counts.shape[0]):
        np.add.at(logical[layer], mapping[layer], counts[layer])
    return logical


def _stat(dumps: list[Dump], tp_size: int | None) -> tuple[np.ndarray, int, str]:
    """logical_count [buffer, layers, experts]: all-reduced over ranks by SGLang before the dump."""
    blocks, keys = [], []
    for dump in dumps:
        counts = as_array(dump.data["logical_count"], dump.path, "logical_count")
        if counts.ndim == 2:
            counts = counts[None]
        if counts.ndim != 3:
            raise ImportFormatError(
                f"{dump.path}: logical_count has shape {tuple(counts.shape)}; expected [passes, num_layers, "
                "num_logical_experts] or [num_layers, num_logical_experts] (SGLang stat mode)"
            )
        if counts.size and counts.min() < 0:
            raise ImportFormatError(f"{dump.path}: logical_count holds a negative count")
        key = content_key(counts)
        if key in keys:  # every rank returns the same all-reduced tensor: keep it once
            continue
        keys.append(key)
        blocks.append(counts)
    shapes = sorted({b.shape[1:] for b in blocks})
    if len(shapes) != 1:
        raise ImportFormatError(f"dumps disagree on [num_layers, num_experts]: {shapes}")
    copies = len(dumps) - len(blocks) + 1 if len(blocks) == 1 else 1
    full = any(b.reshape(len(b), -1).sum(axis=1).all() and len(b) > 1 for b in blocks)
    counts = np.concatenate(blocks)
    counts = counts[counts.reshape(len(counts), -1).sum(axis=1) > 0]  # unused circular-buffer slots
    if tp_size and tp_size > 1:
        if (counts % tp_size).any():
            raise ImportFormatError(
                f"{dumps[0].path}: --tp-size {tp_size}: the counts are not multiples of {tp_size}, "
                "so they are not tensor-parallel copies of the same tokens"
            )
        counts = counts // tp_size
    order = (
        "buffer slot: the circular buffer was full, and the dump has no pass ids, so time order is unknown"
        if full
        else "time"
    )
    return counts, max(copies, tp_size or 1), order


def _csv(dumps: list[Dump], tp_size: int | None) -> tuple[np.ndarray, int]:
    """Oldest layout: one cumulative count per (layer, expert) per rank file -> one step."""
    num_layers = 1 + max(layer for d in dumps for layer, _, _ in d.data["entries"])
    width = 1 + max(expert for d in dumps for _, expert, _ in d.data["entries"])
    by_pass: dict[int, list] = {0: []}
    for index, dump in enumerate(dumps):
        counts = np.zeros((num_layers, width), dtype=np.int64)
        for layer, expert, count in dump.data["entries"]:
            counts[layer, expert] += count
        rank = dump.data["rank"] if dump.data["rank"] is not None else index
        by_pass[0].append((rank, content_key(counts), counts))
    kept, copies = collapse_rank_copies(by_pass, tp_size, ", ".join(str(d.path) for d in dumps))
    return np.sum(kept[0], axis=0)[None], copies

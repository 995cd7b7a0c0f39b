"""Import SGLang expert-distribution-recorder dumps into a run directory.

`import_sglang` loads the files (`dump.py`), then converts per-token dumps here
(tokens + routing) and count dumps in `counts.py` (counts-only runs). The layouts
follow sgl-project/sglang `python/sglang/srt/eplb/expert_distribution.py` (older releases:
`python/sglang/srt/managers/expert_distribution.py`); docs/scale_out.md cites the commits
and lists every conversion rule.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from routescope import schema
from routescope.importers.core.tables import ImportedRun, ImportFormatError, sequences_to_tables
from routescope.importers.sglang.counts import import_counts
from routescope.importers.sglang.dump import (
    Record,
    Skipped,
    as_array,
    collapse_rank_copies,
    content_key,
    iter_records,
    load_dumps,
    physical_map,
)

# sglang ForwardMode (python/sglang/srt/model_executor/forward_batch_info.py, IntEnum from 1):
# what each pass's tokens are. MIXED holds extend requests followed by the running decode
# requests, one token each (ScheduleBatch.mix_with_running). Speculative passes are skipped:
# TARGET_VERIFY routes draft tokens that may be rejected, DRAFT_EXTEND is the draft model.
FORWARD_MODES: dict[int, tuple[str, str]] = {
    1: ("EXTEND", "prefill"),
    2: ("DECODE", "decode"),
    3: ("MIXED", "mixed"),
    4: ("IDLE", "skip"),
    5: ("TARGET_VERIFY", "skip"),
    6: ("DRAFT_EXTEND", "skip"),
    8: ("SPLIT_PREFILL", "prefill"),
}


def import_sglang(
    paths: list[str | Path],
    top_k: int | None = None,
    num_experts: int | None = None,
    tp_size: int | None = None,
) -> ImportedRun:
    """Parse dumps of one recorder mode (e.g. one file per rank) into an ImportedRun.

    `tp_size`: how many ranks saw the same tokens (plain tensor parallelism); None detects
    identical rank data in record dumps (see `dump.collapse_rank_copies`).
    """
    for name, value in (("--top-k", top_k), ("--num-experts", num_experts), ("--tp-size", tp_size)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    dumps = load_dumps(paths)
    mode = dumps[0].mode
    if mode == "per_token":
        return _per_token(dumps, num_experts, tp_size)
    if top_k is None:
        raise ValueError(
            f"SGLang {mode} dumps ({dumps[0].path}) hold counts only, not top-k: pass --top-k K (experts per token)"
        )
    return import_counts(dumps, mode, top_k, num_experts, tp_size)


def _per_token(dumps: list, num_experts: int | None, tp_size: int | None) -> ImportedRun:
    skipped = Skipped()
    records = iter_records(dumps, skipped)
    num_layers = None
    prepared: dict[int, list[tuple[int, bytes, tuple[Record, np.ndarray]]]] = defaultdict(list)
    maps: dict[Path, np.ndarray | None] = {}
    for record in records:
        ids = _topk_ids(record)
        if num_layers is None:
            num_layers = ids.shape[0]
        elif ids.shape[0] != num_layers:
            raise ImportFormatError(
                f"{record.path}: record {record.index} has {ids.shape[0]} layers, earlier records {num_layers}"
            )
        if record.path not in maps:
            data = next(d.data for d in dumps if d.path == record.path)
            maps[record.path] = physical_map(data, record.path, num_layers)
        record.mapping = maps[record.path]
        ids = _to_logical(_mask_inactive(ids, record), record)
        key = content_key(ids, record.fields.get("input_ids"), record.fields.get("positions"))
        prepared[record.forward_pass_id].append((record.rank, key, (record, ids)))
    if num_layers is None:
        raise ImportFormatError(f"no primary records in {', '.join(str(d.path) for d in dumps)}")
    kept, copies = collapse_rank_copies(prepared, tp_size, ", ".join(str(d.path) for d in dumps))
    step_of = {fid: step for step, fid in enumerate(sorted(kept))}

    builder = _SequenceBuilder()
    used = np.zeros(num_layers, dtype=bool)
    max_expert = -1
    for fid in sorted(kept):
        for record, ids in kept[fid]:
            name, action = _forward_mode(record)
            if action == "skip":
                skipped.add(f"forward_mode {name}")
                continue
            if ids.shape[1] == 0:
                continue
            used |= (ids >= 0).any(axis=(1, 2))
            max_expert = max(max_expert, int(ids.max()))
            builder.add(record, ids.transpose(1, 0, 2), step_of[fid], action)
    layers = [int(layer) for layer in np.flatnonzero(used)]
    if not layers:
        raise ImportFormatError(
            f"{', '.join(str(d.path) for d in dumps)}: no routed expert id in any imported record; nothing to import"
        )
    sequences = builder.sequences(layers)
    tokens, routing, top_k = sequences_to_tables(sequences, layers)
    experts = _num_experts(num_experts, maps, max_expert, dumps)
    return ImportedRun(
        engine="sglang",
        mode="per_token",
        num_hidden_layers=num_layers,
        num_experts={layer: experts for layer in layers},
        top_k=top_k,
        tokens=tokens,
        routing=routing,
        labels=["source_rank"],
        extra={
            "forward_passes": len(step_of),
            "rank_copies_collapsed": copies,
            "skipped_records": skipped.as_dict(),
            "duplicate_tokens_dropped": builder.duplicates,
            "sequence_ids": "rids" if builder.used_rids else "one per extend request / decode token",
        },
    )


def _topk_ids(record: Record) -> np.ndarray:
    ids = as_array(
        record.fields["topk_ids_of_layer"], record.path, f"record {record.index}: topk_ids_of_layer"
    )
    if ids.ndim != 3:
        raise ImportFormatError(
            f"{record.path}: record {record.index}: topk_ids_of_layer has shape {tuple(ids.shape)}; expected "
            "[num_layers, num_tokens, top_k] (SGLang per_token mode)"
        )
    if ids.size and ids.min() < -1:
        raise ImportFormatError(
            f"{record.path}: record {record.index}: topk_ids_of_layer holds {int(ids.min())}; "
            "expert ids are >= 0, with -1 for an unused slot"
        )
    return ids


def _mask_inactive(ids: np.ndarray, record: Record) -> np.ndarray:
    """Rows of layers outside `active_layer_indices` (when the record lists them) become -1."""
    active = record.fields.get("active_layer_indices")
    if active is None:
        return ids
    active = as_array(active, record.path, f"record {record.index}: active_layer_indices").reshape(-1)
    if active.size and (active.min() < 0 or active.max() >= ids.shape[0]):
        raise ImportFormatError(
            f"{record.path}: record {record.index}: active_layer_indices {active.tolist()} outside "
            f"0..{ids.shape[0] - 1}"
        )
    out = np.full_like(ids, -1)
    out[active] = ids[active]
    return out


def _to_logical(ids: np.ndarray, record: Record) -> np.ndarray:
    """Physical expert ids [L, T, K] -> logical ids through the dump's map; -1 stays -1."""
    mapping = record.mapping
    if mapping is None:
        return ids
    width = mapping.shape[1]
    if ids.size and ids.max() >= width:
        layer = int(np.argwhere(ids >= width)[0][0])
        raise ImportFormatError(
            f"{record.path}: record {record.index}: physical expert id {int(ids.max())} (layer {layer}) is beyond "
            f"last_physical_to_logical_map, which has {width} physical experts"
        )
    out = np.full(ids.shape, -1, dtype=np.int64)
    for layer in range(ids.shape[0]):
        valid = ids[layer] >= 0
        out[layer][valid] = mapping[layer][ids[layer][valid]]
    return out


def _forward_mode(record: Record) -> tuple[str, str]:
    mode = record.fields.get("forward_mode")
    if mode is None:
        return "unknown", "prefill"
    name, action = FORWARD_MODES.get(int(mode), (f"mode {int(mode)}", "skip"))
    return name, action


class _SequenceBuilder:
    """Splits each pass into sequences and gives them seq ids (one per SGLang rid when present)."""

    def __init__(self) -> None:
        self._chunks: list[dict[str, Any]] = []  # one per record: several sequences, seq_id per token
        self._rid_ids: dict[str, int] = {}
        self._next = 0
        self.duplicates = 0
        self.used_rids = False

    def add(self, record: Record, per_token: np.ndarray, step: int, action: str) -> None:
        tokens = per_token.shape[0]
        fields, path, index = record.fields, record.path, record.index
        token_ids = _optional(fields, "input_ids", tokens, path, index)
        positions = _optional(fields, "positions", tokens, path, index)
        segments = _segments(fields, tokens, action, path, index)
        rids = fields.get("rids")
        if rids is not None:
            rids = [str(r) for r in rids]
            if len(rids) < len(segments):
                raise ImportFormatError(
                    f"{path}: record {index} has {len(rids)} rids for {len(segments)} requests"
                )
            self.used_rids = True
        lens = [stop - start for start, stop, _ in segments]
        seq_ids = [self._seq_id(rids[i] if rids is not None else None) for i in range(len(segments))]
        self._chunks.append(
            {
                "seq_id": np.repeat(np.asarray(seq_ids, dtype=np.int64), lens),
                "experts": per_token,
                "pos": positions if positions is not None else np.concatenate([np.arange(n) for n in lens]),
                "token_ids": token_ids if token_ids is not None else np.full(tokens, -1),
                "step": np.full(tokens, step),
                "phase": np.repeat(np.asarray([phase for *_, phase in segments], dtype=object), lens),
                "labels": {"source_rank": np.full(tokens, str(record.rank), dtype=object)},
            }
        )

    def _seq_id(self, rid: str | None) -> int:
        if rid is not None and rid in self._rid_ids:
            return self._rid_ids[rid]
        seq_id = self._next
        self._next += 1
        if rid is not None:
            self._rid_ids[rid] = seq_id
        return seq_id

    def sequences(self, layers: list[int]) -> list[dict[str, Any]]:
        """The chunks restricted to `layers`; a (seq_id, pos) already seen in an earlier pass is dropped."""
        if not self._chunks:
            return []
        keys = np.concatenate([(c["seq_id"] << 32) + c["pos"].astype(np.int64) for c in self._chunks])
        first = np.zeros(len(keys), dtype=bool)
        first[np.unique(keys, return_index=True)[1]] = True
        self.duplicates = int((~first).sum())
        out, offset = [], 0
        for chunk in self._chunks:
            n = len(chunk["pos"])
            keep = first[offset : offset + n]
            offset += n
            if not keep.any():
                continue
            trimmed = {k: v[keep] for k, v in chunk.items() if k not in ("labels", "experts")}
            trimmed["experts"] = chunk["experts"][keep][:, layers, :]
            trimmed["labels"] = {k: v[keep] for k, v in chunk["labels"].items()}
            out.append(trimmed)
        return out


def _segments(fields: dict, tokens: int, action: str, path: Path, index: int) -> list[tuple[int, int, str]]:
    """(start, stop, phase) of each request in a pass.

    Extend passes split by `extend_seq_lens`; decode passes are one token per request. In a
    MIXED pass the running decode requests follow the extend requests with one token each,
    so the trailing one-token requests are decode (an extend request of exactly one token
    placed last cannot be told apart and counts as decode; docs/scale_out.md).
    """
    if action == "decode":
        return [(i, i + 1, schema.PHASE_DECODE) for i in range(tokens)]
    lens = fields.get("extend_seq_lens")
    if lens is None:
        if action == "mixed":
            raise ImportFormatError(f"{path}: record {index} is a MIXED pass without extend_seq_lens")
        return [(0, tokens, schema.PHASE_PREFILL)]
    lens = [int(x) for x in as_array(lens, path, f"record {index}: extend_seq_lens").reshape(-1)]
    if sum(lens) != tokens or any(x <= 0 for x in lens):
        raise ImportFormatError(
            f"{path}: record {index}: extend_seq_lens {lens[:8]} add up to {sum(lens)}, the pass has {tokens} tokens"
        )
    phases = [schema.PHASE_PREFILL] * len(lens)
    if action == "mixed":
        i = len(lens) - 1
        while i >= 0 and lens[i] == 1:
            phases[i] = schema.PHASE_DECODE
            i -= 1
    bounds = np.cumsum([0, *lens]).tolist()
    return [(bounds[i], bounds[i + 1], phases[i]) for i in range(len(lens))]


def _optional(fields: dict, key: str, tokens: int, path: Path, index: int) -> np.ndarray | None:
    value = fields.get(key)
    if value is None:
        return None
    value = as_array(value, path, f"record {index}: {key}").reshape(-1)
    if len(value) != tokens:
        raise ImportFormatError(
            f"{path}: record {index}: {key!r} has {len(value)} entries for {tokens} tokens"
        )
    return value


def _num_experts(given: int | None, maps: dict, max_expert: int, dumps: list) -> int:
    mapped = [int(m.max()) + 1 for m in maps.values() if m is not None and m.size]
    needed = max([max_expert + 1, *mapped])
    if given:
        if given < needed:
            raise ValueError(
                f"--num-experts {given} is too small: {dumps[0].path} has logical expert id {needed - 1}"
            )
        return int(given)
    return needed

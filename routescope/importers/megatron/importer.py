"""`import_megatron(DIR)`: a Megatron-Core router-trace directory as an ImportedRun.

Tokens: every (rank, step, micro-batch) router call group is one sequence; `pos` is the row
index in Megatron's flattened layer input (training: sequence-first, row = position x
micro-batch size + sample), token ids are -1 (the trace has none). The n-th record of a
layer within a step is micro-batch n. Each source rank's tables are written as that rank's
parts, so the run's `rank` column says where a token came from (with pipeline stages, the
first stage's rank: later stages' layers join the same tokens, see layers.py).

Slot order: with the logits sidecar, each token's experts are ranked by logit (slot 0 = first
choice) and router_stats / router_tokens come from the logits. Without it, Megatron's hook
writes `routing_map.nonzero()` columns, ascending expert id; a file where some row is not
ascending was written by a router that returns ranked indices, so its order is kept. Tokens
whose order is unknown carry label `slot_order = 'unknown'` and the manifest says how many.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from routescope import schema
from routescope.importers.core.errors import ImportFormatError
from routescope.importers.core.tables import ImportedRun, sequences_to_tables
from routescope.importers.megatron.layers import LayerMap, build_layer_map
from routescope.importers.megatron.sidecars import (
    LogitsFile,
    logit_statistics,
    rank_by_logits,
    router_state_experts,
)
from routescope.importers.megatron.trace import (
    Skips,
    TraceRecord,
    check_topk,
    find_trace_files,
    read_trace_file,
)

MODES = ("training", "inference")
# Megatron's own analysis (tools/moe_routing/analyze_routing_concentration.py --decode-only)
# calls a step with at most 64 tokens a decode step.
DECODE_MAX_TOKENS = 64
SLOT_LABEL = "slot_order"


def import_megatron(
    trace_dir: str | Path,
    num_experts: int | None = None,
    mode: str | None = None,
    pipeline_stages: int = 1,
    layers_per_stage: int | None = None,
    skip_corrupt: bool = False,
    decode_max_tokens: int = DECODE_MAX_TOKENS,
) -> ImportedRun:
    """Read every `router_trace_rank{r}.jsonl` of `trace_dir` (and its sidecars) into one ImportedRun.

    `mode`: 'training' (every forward is phase prefill, as routescope records a training
    forward), 'inference' (a rank's first step is prefill, later steps of at most
    `decode_max_tokens` rows decode, larger ones unknown) or None (phase unknown).
    """
    if mode is not None and mode not in MODES:
        raise ValueError(f"--mode {mode!r}: use one of {', '.join(MODES)}")
    if num_experts is not None and num_experts < 1:
        raise ValueError(f"--num-experts {num_experts}: must be >= 1")
    trace_dir = Path(trace_dir)
    skips = Skips(skip_corrupt)
    files = find_trace_files(trace_dir, skips)
    by_rank = {rank: read_trace_file(path, rank, skips) for rank, path in files.items()}
    copies = _rank_copies(by_rank)
    by_rank = {rank: records for rank, records in by_rank.items() if rank not in copies}
    everything, top_k_by_key = check_topk([r for rank in sorted(by_rank) for r in by_rank[rank]], skips)
    experts, experts_from = _num_experts(trace_dir, everything, num_experts)
    kept = set(map(id, _ids_below(everything, experts, skips)))
    by_rank = {rank: [r for r in records if id(r) in kept] for rank, records in by_rank.items()}
    keys_by_rank = {rank: {r.key for r in records} for rank, records in by_rank.items()}
    layer_map = build_layer_map(keys_by_rank, max(files) + 1, pipeline_stages, layers_per_stage)
    builder = _Builder(trace_dir, layer_map, experts, mode, decode_max_tokens, skips)
    for rank in sorted(by_rank):
        builder.add_rank(rank, by_rank[rank])
    rank_tables = builder.tables()
    top_k = {layer_map.ids[key]: top_k_by_key[key[1:]] for key in layer_map.ids}
    layers = sorted(top_k)
    extra: dict[str, Any] = {
        "trace_dir": str(trace_dir),
        "ranks": sorted(files),
        "num_experts_from": experts_from,
        "pipeline_stages": layer_map.stages,
        "layers_per_stage": layer_map.layers_per_stage,
        "layer_ids": "decoder: stage * layers_per_stage + layer; MTP: after every decoder layer",
        "layers": layer_map.manifest(),
        "pos": "row index of the flattened router input (training: position * micro_batch_size + sample)",
        "token_ids": "none (Megatron traces carry no token ids; token_id is -1)",
        "slot_order": builder.slot_order(),
        "slot_order_unknown_tokens": builder.unknown_tokens,
        "slot_order_ties": builder.ties,
        "skipped_records": skips.as_dict(),
        "rank_copies": {str(rank): first for rank, first in sorted(copies.items())},
    }
    return ImportedRun(
        engine="megatron",
        mode=mode or "unknown",
        num_hidden_layers=(layers[-1] + 1) if layers else 0,
        num_experts={layer: experts for layer in layers},
        top_k=top_k,
        labels=[SLOT_LABEL],
        extra=extra,
        rank_tables=rank_tables,
    )


def _rank_copies(by_rank: dict[int, list[TraceRecord]]) -> dict[int, int]:
    """rank -> the earlier rank whose trace it repeats record for record (tensor-parallel ranks
    without sequence parallelism route the same tokens): one copy is kept, or every count doubles."""
    first: dict[bytes, int] = {}
    copies = {}
    for rank in sorted(by_rank):
        if not by_rank[rank]:
            continue
        digest = hashlib.sha256()
        for r in by_rank[rank]:
            digest.update(repr((r.step, r.key, r.top.shape)).encode())
            digest.update(np.ascontiguousarray(r.top).tobytes())
        key = digest.digest()
        if key in first:
            copies[rank] = first[key]
        else:
            first[key] = rank
    return copies


def _num_experts(trace_dir: Path, records: list[TraceRecord], given: int | None) -> tuple[int, str]:
    """E from --num-experts, else the logits' width, else the router-state dump; refused otherwise."""
    widths = {r.logits_at[2][-1] for r in records if r.logits_at and r.logits_at[2]}
    if given is not None:
        if widths and widths != {given}:
            raise ImportFormatError(
                f"--num-experts {given}, but the logits sidecar holds {sorted(widths)} logits per token"
            )
        return given, "--num-experts"
    if len(widths) > 1:
        raise ImportFormatError(
            f"{trace_dir}: the logits sidecars disagree on the experts per token: {sorted(widths)}"
        )
    if widths:
        return widths.pop(), "logits sidecar shape"
    states = sorted(trace_dir.glob("router_state_rank*.pt"))
    if states:
        counts = {e for path in states for e in router_state_experts(path).values()}
        if len(counts) > 1:
            raise ImportFormatError(
                f"{states[0]}: routers have different numbers of experts {sorted(counts)}"
            )
        return counts.pop(), "router-state dump"
    seen = max((int(r.top.max()) for r in records if r.top.size), default=-1)
    raise ImportFormatError(
        f"{trace_dir}: cannot tell the number of experts: no logits sidecar (--moe-routing-trace-capture-logits) "
        f"and no router-state dump (--moe-routing-trace-dump-weights); pass --num-experts E "
        f"(the highest expert id in the trace, {seen}, only says E >= {seen + 1})"
    )


def _ids_below(records: list[TraceRecord], experts: int, skips: Skips) -> list[TraceRecord]:
    kept = []
    for record in records:
        if record.top.size and int(record.top.max()) >= experts:
            skips.bad(
                record.where, "bad_expert_id", f"expert id {int(record.top.max())} >= {experts} experts"
            )
            continue
        kept.append(record)
    return kept


class _Builder:
    """Groups records into sequences and builds each owner rank's tables."""

    def __init__(
        self,
        trace_dir: Path,
        layer_map: LayerMap,
        experts: int,
        mode: str | None,
        decode_max: int,
        skips: Skips,
    ) -> None:
        self.trace_dir, self.layer_map, self.experts, self.mode = trace_dir, layer_map, experts, mode
        self.decode_max, self.skips = decode_max, skips
        self.layers = sorted(set(layer_map.ids.values()))
        self.column = {layer: i for i, layer in enumerate(self.layers)}
        # (owner, step, micro-batch) -> [(record, ranked ids, order known, logits or None)]
        self.groups: dict[tuple[int, int, int], list[tuple[TraceRecord, np.ndarray, bool, Any]]] = (
            defaultdict(list)
        )
        self.orders: Counter = Counter()
        self.ties = 0
        self.unknown_tokens = 0

    def add_rank(self, rank: int, records: list[TraceRecord]) -> None:
        logits_file = LogitsFile(self.trace_dir / f"logits_rank{rank}.bin")
        unranked = [r for r in records if r.logits_at is None and r.top.shape[1] > 1]
        written_ranked = any(bool((np.diff(r.top, axis=1) <= 0).any()) for r in unranked)
        seen: Counter = Counter()
        owner = self.layer_map.owner(rank)
        for record in records:
            logits = logits_file.read(record, self.skips) if record.logits_at is not None else None
            if logits is not None:
                ranked, ties = rank_by_logits(record.top, logits)
                self.ties += ties
                order = "logits"
            elif record.top.shape[1] == 1 or written_ranked:
                ranked, order = record.top, "written"
            else:
                ranked, order = record.top, "unknown"
            self.orders[order] += 1
            micro_batch = seen[(record.step, record.key)]
            seen[(record.step, record.key)] += 1
            self.groups[(owner, record.step, micro_batch)].append(
                (record, ranked, order != "unknown", logits)
            )

    def slot_order(self) -> str:
        """'logits', 'written', 'unknown' or 'mixed' over every imported record."""
        kinds = [kind for kind, n in self.orders.items() if n]
        return kinds[0] if len(kinds) == 1 else ("mixed" if kinds else "unknown")

    def tables(self) -> dict[int, dict[str, dict[str, np.ndarray]]]:
        per_owner: dict[int, list[dict[str, Any]]] = defaultdict(list)
        stats: dict[int, dict[str, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
        first_step = {}
        for owner, step, _ in sorted(self.groups):
            first_step.setdefault(owner, step)
        keys = sorted(self.groups)
        for seq_id, key in enumerate(tqdm(keys, desc="sequences", unit="seq", leave=False, disable=None)):
            owner, step, _ = key
            seq = self._sequence(seq_id, step, step == first_step[owner], self.groups[key], stats[owner])
            if seq is not None:
                per_owner[owner].append(seq)
        out = {}
        for owner, seqs in per_owner.items():
            tokens, routing, _ = sequences_to_tables(seqs, self.layers)
            tables = {schema.TOKENS: tokens, schema.ROUTING: routing}
            if stats[owner]:
                for table in (schema.ROUTER_STATS, schema.ROUTER_TOKENS):
                    cols = schema.TABLE_COLUMNS[table]
                    tables[table] = {c: np.concatenate(stats[owner][f"{table}.{c}"]) for c in cols}
            out[owner] = tables
        return out

    def _sequence(
        self, seq_id: int, step: int, first: bool, group: list, stats: dict[str, list[np.ndarray]]
    ) -> dict[str, Any] | None:
        n = group[0][0].top.shape[0]
        experts = np.full((n, len(self.layers), max(g[1].shape[1] for g in group)), -1, dtype=np.int16)
        known = True
        filled = False
        for record, ranked, order_known, logits in group:
            if record.top.shape[0] != n:
                self.skips.bad(
                    record.where,
                    "token_mismatch",
                    f"{record.top.shape[0]} rows, but the step's first traced layer ({group[0][0].where}) has {n}",
                )
                continue
            layer = self.layer_map.layer_id(record)
            column = self.column[layer]
            if (experts[:, column] >= 0).any():
                self.skips.bad(
                    record.where, "duplicate_layer", "a second record of this layer for the same tokens"
                )
                continue
            experts[:, column, : ranked.shape[1]] = ranked
            filled = True
            known &= order_known
            if logits is not None:
                self._add_stats(stats, seq_id, step, layer, ranked, logits)
        if not filled or n == 0:
            return None
        if not known:
            self.unknown_tokens += n
        return {
            "experts": experts,
            "seq_id": seq_id,
            "pos": np.arange(n),
            "token_ids": np.full(n, -1),
            "step": np.full(n, step),
            "phase": np.full(n, self._phase(first, n), dtype=object),
            "labels": {SLOT_LABEL: np.full(n, "known" if known else "unknown", dtype=object)},
        }

    def _phase(self, first: bool, n: int) -> str:
        if self.mode == "training":
            return schema.PHASE_PREFILL
        if self.mode == "inference":
            if first:
                return schema.PHASE_PREFILL
            return schema.PHASE_DECODE if n <= self.decode_max else schema.PHASE_UNKNOWN
        return schema.PHASE_UNKNOWN

    def _add_stats(
        self,
        stats: dict[str, list[np.ndarray]],
        seq_id: int,
        step: int,
        layer: int,
        ranked: np.ndarray,
        logits: np.ndarray,
    ) -> None:
        n, e = logits.shape
        prob_sum, entropy, margin = logit_statistics(logits)
        rs, rt = schema.ROUTER_STATS, schema.ROUTER_TOKENS
        stats[f"{rs}.step"].append(np.full(e, step, dtype=np.int32))
        stats[f"{rs}.layer"].append(np.full(e, layer, dtype=np.int16))
        stats[f"{rs}.expert"].append(np.arange(e, dtype=np.int16))
        stats[f"{rs}.prob_sum"].append(prob_sum)
        stats[f"{rs}.tokens"].append(np.bincount(ranked.reshape(-1), minlength=e).astype(np.int64))
        stats[f"{rt}.seq_id"].append(np.full(n, seq_id, dtype=np.int64))
        stats[f"{rt}.pos"].append(np.arange(n, dtype=np.int32))
        stats[f"{rt}.layer"].append(np.full(n, layer, dtype=np.int16))
        stats[f"{rt}.entropy"].append(entropy)
        stats[f"{rt}.margin"].append(margin)

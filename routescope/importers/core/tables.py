"""The handoff from an engine's reader to the store: `ImportedRun` (tables as plain column
arrays plus the manifest facts), and `write_imported_run`, which writes it with the store's
writer and manifest code, so an imported run reads like a recorded one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from routescope import schema
from routescope.importers.core.batches import (
    appended_manifest,
    check_same_model,
    continue_batch,
    counters,
    label_batch,
)
from routescope.importers.core.errors import ImportFormatError, RunExistsError
from routescope.importers.core.files import check_output_dir
from routescope.store.manifest import MANIFEST_NAME, read_manifest, write_manifest
from routescope.store.rundir import RunDirectory, base_manifest
from routescope.store.writer import PartWriter

__all__ = [
    "ImportFormatError",
    "ImportedRun",
    "RunExistsError",
    "build_manifest",
    "counts_to_table",
    "parse_layers",
    "sequences_to_tables",
    "write_imported_run",
]

Columns = dict[str, np.ndarray]


@dataclass
class ImportedRun:
    """What an importer found: tables as column arrays plus the manifest facts."""

    engine: str
    mode: str
    num_hidden_layers: int
    num_experts: dict[int, int]
    top_k: dict[int, int]
    tokens: Columns | None = None  # per-token imports: tokens + routing
    routing: Columns | None = None
    expert_counts: Columns | None = None  # counts-only imports
    context_tokens: Columns | None = None  # token ids without routing (schema.CONTEXT_TOKENS)
    labels: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    # per-token imports that keep each source rank's parts apart (the run's `rank` column):
    # rank -> {table name: columns}; used instead of tokens / routing
    rank_tables: dict[int, dict[str, Columns]] | None = None

    @property
    def counts_only(self) -> bool:
        return self.routing is None and not self.rank_tables

    @property
    def router_stats(self) -> bool:
        return any(schema.ROUTER_STATS in tables for tables in (self.rank_tables or {}).values())

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self.num_experts)

    def token_count(self) -> int:
        if self.rank_tables:
            return sum(
                len(t[schema.TOKENS]["seq_id"]) for t in self.rank_tables.values() if schema.TOKENS in t
            )
        if self.tokens is not None:
            return len(self.tokens["seq_id"])
        counts = self.expert_counts or {}
        if not len(counts.get("layer", ())):
            return 0
        first = self.moe_layers[0]
        rows = int(counts["tokens"][counts["layer"] == first].sum())
        return rows // max(1, self.top_k.get(first, 1))


class _Step:
    """Adapter: PartWriter takes objects with `to_tables()`."""

    def __init__(self, tables: dict[str, Columns]) -> None:
        self._tables = tables

    def to_tables(self) -> dict[str, Columns]:
        return self._tables


def write_imported_run(
    imported: ImportedRun,
    out: str | Path,
    model_type: str = "",
    overwrite: bool = False,
    sources: Sequence[str | Path] = (),
    wait: bool | float = False,
    append: bool = False,
    labels: dict[str, str] | None = None,
) -> Path:
    """Write `imported` as a run directory at `out` (refuses an existing run unless `overwrite`,
    or `append`, which adds it as a further batch: seq_ids and steps continue, core/batches.py).
    `labels`: a VARCHAR column per name in tokens, the same value on every row of this batch.

    Holds the run's writer lock throughout (RunBusyError while another writer has it, or `wait`)."""
    out = check_output_dir(out)
    if not imported.moe_layers:
        named = ", ".join(str(s) for s in sources) or "the input"
        raise ImportFormatError(f"{named}: no MoE layer has any routed token; nothing to import")
    if overwrite and append:
        raise ValueError("--overwrite and --append exclude each other: pick one")
    if append and imported.rank_tables:
        raise ValueError(
            "--append takes single-rank imports; a multi-rank import (Megatron traces) writes one run per "
            "import: read several together with rs.open_runs([...])"
        )
    if (out / MANIFEST_NAME).exists() and not (overwrite or append):
        raise RunExistsError(
            f"{out} already holds a routescope run; pass --overwrite to replace it or --append to add to it"
        )
    imported = label_batch(imported, labels or {})
    mode = "overwrite" if overwrite else "append" if append else "create"
    with RunDirectory(out) as run_dir:
        start = run_dir.prepare(mode, imported.moe_layers, wait=wait)
        old = read_manifest(out) if append and (out / MANIFEST_NAME).exists() else {}
        if append:
            check_same_model(old, imported)
            imported = continue_batch(imported, start, run_dir._own_parts())
        _write_tables(imported, out)
        manifest = {**build_manifest(imported, model_type, sources), **counters(imported)}
        if old:
            manifest = appended_manifest(manifest, old, start)
        for rank, fragment in _rank_manifests(imported, manifest).items():
            write_manifest(out, fragment, name=f"manifest.rank={rank}.json")
        run_dir.write_manifest(manifest)
    return out


def _rank_manifests(imported: ImportedRun, manifest: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """With `rank_tables`: `manifest` becomes rank 0's (world_size = ranks) and ranks 1.. get
    their fragments (manifest.rank=R.json), each counting its own tokens and steps, as a
    multi-rank recording leaves them."""
    if not imported.rank_tables:
        return {}
    world = max(imported.rank_tables) + 1
    fragments = {}
    for rank in range(world):
        tokens = imported.rank_tables.get(rank, {}).get(schema.TOKENS, {})
        counts = {
            "rank": rank,
            "world_size": world,
            "tokens": len(tokens.get("seq_id", ())),
            "steps": len(np.unique(tokens["step"])) if len(tokens.get("step", ())) else 0,
        }
        if rank == 0:
            manifest.update(counts)
        else:
            fragments[rank] = {**manifest, **counts}
    return fragments


def _write_tables(imported: ImportedRun, out: Path) -> None:
    for rank, rank_tables in sorted((imported.rank_tables or {}).items()):
        rank_writer = PartWriter(out, rank=rank, flush_seconds=3600)
        rank_writer.submit(_Step(rank_tables))
        rank_writer.close()
    tables: dict[str, Columns] = {}
    if imported.tokens is not None and imported.routing is not None:
        tables[schema.TOKENS] = imported.tokens
        tables[schema.ROUTING] = imported.routing
    if imported.expert_counts is not None:
        tables[schema.EXPERT_COUNTS] = imported.expert_counts
    if imported.context_tokens is not None:
        tables[schema.CONTEXT_TOKENS] = imported.context_tokens
    writer = PartWriter(out, rank=0, flush_seconds=3600)
    if tables:
        writer.submit(_Step(tables))
    writer.close()


def build_manifest(
    imported: ImportedRun, model_type: str = "", sources: Sequence[str | Path] = ()
) -> dict[str, Any]:
    """The manifest.json of an imported run (SPEC 3.1 keys plus `imported_from`)."""
    from routescope.version import __version__

    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest = base_manifest(
        model_type=model_type or f"{imported.engine}-import",
        num_hidden_layers=imported.num_hidden_layers,
        moe_layers=imported.moe_layers,
        num_experts=dict(sorted(imported.num_experts.items())),
        top_k=dict(sorted(imported.top_k.items())),
        counts_only=imported.counts_only,
        weights_recorded=False,
        router_stats=imported.router_stats,
        rank=0,
        world_size=1,
        imported_from={
            "engine": imported.engine,
            "mode": imported.mode,
            "files": [str(s) for s in sources],
            **imported.extra,
        },
        versions={"routescope": __version__},
        created_at=now,
        updated_at=now,
    )
    manifest.update(labels=list(imported.labels), tokens=imported.token_count(), complete=True)
    return manifest


def sequences_to_tables(
    sequences: list[dict[str, Any]], layers: list[int], first_seq_id: int = 0
) -> tuple[Columns, Columns, dict[int, int]]:
    """Tokens and routing columns from per-sequence top-k arrays.

    Each sequence: `experts` [T, L, K] int (negative = no expert, dropped), `pos` [T],
    `token_ids` [T], `step` [T], `phase` [T] (str), optional `seq_id` (an int, or [T] ints
    when one chunk holds several sequences; default `first_seq_id` + its index) and
    optional `labels` {name: [T] str}.
    Returns tokens, routing and the top-k seen per layer.
    """
    tokens: dict[str, list[np.ndarray]] = {c: [] for c in schema.TOKEN_COLUMNS}
    routing: dict[str, list[np.ndarray]] = {c: [] for c in ("seq_id", "pos", "layer", "slot", "expert")}
    label_names = sorted({name for seq in sequences for name in seq.get("labels", {})})
    label_values: dict[str, list[np.ndarray]] = {name: [] for name in label_names}
    top_k: dict[int, int] = {}
    layer_ids = np.asarray(layers, dtype=np.int16)
    for offset, seq in enumerate(sequences):
        experts = np.asarray(seq["experts"])
        n, num_layers, _ = experts.shape
        seq_id = np.broadcast_to(
            np.asarray(seq.get("seq_id", first_seq_id + offset), dtype=np.int64), (n,)
        ).copy()
        pos = np.asarray(seq["pos"], dtype=np.int32)
        tokens["seq_id"].append(seq_id)
        tokens["pos"].append(pos)
        tokens["token_id"].append(np.asarray(seq["token_ids"], dtype=np.int32))
        tokens["step"].append(np.asarray(seq["step"], dtype=np.int32))
        tokens["phase"].append(np.asarray(seq["phase"], dtype=object))
        for name in label_names:
            label_values[name].append(np.asarray(seq.get("labels", {}).get(name, [None] * n), dtype=object))
        valid = experts >= 0  # token-major (token, layer, slot), as the recorder writes
        t_idx, l_idx, s_idx = np.nonzero(valid)
        routing["seq_id"].append(seq_id[t_idx])
        routing["pos"].append(pos[t_idx])
        routing["layer"].append(layer_ids[l_idx])
        routing["slot"].append(s_idx.astype(np.int8))
        routing["expert"].append(experts[valid].astype(np.int16))
        per_layer_k = valid.sum(axis=2).max(axis=0) if n else np.zeros(num_layers, dtype=int)
        for i, layer in enumerate(layers):
            top_k[layer] = max(top_k.get(layer, 0), int(per_layer_k[i]))
    token_cols = {c: np.concatenate(v) if v else np.array([]) for c, v in tokens.items()}
    for name, values in label_values.items():
        token_cols[name] = np.concatenate(values)
    routing_cols = {c: np.concatenate(v) if v else np.array([]) for c, v in routing.items()}
    return token_cols, routing_cols, top_k


def counts_to_table(counts: np.ndarray, layers: list[int]) -> Columns:
    """expert_counts columns from an array [steps, layers, experts] of routing rows."""
    steps, num_layers, num_experts = counts.shape
    s, li, e = np.meshgrid(np.arange(steps), np.arange(num_layers), np.arange(num_experts), indexing="ij")
    return {
        "step": s.reshape(-1).astype(np.int32),
        "layer": np.asarray(layers, dtype=np.int16)[li.reshape(-1)],
        "expert": e.reshape(-1).astype(np.int16),
        "tokens": counts.reshape(-1).astype(np.int64),
    }


def parse_layers(text: str | None) -> list[int] | None:
    """'1,2,5' or '1-3,7' -> [1, 2, 5] / [1, 2, 3, 7]; None stays None. Duplicates and negatives are refused."""
    if not text:
        return None
    layers: list[int] = []
    usage = "use comma-separated non-negative integers or ranges, e.g. '1,2,5' or '1-26'"
    try:
        for item in text.split(","):
            if "-" in item.strip()[1:]:
                lo, hi = (int(x) for x in item.split("-"))
                if hi < lo:
                    raise ValueError
                layers += list(range(lo, hi + 1))
            else:
                layers.append(int(item))
    except ValueError:
        raise ValueError(f"--moe-layers {text!r}: {usage}") from None
    if any(layer < 0 for layer in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"--moe-layers {text!r}: negative or repeated layer; {usage}")
    return layers

"""The run directory as a whole: create, overwrite or append, rank fragments, the manifest.

Everything that writes a run (the recorder, Super Expert calibration, the importers) goes
through here, so the rules live in one place:

- `mode="create"` refuses a directory that already holds a run (`RunExistsError`);
  `overwrite` removes its tables and manifests first; `append` continues its step and
  sequence counters.
- Rank 0 writes `manifest.json`; rank R > 0 writes `manifest.rank=R.json` (a fragment the
  reader merges), and a rank of a multi-rank run only ever removes its own files.
- `base_manifest` is the one builder of the SPEC 3.1 keys.
- `replace_parts` swaps a table's parts for new ones without a moment where neither exists.
- One writer per rank at a time: `prepare` (or `lock`) takes the rank's writer lock
  (`store.lock`: RUN/.lock, RUN/.lock.rank=R) before it reads the manifest, `close`
  lets it go after the last manifest write; a second writer gets `RunBusyError` or waits.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from routescope import schema
from routescope.errors import RouteScopeError
from routescope.store.layout import (
    TMP_SUFFIX,
    list_tables,
    lock_path,
    next_part_index,
    part_path,
    table_dir,
)
from routescope.store.lock import LockHolder, RunLock, acquire_announced, lock_for
from routescope.store.manifest import MANIFEST_NAME, read_manifest, write_manifest

MODES = ("create", "overwrite", "append")


class RunExistsError(RouteScopeError, FileExistsError):
    """The output directory already holds a run and neither overwrite nor append was asked."""


def base_manifest(
    *,
    model_type: str,
    num_hidden_layers: int,
    moe_layers: list[int],
    num_experts: dict[int, int],
    top_k: dict[int, int],
    **extra: Any,
) -> dict[str, Any]:
    """The SPEC 3.1 keys (per-layer dicts keyed by the layer as a string) plus `extra`."""
    return {
        "format_version": schema.FORMAT_VERSION,
        "model_type": model_type,
        "num_hidden_layers": int(num_hidden_layers),
        "moe_layers": [int(layer) for layer in moe_layers],
        "num_experts": {str(layer): int(n) for layer, n in num_experts.items()},
        "top_k": {str(layer): int(k) for layer, k in top_k.items()},
        "labels": [],
        "tokens": 0,
        "complete": False,
        **extra,
    }


@dataclass
class Continuation:
    """Counters a new writer continues from (zero for a new run)."""

    tokens: int = 0
    steps: int = 0
    next_seq_id: int = 0
    labels: list[str] = field(default_factory=list)
    created_at: str | None = None


class RunDirectory:
    """One rank's view of a run directory; a context manager that holds the rank's lock."""

    def __init__(self, path: str | Path, rank: int = 0, world_size: int = 1) -> None:
        self.path = Path(path)
        self.rank = rank
        self.world_size = world_size
        self._lock: RunLock | None = None

    # -- the writer lock (store.lock) --------------------------------------------------
    def lock(self, wait: bool | float = False) -> LockHolder | None:
        """Take this rank's writer lock (creating the directory); RunBusyError when another
        writer holds it and `wait` runs out. Returns the dead holder taken over, if any."""
        if self._lock is not None:
            return None
        self.path.mkdir(parents=True, exist_ok=True)
        lock = lock_for(lock_path(self.path, self.rank), self.rank)
        previous = acquire_announced(lock, wait, str(self.path))
        self._lock = lock
        return previous

    def close(self) -> None:
        """Let the lock go (after the last manifest write)."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_other_ranks_idle(self) -> None:
        """A single process replaces every rank: none of a multi-rank job's ranks may be writing."""
        for path in self.path.glob(".lock.rank=*"):
            rank = path.name.rsplit("=", 1)[-1]
            if not rank.isdigit() or int(rank) == self.rank:
                continue
            other = lock_for(path, int(rank))
            other.acquire(wait=False)  # RunBusyError names the writing rank
            other.release()

    @property
    def manifest_name(self) -> str:
        return MANIFEST_NAME if self.rank == 0 else f"manifest.rank={self.rank}.json"

    def prepare(
        self, mode: str, moe_layers: list[int], first_seq_id: int = 0, wait: bool | float = False
    ) -> Continuation:
        """Take the lock, then make the directory ready for writing in `mode`; what an append
        continues from. The lock stays held until `close` (also released here on an error)."""
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not allowed; use one of {', '.join(MODES)}")
        self.lock(wait)
        try:
            return self._prepare(mode, moe_layers, first_seq_id)
        except BaseException:
            self.close()
            raise

    def _prepare(self, mode: str, moe_layers: list[int], first_seq_id: int) -> Continuation:
        start = Continuation(next_seq_id=first_seq_id)
        if self._has_manifest() or self.own_parts_exist():
            if mode == "create":
                raise RunExistsError(
                    f"{self.where} already holds a routescope run; pass mode='overwrite' to replace it "
                    "or mode='append' to add to it (CLI: --overwrite / --append)"
                )
            if mode == "overwrite":
                if self.world_size == 1:
                    self._check_other_ranks_idle()
                self.remove_run_files()
            else:
                start = self._continuation(moe_layers, first_seq_id)
        self._make_ready()
        return start

    # -- file operations a run directory on object storage swaps (store/remote.py) ----------
    @property
    def where(self) -> str:
        """The run's location, as messages name it."""
        return str(self.path)

    _filesystem: Any = None  # the fsspec filesystem parts are read through (None: the local disk)

    def _has_manifest(self) -> bool:
        return (self.path / self.manifest_name).exists()

    def _read_own_manifest(self) -> dict[str, Any]:
        if self.rank == 0:
            return read_manifest(self.path)
        return json.loads((self.path / self.manifest_name).read_text(encoding="utf-8"))

    def _own_parts(self) -> dict[str, list[Any]]:
        """table -> this rank's finished parts."""
        if not self.path.is_dir():
            return {}
        return {
            table: sorted(table_dir(self.path, table, self.rank).glob("part-*.parquet"))
            for table in list_tables(self.path)
        }

    def _make_ready(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def own_parts_exist(self) -> bool:
        """Only this rank's parts: other ranks of the same run may already have flushed theirs."""
        return any(self._own_parts().values())

    def remove_run_files(self) -> None:
        """A single process replaces every rank of an earlier run; a rank of a multi-rank run
        removes only its own files (the others may be writing already)."""
        ranks = "rank=*" if self.world_size == 1 else f"rank={self.rank}"
        tables = set(schema.TABLE_COLUMNS) | (set(list_tables(self.path)) if self.path.is_dir() else set())
        for table in tables:
            for path in (self.path / table).glob(ranks):
                shutil.rmtree(path, ignore_errors=True)
        (self.path / self.manifest_name).unlink(missing_ok=True)
        if self.world_size == 1:
            for fragment in self.path.glob("manifest.rank=*.json"):
                fragment.unlink(missing_ok=True)

    def write_manifest(self, manifest: dict[str, Any]) -> Path:
        return write_manifest(self.path, manifest, name=self.manifest_name)

    def _continuation(self, moe_layers: list[int], first_seq_id: int) -> Continuation:
        old = self._read_own_manifest()
        if [int(x) for x in old.get("moe_layers", [])] != list(moe_layers):
            raise RouteScopeError(
                f"cannot append to {self.where}: it was recorded with MoE layers {old.get('moe_layers')}, "
                f"this model has {list(moe_layers)}"
            )
        start = Continuation(
            tokens=int(old.get("tokens", 0)),
            steps=int(old.get("steps", 0)),
            next_seq_id=int(old.get("next_seq_id", first_seq_id)),
            labels=list(old.get("labels", [])),
            created_at=old.get("created_at"),
        )
        if not old.get("complete", False):
            start = self._reconcile(start)
        return start

    def _reconcile(self, start: Continuation) -> Continuation:
        """The previous writer stopped early (killed between a flush's parts and its manifest
        update): continue from what its parts hold, so no seq_id is handed out twice and the
        token count matches the parts."""
        extent = parts_extent(self._own_parts(), self._filesystem)
        fixed = Continuation(
            tokens=extent.token_rows,
            steps=max(start.steps, extent.next_step),
            next_seq_id=max(start.next_seq_id, extent.next_seq_id),
            labels=start.labels,
            created_at=start.created_at,
        )
        if (fixed.tokens, fixed.next_seq_id) != (start.tokens, start.next_seq_id):
            warnings.warn(
                f"routescope: {self.where}/{self.manifest_name} was left incomplete and behind its parts "
                f"(tokens {start.tokens}, next_seq_id {start.next_seq_id}); continuing from the parts "
                f"(tokens {fixed.tokens}, next_seq_id {fixed.next_seq_id})",
                RuntimeWarning,
                stacklevel=5,
            )
        return fixed


@dataclass(frozen=True)
class PartsExtent:
    """What one rank's parts hold: token rows, and the first seq_id and step above all of them."""

    token_rows: int = 0
    next_seq_id: int = 0
    next_step: int = 0


def parts_extent(parts: dict[str, list[Any]], filesystem: Any = None) -> PartsExtent:
    """Read from the footers (row counts, column statistics) of `parts` (table -> one rank's
    parts; keys of `filesystem`, an fsspec filesystem, for a run on object storage); a part
    without statistics is read for those columns. Unreadable parts are left out."""
    rows, seq_id, step = 0, -1, -1
    for table, paths in parts.items():
        for path in paths:
            try:
                meta = pq.read_metadata(path, filesystem=filesystem)
            except Exception:
                continue
            if table == schema.TOKENS:
                rows += meta.num_rows
            names = meta.schema.names
            for column in ("seq_id", "step"):
                if column not in names or meta.num_rows == 0:
                    continue
                top = _column_max(path, meta, names.index(column), column, filesystem)
                if column == "seq_id":
                    seq_id = max(seq_id, top)
                else:
                    step = max(step, top)
    return PartsExtent(rows, seq_id + 1, step + 1)


def _column_max(path: Any, meta: Any, index: int, column: str, filesystem: Any = None) -> int:
    tops = []
    for group in range(meta.num_row_groups):
        stats = meta.row_group(group).column(index).statistics
        if stats is None or not stats.has_min_max:
            return int(pq.read_table(path, columns=[column], filesystem=filesystem)[column].to_numpy().max())
        tops.append(int(stats.max))
    return max(tops) if tops else -1


def replace_parts(run_dir: str | Path, tables: dict[str, pa.Table], rank: int = 0) -> list[Path]:
    """Write each table as a new part of rank `rank`, then remove that table's older parts.

    New parts land (atomically, under a temporary name first) before the old ones go, so a
    reader sees either the previous parts or the new ones plus, briefly, both; never none.
    """
    run_dir = Path(run_dir)
    old = {name: sorted(table_dir(run_dir, name, rank).glob("part-*.parquet")) for name in tables}
    written = []
    for name, table in tables.items():
        path = part_path(run_dir, name, rank, next_part_index(run_dir, name, rank))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + TMP_SUFFIX)
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
        written.append(path)
    for paths in old.values():
        for path in paths:
            path.unlink(missing_ok=True)
    return written

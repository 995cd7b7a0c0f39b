"""Background Parquet writer: the recorder hands it finished steps, it writes parts atomically.

The model thread only enqueues; Arrow conversion, compression and file I/O happen on
this thread. The queue is bounded, so a slow disk slows the model down (backpressure)
instead of filling host memory. A failure on this thread is re-raised as WriterError in
the caller's thread at its next call.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from routescope import schema
from routescope.errors import WriterError
from routescope.store.layout import TMP_SUFFIX, next_part_index, part_path
from routescope.store.pair_totals import PairTotals
from routescope.store.part_files import LocalParts, PartFiles
from routescope.store.rollups import COMPACTED, TOP1_PAIRS, compact, part_rollups
from routescope.store.step_rollups import StepInput, combine

Columns = dict[str, np.ndarray]


class StepData(Protocol):
    """What the recorder submits: turned into table columns on the writer thread. An item may
    also carry `rollup_counts` (a list of store/step_rollups.StepInput, set by `to_tables`):
    the writer then sums them into the part's rollup rows instead of computing them from the
    part's tables (`part_rollups`)."""

    def to_tables(self) -> dict[str, Columns]: ...


_CLOSE = object()
_FLUSH = object()

# Per-column Parquet encodings: exact float32 weights compress best split by byte.
_BYTE_STREAM_SPLIT = ["weight", "prob_sum", "entropy", "margin"]


class PartWriter:
    """Owns the writer thread and the per-table buffers of one rank of one run."""

    def __init__(
        self,
        run_dir: Path,
        rank: int = 0,
        labels: tuple[str, ...] = (),
        rows_per_part: int = 4_000_000,
        flush_seconds: float = 10.0,
        max_pending: int = 8,
        max_pending_bytes: int = 256 << 20,
        on_flush: Callable[[int], None] | None = None,
        compression: str = "zstd",
        observers: list[Callable[[dict[str, Columns]], None]] | None = None,
        rollups: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.labels = tuple(labels)
        self.rows_per_part = rows_per_part
        self.flush_seconds = flush_seconds
        self.compression = compression
        self.on_flush = on_flush
        # rollup_* parts (store/rollups.py) beside each routing part; a failure to compute them
        # is counted in `rollup_errors` and never loses routing (readers then use `routing`)
        self.rollups = rollups
        self.rollup_errors = 0
        self.rollup_parts_counted = 0  # parts whose rollups were summed from their steps' counts
        self._pair_totals = PairTotals()  # the pair parts' sums, written as one part at close
        # Called on this thread with each step's tables (e.g. a metrics exporter). The list is
        # kept by reference, so observers added while recording take effect; their errors are
        # counted in `observer_errors` and never stop the writer.
        self.observers = observers if observers is not None else []
        self.observer_errors = 0
        self.tokens_written = 0
        self.parts_written: list[Path] = []
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        # Host memory the queued steps hold (pinned on CUDA): bounded in bytes, not only in steps.
        self.max_pending_bytes = max_pending_bytes
        self._pending_bytes = 0
        self._bytes_cond = threading.Condition()
        # steps and tokens that were queued or buffered when the thread failed (never written)
        self.dropped_steps = 0
        self.dropped_tokens = 0
        self._buffered_steps = 0
        self._buffered_tokens = 0
        self._buffers: dict[str, list[pa.Table]] = {}
        # the buffered steps' rollup counts; None once a buffered step with routing came without
        self._counts: list[StepInput] | None = []
        self._rollups_in_flight: _Rollups | None = None  # the last part's, until written
        self._buffered_rows = 0
        self._next_index: dict[str, int] = {}
        self._error: BaseException | None = None
        self._flushed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="routescope-writer", daemon=True)
        self._thread.start()

    # -- caller side -------------------------------------------------------------------
    def submit(self, item: StepData) -> None:
        """Queue one step; blocks while `max_pending` steps or `max_pending_bytes` wait (backpressure)."""
        self.raise_if_failed()
        size = int(getattr(item, "nbytes", 0))
        with self._bytes_cond:
            while self._pending_bytes and self._pending_bytes + size > self.max_pending_bytes:
                self._bytes_cond.wait(timeout=0.5)
                self.raise_if_failed()
            self._pending_bytes += size
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                self.raise_if_failed()

    def flush(self) -> None:
        """Write everything submitted so far and wait until it is on disk."""
        self.raise_if_failed()
        self._flushed.clear()
        self._queue.put(_FLUSH)
        while not self._flushed.wait(timeout=0.5):
            self.raise_if_failed()
            if not self._thread.is_alive():
                break
        self.raise_if_failed()

    def close(self) -> None:
        """Flush, stop the thread, and re-raise a failure it had. The pair rollups written
        part by part are then compacted into one part (store/rollups.py)."""
        if self._thread.is_alive():
            self._queue.put(_CLOSE)
            self._thread.join()
        self.raise_if_failed()
        if self.rollups:
            for table in COMPACTED:
                try:
                    compact(
                        self.part_files(),
                        table,
                        self.rank,
                        self._pair_totals if table == TOP1_PAIRS else None,
                    )
                except Exception:
                    self.rollup_errors += 1

    def part_files(self) -> PartFiles:
        """The run's parts as compaction reads and writes them (store/part_files.py)."""
        return LocalParts(self.run_dir)

    def raise_if_failed(self) -> None:
        if self._error is not None:
            error = self._error
            raise WriterError(f"routescope writer failed while writing to {self.run_dir}: {error}") from error

    @property
    def failed(self) -> bool:
        return self._error is not None

    # -- writer thread -----------------------------------------------------------------
    def _loop(self) -> None:
        last_flush = time.monotonic()
        while True:
            try:
                item = self._queue.get(timeout=max(0.05, self.flush_seconds / 4))
            except queue.Empty:
                item = None
            added = False
            try:
                if item is _CLOSE:
                    self._write_parts()
                    self._settle_rollups()
                    return
                if item is _FLUSH:
                    self._write_parts()
                    self._settle_rollups()
                    last_flush = time.monotonic()
                    self._flushed.set()
                    continue
                if item is not None and self._error is not None:
                    self.dropped_steps += 1
                    self._release_bytes(item)
                elif item is not None:
                    try:
                        tables = item.to_tables()
                    finally:
                        self._release_bytes(item)
                    self._add(tables)
                    self._add_counts(item, tables)
                    added = True
                    self._buffered_steps += 1
                    self._buffered_tokens += len(next(iter(tables.get(schema.TOKENS, {"": []}).values())))
                    if tables:  # a step that failed alone gives none (capture/recording/step.py)
                        self._notify(tables)
                due = time.monotonic() - last_flush >= self.flush_seconds and self._buffered_rows
                if self._buffered_rows >= self.rows_per_part or due:
                    self._write_parts()
                    last_flush = time.monotonic()
            except BaseException as exc:
                self._error = exc
                try:
                    self._settle_rollups()
                except BaseException:
                    pass  # the writer has failed already: that error is the one reported
                self.dropped_steps += self._buffered_steps + (
                    item not in (None, _CLOSE, _FLUSH) and not added
                )
                self.dropped_tokens += self._buffered_tokens
                self._buffers.clear()
                self._counts = []
                self._buffered_rows = 0
                self._buffered_steps = self._buffered_tokens = 0
                if item is _CLOSE:
                    return
                if item is _FLUSH:
                    self._flushed.set()

    def _release_bytes(self, item: Any) -> None:
        with self._bytes_cond:
            self._pending_bytes -= int(getattr(item, "nbytes", 0))
            self._bytes_cond.notify_all()

    def _notify(self, tables: dict[str, Columns]) -> None:
        for observer in list(self.observers):
            try:
                observer(tables)
            except Exception:
                self.observer_errors += 1

    def _add(self, tables: dict[str, Columns]) -> None:
        for name, columns in tables.items():
            if not columns or len(next(iter(columns.values()))) == 0:
                continue
            table = pa.Table.from_pydict(columns, schema=self._schema(name, columns))
            self._buffers.setdefault(name, []).append(table)
            if name == schema.ROUTING or name == schema.TOKENS:
                self._buffered_rows += table.num_rows

    def _add_counts(self, item: Any, tables: dict[str, Columns]) -> None:
        routing = tables.get(schema.ROUTING)
        if not routing or len(next(iter(routing.values()))) == 0 or self._counts is None:
            return
        counts = getattr(item, "rollup_counts", None) if self.rollups else None
        self._counts = None if counts is None else self._counts + counts

    def _schema(self, name: str, columns: Columns) -> pa.Schema:
        if name == schema.TOKENS:
            labels = tuple(c for c in columns if c not in schema.TOKEN_COLUMNS)
            return schema.schema_for(name, labels)
        full = schema.schema_for(name)
        return pa.schema([f for f in full if f.name in columns])  # e.g. routing without weights

    def _write_parts(self) -> None:
        """Write one part per buffered table; `tokens` goes last, so a reader that joins never sees
        a token whose routing rows are still missing."""
        if not self._buffers:
            return
        self._settle_rollups()  # one part's rollups in flight at most
        tokens_added = 0
        order = sorted(self._buffers, key=lambda n: n == schema.TOKENS)
        whole = {name: pa.concat_tables(self._buffers.pop(name), promote_options="default") for name in order}
        # the rollups are made on a second thread while this one writes the routing part
        # (NumPy and Parquet both release the GIL), and written there once its tokens are
        rollups = _Rollups(self, whole, self._counts)
        self._counts = []
        index = written = None
        try:
            for name in order:
                table = whole[name]
                self._write_table(name, table)
                if name == schema.ROUTING:
                    index = self._next_index[schema.ROUTING] - 1
                if name == schema.TOKENS:
                    tokens_added = table.num_rows
            written = index
        finally:
            # rollup part N summarises routing part N: written after the part's tokens, so a
            # reader never waits on them (a crash before leaves routing parts without rollups:
            # readers use routing, `routescope check` notes them, `routescope index` builds
            # them); a part that failed drops its rollups
            rollups.write(written)
            self._rollups_in_flight = rollups
        self._buffered_rows = 0
        self._buffered_steps = self._buffered_tokens = 0
        self.tokens_written += tokens_added
        if self.on_flush is not None:
            self.on_flush(self.tokens_written)

    def _settle_rollups(self) -> None:
        """Wait until the last part's rollups are written; re-raise a failure to write them."""
        rollups, self._rollups_in_flight = self._rollups_in_flight, None
        if rollups is not None:
            rollups.settle()

    def _rollups(self, tables: dict[str, pa.Table], counts: list[StepInput] | None) -> dict[str, pa.Table]:
        if not self.rollups or schema.ROUTING not in tables or schema.TOKENS not in tables:
            return {}
        cells: dict = {}
        try:
            rows = combine(counts, tables[schema.TOKENS].schema, cells_out=cells) if counts else None
            if rows is None:  # steps without counts (e.g. imported), or not describing the part alone
                cells = {}
                rows = part_rollups(tables[schema.TOKENS], tables[schema.ROUTING], cells_out=cells)
            else:
                self.rollup_parts_counted += 1
        except Exception:
            self.rollup_errors += 1
            return {}
        if TOP1_PAIRS in rows and cells:
            try:
                self._pair_totals.add(rows[TOP1_PAIRS], cells)
            except Exception:
                self._pair_totals.failed = True  # close then compacts from the files
        return rows

    def parquet_options(self, table: pa.Table) -> dict[str, Any]:
        """How every part is encoded (local and object-storage writers alike)."""
        split = [c for c in _BYTE_STREAM_SPLIT if c in table.column_names]
        return {
            "compression": self.compression,
            "use_dictionary": [c for c in table.column_names if c not in split],
            "use_byte_stream_split": split or False,
            "write_statistics": True,
        }

    def _write_table(self, name: str, table: pa.Table) -> None:
        if name not in self._next_index:
            self._next_index[name] = next_part_index(self.run_dir, name, self.rank)
        path = part_path(self.run_dir, name, self.rank, self._next_index[name])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + TMP_SUFFIX)
        pq.write_table(table, tmp, **self.parquet_options(table))
        os.replace(tmp, path)
        self._next_index[name] += 1
        self.parts_written.append(path)


class _Rollups:
    """The rollup rows of one part (its steps' counts summed, else `part_rollups` of its
    tables), computed on their own thread from construction on and written there as parts
    numbered `index` once `write(index)` says the part's tokens are on disk."""

    def __init__(
        self, writer: PartWriter, tables: dict[str, pa.Table], counts: list[StepInput] | None
    ) -> None:
        self._index: int | None = None
        self._go = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if writer.rollups and schema.ROUTING in tables and schema.TOKENS in tables:
            self._thread = threading.Thread(
                target=self._run, args=(writer, tables, counts), name="routescope-rollups", daemon=True
            )
            self._thread.start()

    def _run(self, writer: PartWriter, tables: dict[str, pa.Table], counts: list[StepInput] | None) -> None:
        rows = writer._rollups(tables, counts)
        self._go.wait()
        index = self._index
        if index is None:
            return
        try:
            for rollup, table in rows.items():
                writer._next_index[rollup] = index
                writer._write_table(rollup, table)
                if rollup == TOP1_PAIRS:
                    writer._pair_totals.parts.append(index)
        except BaseException as exc:  # re-raised on the writer thread by `settle`
            self._error = exc

    def write(self, index: int | None) -> None:
        """The part's tokens are on disk (its routing part is `index`; None: the part failed)."""
        self._index = index
        self._go.set()

    def settle(self) -> None:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error

"""The parts of a run as the rollup builders see them: on the local disk or on object storage.

`routescope index` and compaction (store/rollups.py `compact`) list, read, write and remove
parts by their name under the table ('rank=R/part-NNNNN.parquet'). `LocalParts` does it in a
folder (written under a temporary name, then renamed); `RemoteParts` under an object-storage
prefix through fsspec (serialised in memory, stored with one PUT: an object appears whole or
not at all, store/remote.py). Either way a half-written part never looks complete.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from routescope.store.layout import TMP_SUFFIX, list_parts


def part_name(part: Any) -> str:
    """'rank=R/part-NNNNN.parquet' of a part path, key or URL."""
    text = str(part).replace("\\", "/")
    return "/".join(text.rsplit("/", 2)[-2:])


class PartFiles(Protocol):
    """Listing, reading, writing and removing a run's parts by table and name."""

    def parts(self, table: str) -> dict[str, Any]: ...  # name -> handle (path or key)
    def modified(self, handle: Any) -> float: ...  # seconds since the epoch
    def read(self, handle: Any, columns: list[str] | None = None) -> pa.Table: ...
    def write(self, table: str, name: str, data: pa.Table, level: int | None = None) -> Any: ...
    def remove(self, handles: list[Any]) -> None: ...
    def url(self, handle: Any) -> str: ...  # what DuckDB (or Spark) opens


class LocalParts:
    """A run directory on the local disk."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def parts(self, table: str) -> dict[str, Path]:
        return {part_name(p): p for p in list_parts(self.run_dir, table)}

    def modified(self, handle: Path) -> float:
        return handle.stat().st_mtime

    def read(self, handle: Path, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(handle, columns=columns)

    def write(self, table: str, name: str, data: pa.Table, level: int | None = None) -> Path:
        path = self.run_dir / table / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + TMP_SUFFIX)
        pq.write_table(data, tmp, compression="zstd", compression_level=level)
        os.replace(tmp, path)
        return path

    def remove(self, handles: list[Path]) -> None:
        for path in handles:
            path.unlink(missing_ok=True)

    def url(self, handle: Path) -> str:
        return str(handle)


class RemoteParts:
    """A run under an object-storage prefix (`store.remote.ObjectStore`)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def parts(self, table: str) -> dict[str, str]:
        self.store.fs.invalidate_cache()  # another process may have written parts since
        return {part_name(k): k for k in self.store.list_parts(table)}

    def modified(self, handle: str) -> float:
        return self.store.fs.modified(handle).timestamp()

    def read(self, handle: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(handle, columns=columns, filesystem=self.store.fs)

    def write(self, table: str, name: str, data: pa.Table, level: int | None = None) -> str:
        key = self.store.key(table, name)
        sink = pa.BufferOutputStream()
        pq.write_table(data, sink, compression="zstd", compression_level=level)
        self.store.put(key, sink.getvalue().to_pybytes())
        return key

    def remove(self, handles: list[str]) -> None:
        self.store.remove(list(handles))

    def url(self, handle: str) -> str:
        return self.store.url(handle)

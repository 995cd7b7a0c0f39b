"""Run directories on object storage (`s3://`, `gs://`, `az://`, ...) through fsspec.

The layout is the one of SPEC section 3, under a key prefix instead of a folder. What
changes is how "a reader never sees a half-written part" is kept without renames:

- **Parts.** A part is serialised in memory, then stored with one PUT (`pipe_file`). An
  object store makes an object visible only when its upload completed (a multipart upload
  that never completes leaves no object), so a writer killed mid-part leaves the run as it
  was: the parts before it, the manifest of the last flush. Readers list the parts
  (LIST is strongly consistent on S3 and GCS), exactly as on a local disk.
- **Manifest.** Written after the parts it counts, with one PUT as well: a reader sees the
  old manifest or the new one, never half of one.
- **One writer per rank** (issue 27 on object storage): `ObjectLock` takes the lock object
  `RUN/.lock` (or `.lock.rank=R`) with a conditional create (`If-None-Match: *`), which the
  store grants to exactly one of several writers. It holds the holder's details and a lease
  expiry; the holder renews the lease at every manifest write and from a small thread every
  third of the lease (so an idle writer keeps it), and a successor takes over a lock whose
  lease ran out (a writer that died without releasing), with a warning. It
  implements `store.lock.RunLock`, so `RunDirectory` uses it as it uses `FileLock`.

`RemoteRunDirectory` and `RemotePartWriter` are the store's two writers with these file
operations swapped in; `rs.record(model, "s3://bucket/run", storage_options={...})` picks
them. fsspec (and s3fs / gcsfs for a cloud) are imported only for such a location.
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from routescope import schema
from routescope.errors import RunFormatError
from routescope.store.lock import LockHolder, _busy, _deadline, acquire_announced
from routescope.store.manifest import MANIFEST_NAME, REQUIRED_KEYS
from routescope.store.part_files import RemoteParts
from routescope.store.rundir import MODES, RunDirectory
from routescope.store.writer import PartWriter

__all__ = ["MODES", "ObjectStore", "RemoteLocation", "part_writer", "run_directory", "run_location"]

LOCAL_PROTOCOLS = ("", "file", "local")
# Seconds a lock object stays valid after its holder last renewed it (at each manifest write).
LEASE_SECONDS = 600.0
POLL_SECONDS = 0.5


def protocol_of(path: str | Path) -> str:
    text = str(path)
    return text.split("://", 1)[0].lower() if "://" in text else ""


def is_remote(path: str | Path) -> bool:
    """True for a URI on a filesystem other than the local disk (s3://, gs://, memory://, ...)."""
    return protocol_of(path) not in LOCAL_PROTOCOLS


def local_path(path: str | Path) -> Path:
    """A local path, with a file:// prefix removed."""
    text = str(path)
    return Path(text[len("file://") :]) if text.startswith("file://") else Path(text)


class ObjectStore:
    """A run's prefix on an fsspec filesystem: keys, listing, whole-object reads and writes."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        try:
            import fsspec
        except ImportError as exc:
            raise ImportError('runs on object storage need fsspec: pip install -e ".[s3]"') from exc
        self.uri = str(uri).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        protocol = self.fs.protocol
        self.protocol = protocol[0] if isinstance(protocol, (tuple, list)) else protocol

    def key(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    @property
    def bucket(self) -> str:
        """The bucket (container) of the prefix: its first path component."""
        return self.root.split("/", 1)[0]

    def missing_bucket(self) -> FileNotFoundError | None:
        """A one-line error naming the bucket when it does not exist (None when it does, or
        when the store cannot tell: then the store's own error stands)."""
        try:
            if self.fs.exists(self.bucket):
                return None
        except Exception:
            return None
        return FileNotFoundError(
            f"bucket {self.bucket!r} of {self.uri} does not exist (or these credentials cannot see it): "
            f"create it first (e.g. `aws s3 mb {self.protocol}://{self.bucket}`) or fix the URI"
        )

    def url(self, key: str) -> str:
        """What DuckDB (given this filesystem) and Spark open: protocol://key."""
        return f"{self.protocol}://{key}"

    def exists(self, *parts: str) -> bool:
        return bool(self.fs.exists(self.key(*parts)))

    def glob(self, pattern: str) -> list[str]:
        return sorted(self.fs.glob(self.key(pattern)))

    def list_parts(self, table: str, rank: str = "*") -> list[str]:
        """Keys of the finished parts of `table` (an unfinished upload is no object at all)."""
        return self.glob(f"{table}/rank={rank}/part-*.parquet")

    def list_tables(self) -> list[str]:
        return sorted(
            {key[len(self.root) + 1 :].split("/", 1)[0] for key in self.glob("*/rank=*/part-*.parquet")}
        )

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.fs.cat_file(self.key(*parts)).decode("utf-8"))

    def put(self, key: str, data: bytes, create_only: bool = False) -> None:
        """One PUT: the object appears whole or not at all. `create_only`: If-None-Match: *."""
        if create_only:
            self.fs.pipe_file(key, data, mode="create")
        else:
            self.fs.pipe_file(key, data)

    def remove(self, keys: list[str]) -> None:
        if keys:
            self.fs.rm(keys)
        self.fs.invalidate_cache()


def read_remote_manifest(store: ObjectStore, name: str = MANIFEST_NAME) -> dict[str, Any]:
    """A manifest object; RunFormatError naming it when missing, broken or without required keys."""
    where = store.url(store.key(name))
    try:
        manifest = store.read_json(name)
    except FileNotFoundError:
        raise RunFormatError(f"{store.uri} is not a routescope run: {where} does not exist") from None
    except ValueError as exc:
        raise RunFormatError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise RunFormatError(f"{where} must hold a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise RunFormatError(f"{where} lacks required keys: {', '.join(missing)}")
    return manifest


class ObjectLock:
    """`store.lock.RunLock` on object storage: a lock object created conditionally, with a lease."""

    def __init__(self, store: ObjectStore, name: str, rank: int = 0, lease: float = LEASE_SECONDS) -> None:
        self.store, self.rank, self.lease = store, rank, lease
        self.key = store.key(name)
        self.path = Path(self.key)
        self._mine: LockHolder | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _keep_alive(self) -> None:
        """Renew the lease every third of it while held: an idle writer (no flush for a while)
        keeps its lock; a dead one stops renewing and its lease runs out."""
        while not self._stop.wait(max(self.lease / 3, 0.05)):
            try:
                self.renew()
            except Exception:
                pass  # the next manifest write renews it too; a store outage must not kill the writer

    def _body(self, holder: LockHolder) -> bytes:
        return json.dumps({**asdict(holder), "expires": time.time() + self.lease}, sort_keys=True).encode()

    def _read(self) -> tuple[LockHolder | None, float]:
        try:
            data = self.store.fs.cat_file(self.key)
        except FileNotFoundError:
            return None, 0.0
        holder = LockHolder.parse(data.decode("utf-8", "replace"))
        try:
            expires = float(json.loads(data).get("expires", 0.0))
        except (ValueError, AttributeError):
            expires = 0.0
        return holder, expires

    def acquire(self, wait: bool | float = False) -> LockHolder | None:
        deadline = _deadline(wait)
        mine = LockHolder.this_process(self.rank)
        taken_over: LockHolder | None = None
        while True:
            try:
                self.store.put(self.key, self._body(mine), create_only=True)
                self._mine = mine
                if self.lease > 0:
                    self._stop.clear()
                    self._renewer = threading.Thread(
                        target=self._keep_alive, name="routescope-lease", daemon=True
                    )
                    self._renewer.start()
                return taken_over
            except FileExistsError:
                pass
            holder, expires = self._read()
            if holder is not None and expires < time.time():
                warnings.warn(
                    f"routescope: taking over the lock of {self.store.uri} from {holder.describe()}: "
                    f"its lease ran out (a writer that stopped without releasing it)",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self.store.remove([self.key])  # the conditional create below still admits one writer
                taken_over = holder
                continue
            if deadline is not None and time.monotonic() >= deadline:
                raise _busy(self.path, holder, waited=bool(wait))
            time.sleep(POLL_SECONDS)

    def renew(self) -> None:
        """Push the lease forward (the holder calls this at every manifest write)."""
        if self._mine is not None:
            self.store.put(self.key, self._body(self._mine))

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        if self._mine is None:
            return
        holder, _ = self._read()
        if holder is not None and holder.token == self._mine.token:
            self.store.remove([self.key])
        self._mine = None

    def holder(self) -> LockHolder | None:
        return self._read()[0]


class RemoteRunDirectory(RunDirectory):
    """`RunDirectory` on object storage: the same rules, keys instead of paths, PUTs instead of renames."""

    def __init__(
        self, uri: str, rank: int = 0, world_size: int = 1, storage_options: dict[str, Any] | None = None
    ) -> None:
        super().__init__(Path(str(uri).split("://", 1)[-1]), rank, world_size)
        self.store = ObjectStore(uri, storage_options)
        self.uri = self.store.uri

    def _lock_name(self, rank: int) -> str:
        return ".lock" if rank == 0 else f".lock.rank={rank}"

    def lock(self, wait: bool | float = False) -> LockHolder | None:
        if self._lock is not None:
            return None
        lock = ObjectLock(self.store, self._lock_name(self.rank), self.rank)
        try:
            previous = acquire_announced(lock, wait, self.store.uri)
        except FileNotFoundError:  # the lock is the first PUT: a missing bucket fails here
            missing = self.store.missing_bucket()
            if missing is None:
                raise
            raise missing from None
        self._lock = lock
        return previous

    def _check_other_ranks_idle(self) -> None:
        for key in self.store.glob(".lock.rank=*"):
            rank = key.rsplit("=", 1)[-1]
            if rank.isdigit() and int(rank) != self.rank:
                other = ObjectLock(self.store, self._lock_name(int(rank)), int(rank))
                other.acquire(wait=False)
                other.release()

    # -- the file operations RunDirectory's shared rules (create, overwrite, append) use --
    @property
    def where(self) -> str:
        return self.uri

    @property
    def _filesystem(self) -> Any:
        return self.store.fs

    def _has_manifest(self) -> bool:
        return self.store.exists(self.manifest_name)

    def _read_own_manifest(self) -> dict[str, Any]:
        return read_remote_manifest(self.store, self.manifest_name)

    def _own_parts(self) -> dict[str, list[Any]]:
        self.store.fs.invalidate_cache()  # another process may have written parts since the last listing
        return {table: self.store.list_parts(table, str(self.rank)) for table in self.store.list_tables()}

    def _make_ready(self) -> None:
        pass  # a key prefix needs no folder

    def remove_run_files(self) -> None:
        ranks = "*" if self.world_size == 1 else str(self.rank)
        tables = set(schema.TABLE_COLUMNS) | set(self.store.list_tables())
        keys = [key for table in tables for key in self.store.glob(f"{table}/rank={ranks}/*")]
        keys += [self.store.key(self.manifest_name)] if self.store.exists(self.manifest_name) else []
        if self.world_size == 1:
            keys += self.store.glob("manifest.rank=*.json")
        self.store.remove(keys)

    def write_manifest(self, manifest: dict[str, Any]) -> Path:
        key = self.store.key(self.manifest_name)
        self.store.put(key, json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"))
        renew = getattr(self._lock, "renew", None)
        if renew is not None:
            renew()
        return Path(key)


class RemotePartWriter(PartWriter):
    """`PartWriter` whose parts are serialised in memory and stored with one PUT each."""

    def __init__(
        self, uri: str, *args: Any, storage_options: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        self.store = ObjectStore(uri, storage_options)
        super().__init__(Path(str(uri).split("://", 1)[-1]), *args, **kwargs)

    def _write_table(self, name: str, table: pa.Table) -> None:
        if name not in self._next_index:
            existing = self.store.list_parts(name, str(self.rank))
            self._next_index[name] = int(existing[-1].rsplit("-", 1)[1].split(".")[0]) + 1 if existing else 0
        key = self.store.key(name, f"rank={self.rank}", f"part-{self._next_index[name]:05d}.parquet")
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **self.parquet_options(table))
        self.store.put(key, sink.getvalue().to_pybytes())
        self._next_index[name] += 1
        self.parts_written.append(Path(key))

    def part_files(self) -> RemoteParts:
        return RemoteParts(self.store)


@dataclass(frozen=True)
class RemoteLocation:
    """A run's URI on object storage with the fsspec options to reach it."""

    uri: str
    storage_options: dict[str, Any] | None = None

    def __str__(self) -> str:
        return self.uri


def run_location(path: str | Path, storage_options: dict[str, Any] | None = None) -> Path | RemoteLocation:
    """Where a writer writes: a local Path (file:// removed), or a `RemoteLocation` for a URI."""
    if is_remote(path):
        return RemoteLocation(str(path), storage_options)
    return local_path(path)


def run_directory(location: Path | RemoteLocation, rank: int = 0, world_size: int = 1) -> RunDirectory:
    """The run directory of a writer, local or on object storage."""
    if isinstance(location, RemoteLocation):
        return RemoteRunDirectory(location.uri, rank, world_size, location.storage_options)
    return RunDirectory(location, rank, world_size)


def part_writer(location: Path | RemoteLocation, **kwargs: Any) -> PartWriter:
    """The background Parquet writer for a run location (`PartWriter`'s keyword arguments)."""
    if isinstance(location, RemoteLocation):
        return RemotePartWriter(location.uri, storage_options=location.storage_options, **kwargs)
    return PartWriter(location, **kwargs)

"""`rs.open_run`: a run directory on the local disk, or a run on object storage by URI.

A URI such as `s3://bucket/runs/x` or `gs://...` opens a `RemoteRun`: the manifest (and
rank fragments) are read as objects, the parts are listed under the prefix and checked
through the run's fsspec filesystem, and DuckDB reads them through that same filesystem
(`register_filesystem`: no DuckDB extension, no credentials of its own). The Spark engine
is handed the part URLs (`s3://` as `s3a://`), which Spark reads with its own Hadoop
configuration. `file://` URIs and plain paths open the local `Run`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from routescope import schema
from routescope.analysis.database import check_parts, views_over_parts
from routescope.analysis.engines import is_spark
from routescope.analysis.quick_check import warn_if_damaged
from routescope.analysis.rollups import covered_parts
from routescope.analysis.run import Run, merge_rank_manifests
from routescope.analysis.run import open_run as open_local_run
from routescope.store.remote import ObjectStore, is_remote, local_path, read_remote_manifest

if TYPE_CHECKING:
    from routescope.analysis.verify import Verification

# Spark's Hadoop filesystem for S3 is s3a; gs and abfs keep their names.
SPARK_SCHEMES = {"s3": "s3a"}


def remote_manifest(store: ObjectStore) -> dict[str, Any]:
    """A run's manifest on object storage, its rank fragments merged (as `merge_rank_manifests`)."""
    store.fs.invalidate_cache()
    fragments = {
        key.rsplit("/", 1)[-1]: store.fs.cat_file(key).decode("utf-8")
        for key in store.glob("manifest.rank=*.json")
    }
    return merge_rank_manifests(Path(store.root), read_remote_manifest(store), fragments)


def spark_url(url: str) -> str:
    """The URL Spark's Hadoop filesystems know the object at `url` by (s3:// is s3a://)."""
    scheme, rest = url.split("://", 1)
    return f"{SPARK_SCHEMES.get(scheme, scheme)}://{rest}"


class RemoteRun(Run):
    """A run on object storage, read in place (see the module docstring)."""

    def __init__(
        self,
        uri: str,
        storage_options: dict[str, Any] | None = None,
        skip_corrupt: bool = False,
        engine: str = "duckdb",
        spark: Any = None,
    ) -> None:
        self.store = ObjectStore(uri, storage_options)
        self.uri = self.store.uri
        self.storage_options = storage_options
        self._registered = False
        super().__init__(Path(self.store.root), skip_corrupt=skip_corrupt, engine=engine, spark=spark)

    def refresh(self) -> RemoteRun:
        self.manifest = remote_manifest(self.store)
        found = {}
        for table in schema.TABLE_COLUMNS:
            good, bad = check_parts(self.store.list_parts(table), self.skip_corrupt, self.store.fs)
            found[table] = ([self._url(k) for k in good], [self._url(k) for k in bad])
        rollups = {}  # rollup tables (analysis/rollups.py): a corrupt part is only skipped
        for table in schema.ROLLUP_TABLES:
            good, bad = check_parts(self.store.list_parts(table), True, self.store.fs)
            rollups[table] = ([self._url(k) for k in good], [self._url(k) for k in bad])
        if is_spark(self.con):
            covering = covered_parts({**found, **rollups}, self._modified)
            self.con.create_views(
                {t: (self._url(self.store.key(t)), good) for t, (good, _) in found.items()},
                self.labels,
                {t: (self._url(self.store.key(t)), good) for t, good in covering.items()},
            )
            self.skipped = [p for _, bad in found.values() for p in bad]
        else:
            if not self._registered:
                self.con.register_filesystem(self.store.fs)
                self._registered = True
            self.skipped = views_over_parts(self.con, {**found, **rollups}, self.labels, self._modified)
        if self.skipped:
            self._mark_skipped()
        return self

    def _modified(self, url: str) -> float:
        """When the object at `url` was written (the coverage rule: a rollup part older than
        its routing part does not count; analysis/rollups.py `covered`)."""
        return self.store.fs.modified(url.split("://", 1)[-1]).timestamp()

    def _url(self, key: str) -> str:
        url = self.store.url(key)
        return spark_url(url) if is_spark(self.con) else url

    def _mark_skipped(self) -> None:
        names = [str(p) for p in self.skipped]
        self.manifest.update(complete=False, skipped_corrupt_parts=names)

    @property
    def tables(self) -> list[str]:
        return self.store.list_tables()

    def has_table(self, table: str) -> bool:
        return bool(self.store.list_parts(table))

    def verify(self) -> Verification:
        """`Run.verify()` on the objects under this run's prefix (analysis/verify.py)."""
        from routescope.analysis.verify import verify_run

        return verify_run(self.uri, self.storage_options)

    def __repr__(self) -> str:
        return f"RemoteRun({self.uri!r}, tokens={self.manifest.get('tokens')})"


def open_run(
    path: str | Path,
    skip_corrupt: bool = False,
    engine: str = "duckdb",
    spark: Any = None,
    storage_options: dict[str, Any] | None = None,
) -> Run:
    """Open a run for analysis: a directory, or a URI (s3://, gs://, file://, ...) with fsspec
    `storage_options`; `engine="spark"` answers the same calls on Spark (equal results).

    FileNotFoundError when there is no run there; RunFormatError (naming the file) when it is
    not a run or holds a corrupt part, unless `skip_corrupt=True`, which reads the rest and lists
    the skipped parts in `Run.skipped` (with a warning; the views then keep only the tokens,
    routing and steps every table still holds, and `run.manifest` says so: docs/reliability.md).
    A run whose cheap invariants fail (a copied part, parts that disagree with the manifest:
    analysis/quick_check.py) opens with a RuntimeWarning naming `routescope check`, and its
    problems in `run.damage`.
    """
    if is_remote(path):
        store = ObjectStore(str(path), storage_options)
        if not store.fs.exists(store.root):
            raise store.missing_bucket() or FileNotFoundError(
                f"no run at {path}: nothing is stored under that prefix"
            )
        run = RemoteRun(str(path), storage_options, skip_corrupt=skip_corrupt, engine=engine, spark=spark)
    else:
        run = open_local_run(local_path(path), skip_corrupt=skip_corrupt, engine=engine, spark=spark)
    warn_if_damaged(run)  # manifests and footers only: a copied part or a wrong count says so at once
    return run

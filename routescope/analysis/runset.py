"""Many runs read as one dataset: `rs.open_runs([...])` or a glob, on either engine; each run a
local directory or a URI on object storage (read as `opening.RemoteRun` reads one).

A fleet writes one run per node or per hour; a week of them is one query here. The runs
must agree on the model (MoE layers, experts, top-k). Every table gains a `run` column (the
run directory's name, or its position when names repeat), and `seq_id` is offset by
`index << RUN_SHIFT` so (seq_id, pos) stays unique across runs (a run's own ids stay below
2**44: rank R starts at R << 40, so up to 16 ranks). Forward steps keep their numbers: a
per-step statistic (aux_loss_step_mean, ep_balancedness_step_mean) pools the runs' steps of
the same number. The manifest is merged like rank fragments: tokens summed, labels united,
`complete` only when every run is complete, and `runs` lists each one.
"""

from __future__ import annotations

import glob as globbing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from routescope import schema
from routescope.analysis.database import check_parts, empty_select
from routescope.analysis.engines import is_spark
from routescope.analysis.opening import remote_manifest, spark_url
from routescope.analysis.run import Run, merge_rank_manifests
from routescope.errors import RunFormatError
from routescope.store.layout import list_parts, list_tables
from routescope.store.manifest import read_manifest
from routescope.store.remote import ObjectStore, is_remote, local_path

RUN_SHIFT = 44
MODEL_KEYS = ("moe_layers", "num_experts", "top_k")


@dataclass
class Member:
    """One run of a set: a local directory, or a prefix on object storage (`store`)."""

    location: str
    store: ObjectStore | None = None

    @property
    def path(self) -> Path:
        return Path(self.store.root) if self.store else local_path(self.location)

    @property
    def name(self) -> str:
        return self.location.rstrip("/").rsplit("/", 1)[-1]

    def manifest(self) -> dict[str, Any]:
        if self.store:
            return remote_manifest(self.store)
        return merge_rank_manifests(self.path, read_manifest(self.path))

    def parts(self, table: str, skip_corrupt: bool) -> tuple[list[str], list[str]]:
        """Checked parts of `table` as paths or URLs an engine opens; and the skipped ones."""
        if self.store is None:
            good, bad = check_parts(list_parts(self.path, table), skip_corrupt)
            return [str(p) for p in good], [str(p) for p in bad]
        good, bad = check_parts(self.store.list_parts(table), skip_corrupt, self.store.fs)
        return [self.store.url(k) for k in good], [self.store.url(k) for k in bad]

    def table_url(self, table: str) -> str:
        return self.store.url(self.store.key(table)) if self.store else str(self.path / table)

    def tables(self) -> list[str]:
        return self.store.list_tables() if self.store else list_tables(self.path)


def run_members(
    paths: str | Path | Iterable[str | Path], storage_options: dict[str, Any] | None = None
) -> list[Member]:
    """The runs named by a list (directories or URIs), or by one glob pattern (sorted)."""
    if isinstance(paths, (str, Path)):
        pattern = str(paths)
        if is_remote(pattern):
            store = ObjectStore(pattern.split("*", 1)[0].rsplit("/", 1)[0] or pattern, storage_options)
            keys = sorted(store.fs.glob(pattern.split("://", 1)[1]))
            found = [Member(store.url(k), ObjectStore(store.url(k), storage_options)) for k in keys]
        else:
            found = [Member(p) for p in sorted(globbing.glob(str(local_path(pattern))))]
        if not found:
            raise FileNotFoundError(f"no run matches {paths}")
        return found
    members = []
    for path in paths:
        if is_remote(path):
            member = Member(str(path), ObjectStore(str(path), storage_options))
            if not member.store.fs.exists(member.store.root):
                raise FileNotFoundError(f"no run at {path}: nothing is stored under that prefix")
        else:
            member = Member(str(path))
            if not member.path.exists():
                raise FileNotFoundError(f"no run at {path}: the path does not exist")
        members.append(member)
    if not members:
        raise ValueError("open_runs needs at least one run directory")
    return members


def run_names(members: list[Member]) -> list[str]:
    names = [m.name for m in members]
    return names if len(set(names)) == len(names) else [str(i) for i in range(len(members))]


def merge_runs(members: list[Member], names: list[str]) -> dict[str, Any]:
    """One manifest for the set; RunFormatError when the runs disagree on the model."""
    manifests = [m.manifest() for m in members]
    first = manifests[0]
    for member, m in zip(members[1:], manifests[1:]):
        for key in MODEL_KEYS:
            if m.get(key) != first.get(key):
                raise RunFormatError(
                    f"{member.location} cannot be read with {members[0].location}: its {key} is "
                    f"{m.get(key)}, not {first.get(key)}"
                )
    labels: list[str] = []
    for m in manifests:
        labels += [name for name in m.get("labels", []) if name not in labels]
    merged = dict(first)
    merged.update(
        tokens=sum(int(m.get("tokens", 0)) for m in manifests),
        steps=sum(int(m.get("steps", 0)) for m in manifests),
        labels=labels,
        complete=all(bool(m.get("complete")) for m in manifests),
        counts_only=any(bool(m.get("counts_only")) for m in manifests),
        runs=[
            {
                "run": name,
                "path": member.location,
                "tokens": int(m.get("tokens", 0)),
                "complete": bool(m.get("complete")),
            }
            for name, member, m in zip(names, members, manifests)
        ],
    )
    return merged


class RunSet(Run):
    """Several runs opened as one Run (see the module docstring)."""

    def __init__(
        self, members: list[Member], skip_corrupt: bool = False, engine: str = "duckdb", spark: Any = None
    ) -> None:
        self.members = members
        self.paths = [m.path for m in members]
        self.names = run_names(members)
        self._filesystems: set[str] = set()
        super().__init__(members[0].path, skip_corrupt=skip_corrupt, engine=engine, spark=spark)

    def refresh(self) -> RunSet:
        self.manifest = merge_runs(self.members, self.names)
        parts: dict[str, list[tuple[int, Member, list[str]]]] = {}
        self.skipped = []
        for table in schema.TABLE_COLUMNS:
            per_run = []
            for index, member in enumerate(self.members):
                good, bad = member.parts(table, self.skip_corrupt)
                self.skipped += [Path(p) for p in bad]
                if good:
                    per_run.append((index, member, good))
            parts[table] = per_run
        if is_spark(self.con):
            _spark_views(self, parts)
        else:
            for member in self.members:  # DuckDB reads object storage through the run's fsspec filesystem
                if member.store and member.store.protocol not in self._filesystems:
                    self.con.register_filesystem(member.store.fs)
                    self._filesystems.add(member.store.protocol)
            _duckdb_views(self, parts)
        return self

    @property
    def tables(self) -> list[str]:
        return sorted({t for m in self.members for t in m.tables()})

    def has_table(self, table: str) -> bool:
        return table in self.tables

    def __repr__(self) -> str:
        return f"RunSet({len(self.members)} runs, tokens={self.manifest.get('tokens')})"


def _columns(table: str, labels: list[str]) -> list[str]:
    cols = list(schema.TABLE_COLUMNS[table])
    if table == schema.TOKENS:
        cols += [*schema.TOKEN_EXTRA_COLUMNS, *labels]
    return cols


def _duckdb_views(runs: RunSet, parts: dict[str, list[tuple[int, Member, list[str]]]]) -> None:
    con = runs.con
    for table, per_run in parts.items():
        if not per_run:
            con.execute(
                f"CREATE OR REPLACE VIEW {table} AS SELECT *, NULL::VARCHAR AS run FROM ({empty_select(table, runs.labels)})"
            )
            continue
        wanted = _columns(table, runs.labels)
        union = None
        for index, _, files in per_run:
            rel = con.read_parquet(files, hive_partitioning=True, union_by_name=True)
            exprs = []
            for col in [*wanted, "rank"]:
                if col == "seq_id" and col in rel.columns:
                    shifted = duckdb.ColumnExpression("seq_id") + duckdb.ConstantExpression(
                        index << RUN_SHIFT
                    )
                    exprs.append(shifted.alias("seq_id"))
                elif col in rel.columns:
                    exprs.append(duckdb.ColumnExpression(col))
                else:
                    default = schema.TOKEN_EXTRA_DEFAULTS.get(col) if table == schema.TOKENS else None
                    exprs.append(duckdb.ConstantExpression(default).cast(_duck_type(table, col)).alias(col))
            exprs.append(duckdb.ConstantExpression(runs.names[index]).alias("run"))
            rel = rel.select(*exprs)
            union = rel if union is None else union.union(rel)
        union.create_view(table, replace=True)


def _duck_type(table: str, col: str) -> Any:
    dtype = schema.TABLE_COLUMNS[table].get(col)
    names = {
        "int64": "BIGINT",
        "int32": "INTEGER",
        "int16": "SMALLINT",
        "int8": "TINYINT",
        "double": "DOUBLE",
    }
    return duckdb.sqltype(names.get(str(dtype), "VARCHAR") if col != "weight" else "REAL")


def _spark_views(runs: RunSet, parts: dict[str, list[tuple[int, Member, list[str]]]]) -> None:
    from pyspark.sql import functions as F

    from routescope.analysis.cluster import missing_filesystem

    session = runs.con.session
    for table, per_run in parts.items():
        if not per_run:
            frame = runs.con.execute(empty_select(table, runs.labels)).frame.withColumn(
                "run", F.lit(None).cast("string")
            )
            frame.createOrReplaceTempView(table)
            continue
        union = None
        for index, member, files in per_run:
            base = spark_url(member.table_url(table)) if member.store else member.table_url(table)
            reader = session.read.option("basePath", base).option("mergeSchema", "true")
            try:
                frame = reader.parquet(*[spark_url(f) if member.store else f for f in files])
            except Exception as exc:  # no hadoop-aws: one line with the recipe (cluster.py)
                clear = missing_filesystem(exc, session, base)
                if clear is None:
                    raise
                raise clear from None
            if "seq_id" in frame.columns:
                frame = frame.withColumn("seq_id", F.col("seq_id") + F.lit(index << RUN_SHIFT))
            if table == schema.TOKENS:
                for col in _columns(table, runs.labels):
                    if col not in frame.columns:
                        frame = frame.withColumn(
                            col, F.lit(schema.TOKEN_EXTRA_DEFAULTS.get(col)).cast("string")
                        )
            frame = frame.withColumn("run", F.lit(runs.names[index]))
            union = frame if union is None else union.unionByName(frame, allowMissingColumns=True)
        union.createOrReplaceTempView(table)
    runs.con.views_changed()


def open_runs(
    paths: str | Path | Iterable[str | Path],
    skip_corrupt: bool = False,
    engine: str = "duckdb",
    spark: Any = None,
    storage_options: dict[str, Any] | None = None,
) -> RunSet:
    """Open many runs (a list of directories or URIs, or a glob such as "runs/node-*" or
    "s3://traces/*/2026-12-0*") as one Run with a `run` column in every table; the same metric
    calls, on DuckDB or `engine="spark"`."""
    return RunSet(run_members(paths, storage_options), skip_corrupt=skip_corrupt, engine=engine, spark=spark)

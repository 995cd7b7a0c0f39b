"""Many runs read as one dataset: `rs.open_runs([...])` or a glob, on either engine.

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
from pathlib import Path
from typing import Any

import duckdb

from routescope import schema
from routescope.analysis.database import check_parts, empty_select
from routescope.analysis.engines import is_spark
from routescope.analysis.run import Run, merge_rank_manifests
from routescope.errors import RunFormatError
from routescope.store.layout import list_parts, list_tables
from routescope.store.manifest import read_manifest

RUN_SHIFT = 44
MODEL_KEYS = ("moe_layers", "num_experts", "top_k")


def run_paths(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """The run directories named by a list, or by a glob pattern (sorted)."""
    if isinstance(paths, (str, Path)):
        found = sorted(Path(p) for p in globbing.glob(str(paths)))
        if not found:
            raise FileNotFoundError(f"no run matches {paths}")
        return found
    out = [Path(p) for p in paths]
    if not out:
        raise ValueError("open_runs needs at least one run directory")
    for path in out:
        if not path.exists():
            raise FileNotFoundError(f"no run at {path}: the path does not exist")
    return out


def run_names(paths: list[Path]) -> list[str]:
    names = [p.name for p in paths]
    return names if len(set(names)) == len(names) else [str(i) for i in range(len(paths))]


def merge_runs(paths: list[Path], names: list[str]) -> dict[str, Any]:
    """One manifest for the set; RunFormatError when the runs disagree on the model."""
    manifests = [merge_rank_manifests(p, read_manifest(p)) for p in paths]
    first = manifests[0]
    for path, m in zip(paths[1:], manifests[1:]):
        for key in MODEL_KEYS:
            if m.get(key) != first.get(key):
                raise RunFormatError(
                    f"{path} cannot be read with {paths[0]}: its {key} is {m.get(key)}, not {first.get(key)}"
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
                "path": str(p),
                "tokens": int(m.get("tokens", 0)),
                "complete": bool(m.get("complete")),
            }
            for name, p, m in zip(names, paths, manifests)
        ],
    )
    return merged


class RunSet(Run):
    """Several run directories opened as one Run (see the module docstring)."""

    def __init__(
        self, paths: list[Path], skip_corrupt: bool = False, engine: str = "duckdb", spark: Any = None
    ) -> None:
        self.paths = paths
        self.names = run_names(paths)
        super().__init__(paths[0], skip_corrupt=skip_corrupt, engine=engine, spark=spark)

    def refresh(self) -> RunSet:
        self.manifest = merge_runs(self.paths, self.names)
        parts = {}
        self.skipped = []
        for table in schema.TABLE_COLUMNS:
            per_run = []
            for index, path in enumerate(self.paths):
                good, bad = check_parts(list_parts(path, table), self.skip_corrupt)
                self.skipped += bad
                if good:
                    per_run.append((index, path, good))
            parts[table] = per_run
        build = _spark_views if is_spark(self.con) else _duckdb_views
        build(self, parts)
        return self

    @property
    def tables(self) -> list[str]:
        return sorted({t for p in self.paths for t in list_tables(p)})

    def has_table(self, table: str) -> bool:
        return any(list_parts(p, table) for p in self.paths)

    def __repr__(self) -> str:
        return f"RunSet({len(self.paths)} runs, tokens={self.manifest.get('tokens')})"


def _columns(table: str, labels: list[str]) -> list[str]:
    cols = list(schema.TABLE_COLUMNS[table])
    if table == schema.TOKENS:
        cols += [*schema.TOKEN_EXTRA_COLUMNS, *labels]
    return cols


def _duckdb_views(runs: RunSet, parts: dict[str, list[tuple[int, Path, list[Path]]]]) -> None:
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
            rel = con.read_parquet([str(p) for p in files], hive_partitioning=True, union_by_name=True)
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


def _spark_views(runs: RunSet, parts: dict[str, list[tuple[int, Path, list[Path]]]]) -> None:
    from pyspark.sql import functions as F

    session = runs.con.session
    for table, per_run in parts.items():
        if not per_run:
            frame = runs.con.execute(empty_select(table, runs.labels)).frame.withColumn(
                "run", F.lit(None).cast("string")
            )
            frame.createOrReplaceTempView(table)
            continue
        union = None
        for index, path, files in per_run:
            frame = session.read.option("basePath", str(path / table)).option("mergeSchema", "true")
            frame = frame.parquet(*[str(p) for p in files])
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
) -> RunSet:
    """Open many run directories (a list, or a glob such as "runs/node-*") as one Run with a
    `run` column in every table; the same metric calls, on DuckDB or `engine="spark"`."""
    return RunSet(run_paths(paths), skip_corrupt=skip_corrupt, engine=engine, spark=spark)

"""The query engines a Run can read with: DuckDB in process (the default) or Spark.

`connect` makes the connection a Run keeps as `run.con`; `build_views` (re)creates the
table views on it. Both engines are fed by the same named SQL (`queries/*.sql`): DuckDB runs
it as written, Spark through `dialect.to_spark` (see `cluster.py`). A run on object storage
is `opening.RemoteRun`, which gives DuckDB its fsspec filesystem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb

from routescope import schema
from routescope.analysis.database import check_parts, create_views
from routescope.analysis.rollups import covered_parts
from routescope.store.layout import list_parts

ENGINES = ("duckdb", "spark")


def connect(engine: str = "duckdb", threads: int | None = None, spark: Any = None) -> Any:
    """A DuckDB connection, or a `SparkConnection` on `spark` / the active / a local session."""
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is not allowed; use one of {', '.join(map(repr, ENGINES))}")
    if engine == "spark":
        from routescope.analysis.cluster import SparkConnection, spark_session

        return SparkConnection(spark_session(spark))
    con = duckdb.connect(":memory:")
    try:
        # DuckDB's own progress bar would print into the caller's terminal or notebook
        con.execute("SET enable_progress_bar = false")
    except duckdb.Error:
        pass  # Jupyter without ipywidgets: DuckDB refuses any progress-bar change (and draws none)
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    return con


def is_spark(con: Any) -> bool:
    return getattr(con, "engine", "duckdb") == "spark"


def build_views(con: Any, run_dir: Path, labels: list[str], skip_corrupt: bool = False) -> list[Path]:
    """(Re)create the table views of a local run on `con`; returns the parts that were skipped."""
    if not is_spark(con):
        return create_views(con, run_dir, labels, skip_corrupt=skip_corrupt)
    skipped: list[Path] = []
    parts: dict[str, tuple[str, list[str]]] = {}
    found = {}
    for table in schema.TABLE_COLUMNS:
        found[table] = check_parts(list_parts(run_dir, table), skip_corrupt)
        skipped += found[table][1]
        parts[table] = (str(Path(run_dir) / table), [str(p) for p in found[table][0]])
    # rollups: a corrupt one is not fatal (metrics read routing), so always skipped
    found.update({t: check_parts(list_parts(run_dir, t), True) for t in schema.ROLLUP_TABLES})
    rollups = {t: (str(Path(run_dir) / t), [str(p) for p in ps]) for t, ps in covered_parts(found).items()}
    con.create_views(parts, labels, rollups)
    return skipped

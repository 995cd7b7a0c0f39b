"""The Spark engine: a run's tables as Spark views, answering the calls the metrics make.

`rs.open_run(path, engine="spark")` gives the Run a `SparkConnection` instead of a DuckDB
connection. The metric functions do not change: they compose the same named queries of
`queries/*.sql` and call `con.execute(sql, params)`; this connection translates each
statement with `dialect.to_spark` (sqlglot, DuckDB -> Spark SQL, parameters bound into the
tree) and runs it on a Spark session. It implements the small part of DuckDB's connection
API that analysis uses: `execute(...).df() / fetchone() / fetchall()`, `from_arrow(t).query`,
and `CREATE TEMP TABLE x AS ...` / `DROP TABLE IF EXISTS x` for the shared-table cache.

Each Run gets its own `SparkSession.newSession()` (same cluster, its own temp views), on
the session passed in, the active one, or a new local one. pyspark is imported here only,
on first use: reading with DuckDB never loads it.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pandas as pd
import pyarrow as pa

from routescope import schema
from routescope.analysis.database import empty_select
from routescope.analysis.dialect import to_spark
from routescope.errors import RouteScopeError

SPARK_HINT = 'the Spark engine needs pyspark and Java 17: pip install -e ".[spark]"'
_CREATE_TEMP = re.compile(r"^\s*CREATE\s+TEMP(?:ORARY)?\s+TABLE\s+(\w+)\s+AS\s+(.*)$", re.I | re.S)
_DROP = re.compile(r"^\s*DROP\s+TABLE\s+IF\s+EXISTS\s+(\w+)\s*$", re.I)
_ARROW_IDS = itertools.count()


class QueryError(RouteScopeError):
    """Spark (or the translation) refused a statement; the message is the engine's."""


# pyspark warns on every pandas conversion under pandas >= 3 (a FutureWarning of its own
# version check, not about anything routescope does); shown once per query it read as ours.
PANDAS3_WARNING = "PySpark does not yet fully support pandas"


def quiet_pyspark() -> contextlib.AbstractContextManager[Any]:
    """A block in which pyspark's pandas >= 3 FutureWarning is not shown (that warning only)."""
    guard = warnings.catch_warnings()

    @contextlib.contextmanager
    def block() -> Iterator[None]:
        with guard:
            warnings.filterwarnings("ignore", message=PANDAS3_WARNING, category=FutureWarning)
            yield

    return block()


def spark_session(spark: Any = None, master: str = "local[*]", conf: Mapping[str, str] | None = None) -> Any:
    """`spark`, else the active SparkSession, else a new one on `master` (default local, no UI,
    Arrow transfers) with `conf` (spark.* settings, e.g. spark.jars.packages) on top. A session
    made here logs at ERROR only: Spark's WARN lines (WindowExec's "No Partition Defined" for
    the metrics' whole-layer windows) are not the user's to act on."""
    if spark is not None:
        return spark
    try:
        from pyspark.sql import SparkSession
    except ImportError as exc:
        raise ImportError(SPARK_HINT) from exc
    warnings.filterwarnings("ignore", message=PANDAS3_WARNING, category=FutureWarning)
    active = SparkSession.getActiveSession()
    if active is not None and not conf:
        return active
    builder = (
        SparkSession.builder.master(master)
        .appName("routescope")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.shuffle.partitions", "8")
        .config("spark.sql.session.timeZone", "UTC")
    )
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    return session


def hadoop_version(session: Any) -> str | None:
    """The Hadoop version of the session's JVM (what a hadoop-aws package must match)."""
    try:
        return str(session.sparkContext._jvm.org.apache.hadoop.util.VersionInfo.getVersion())
    except Exception:
        return None


def missing_filesystem(exc: BaseException, session: Any, url: str) -> RouteScopeError | None:
    """One clear line for Spark's ClassNotFoundException / "No FileSystem for scheme" on an
    object-storage URL (its Hadoop has no S3A filesystem: hadoop-aws is not on the classpath)."""
    text = str(exc)
    if "S3AFileSystem" not in text and "No FileSystem for scheme" not in text:
        return None
    version = hadoop_version(session) or "<the Hadoop version of your Spark>"
    scheme = url.split("://", 1)[0]
    return RouteScopeError(
        f"Spark cannot read {url}: its Hadoop {version} has no filesystem for {scheme}:// (the hadoop-aws "
        f"package is missing). Add it: routescope report ... --engine spark --conf "
        f"spark.jars.packages=org.apache.hadoop:hadoop-aws:{version} (in Python: spark.jars.packages on "
        f"your SparkSession, or spark-submit --packages org.apache.hadoop:hadoop-aws:{version}); "
        "docs/spark_and_object_storage.md has the recipe"
    )


def _errors() -> tuple[type[BaseException], ...]:
    from pyspark.errors import PySparkException
    from sqlglot.errors import SqlglotError

    return (PySparkException, SqlglotError)


def _message(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:500]


class SparkResult:
    """A statement's result, read the way DuckDB's are."""

    def __init__(self, frame: Any) -> None:
        self.frame = frame

    def df(self) -> pd.DataFrame:
        if self.frame is None:
            return pd.DataFrame()
        try:
            with quiet_pyspark():
                return self.frame.toPandas()
        except _errors() as exc:
            raise QueryError(_message(exc)) from None

    def fetchall(self) -> list[tuple[Any, ...]]:
        if self.frame is None:
            return []
        try:
            return [tuple(row) for row in self.frame.collect()]
        except _errors() as exc:
            raise QueryError(_message(exc)) from None

    def to_arrow_table(self) -> pa.Table:
        if self.frame is None:
            return pa.table({})
        try:
            with quiet_pyspark():
                return self.frame.toArrow()
        except _errors() as exc:
            raise QueryError(_message(exc)) from None

    def fetchone(self) -> tuple[Any, ...] | None:
        rows = self.fetchall() if self.frame is None else [tuple(r) for r in self.frame.take(1)]
        return rows[0] if rows else None


class SparkRelation:
    """`con.from_arrow(table).query(name, sql)`: a small in-memory table queried by name."""

    def __init__(self, con: SparkConnection, table: pa.Table) -> None:
        self.con, self.table = con, table

    def query(self, name: str, sql: str) -> SparkResult:
        with quiet_pyspark():
            frame = self.con.session.createDataFrame(self.table.to_pandas())
        frame.createOrReplaceTempView(name)
        return self.con.execute(sql)


class SparkConnection:
    """One Run's Spark session, spoken to like a DuckDB connection (see the module docstring)."""

    engine = "spark"

    def __init__(self, session: Any) -> None:
        self.session = session.newSession()
        self.session.conf.set("spark.sql.execution.arrow.pyspark.enabled", "true")
        self._generation = 0
        self._cached: dict[str, Any] = {}

    # -- the DuckDB calls analysis makes ------------------------------------------------
    def execute(self, sql: str, params: Mapping[str, Any] | Sequence[Any] | None = None) -> SparkResult:
        if params is not None and not isinstance(params, Mapping):
            raise ValueError("the Spark engine binds parameters by name only: pass a dict ($name)")
        drop = _DROP.match(sql)
        if drop:
            self._drop(drop.group(1))
            return SparkResult(None)
        create = _CREATE_TEMP.match(sql)
        try:
            if create:
                # computed now and kept with its lineage cut, so later statements read the result
                # (a lazily cached plan was not matched by the views that read it: they rescanned)
                frame = self.session.sql(to_spark(create.group(2), params)).localCheckpoint(eager=True)
                frame.createOrReplaceTempView(create.group(1))
                self._cached[create.group(1)] = frame
                return SparkResult(None)
            return SparkResult(self.session.sql(to_spark(sql, params)))
        except _errors() as exc:
            raise QueryError(_message(exc)) from None

    def from_arrow(self, table: pa.Table) -> SparkRelation:
        return SparkRelation(self, table)

    def catalog_state(self) -> tuple[Any, ...]:
        """What the shared-table cache keys on: changes whenever the views are rebuilt."""
        return ("spark", self._generation)

    def views_changed(self) -> None:
        """Tell the shared-table cache that the views were rebuilt (runset.py builds its own)."""
        self._generation += 1

    def close(self) -> None:
        for name in list(self._cached):
            self._drop(name)

    def _drop(self, name: str) -> None:
        frame = self._cached.pop(name, None)
        if frame is not None:
            frame.unpersist()
        self.session.catalog.dropTempView(name)

    def has_view(self, name: str) -> bool:
        return bool(self.session.catalog.tableExists(name))

    # -- views over a run's parts ---------------------------------------------------------
    def create_views(
        self,
        parts: Mapping[str, tuple[str, list[str]]],
        labels: list[str],
        rollups: Mapping[str, tuple[str, list[str]]] | None = None,
    ) -> None:
        """One temp view per table: `parts[table]` = (table folder, part files), every rank as
        one dataset with the hive column `rank`; a table without parts is an empty typed view.
        `rollups`: the rollup tables that cover the run (analysis/rollups.py `covered_parts`),
        one view each, as DuckDB's; the others get none, so metrics read routing."""
        for table in schema.TABLE_COLUMNS:
            base, files = parts.get(table, ("", []))
            if not files:
                frame = self.session.sql(to_spark(empty_select(table, labels)))
            else:
                frame = self._read(base, files)
                if table == schema.TOKENS:
                    frame = _with_token_defaults(frame, labels)
            frame.createOrReplaceTempView(table)
        for table in schema.ROLLUP_TABLES:
            self.session.catalog.dropTempView(table)
            base, files = (rollups or {}).get(table, ("", []))
            if files:
                prefixes = ("", schema.ROLLUP_PREVIOUS) if table == schema.ROLLUP_REPETITION else ("",)
                frame = self._read(base, files)
                for prefix in prefixes:
                    frame = _with_token_defaults(frame, labels, prefix)
                frame.createOrReplaceTempView(table)
        self.views_changed()

    def _read(self, base: str, files: list[str]) -> Any:
        reader = self.session.read.option("basePath", base).option("mergeSchema", "true")
        try:
            return reader.parquet(*files)
        except Exception as exc:
            clear = missing_filesystem(exc, self.session, base)
            if clear is None:
                raise
            raise clear from None

    def routing_parts_view(self, name: str, files: list[str], columns: list[str]) -> None:
        """Temp view `name`: `columns` of the routing parts `files`, with each row's part name
        ('rank=R/part-N.parquet') as `part` (the rollup builders group by it)."""
        from pyspark.sql import functions as F

        frame = self.session.read.parquet(*files)
        part = F.regexp_extract(F.col("_metadata.file_path"), r"[^/]+/[^/]+$", 0).alias("part")
        frame.select(*columns, part).createOrReplaceTempView(name)


def _with_token_defaults(frame: Any, labels: list[str], prefix: str = "") -> Any:
    """Parts written before a label or an extra column existed: NULL labels, default extras
    (`prefix`: rollup_repetition's earlier-token columns)."""
    from pyspark.sql import functions as F

    for label in labels:
        if prefix + label not in frame.columns:
            frame = frame.withColumn(prefix + label, F.lit(None).cast("string"))
    for name, value in schema.TOKEN_EXTRA_DEFAULTS.items():
        if prefix + name not in frame.columns:
            frame = frame.withColumn(prefix + name, F.lit(value))
    return frame

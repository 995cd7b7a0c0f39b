"""Rollup tables on the reading side: which runs may answer from them (DuckDB or Spark, local
or on object storage).

A rollup part N summarises routing part N of its rank (store/rollups.py). When a run's views
are built, a rollup table gets its view (`rollup_expert_counts`, ...) only when its parts
cover exactly the routing parts present, none is older than its routing part and nothing was
skipped as corrupt; otherwise it has no view and every metric reads `routing` (slower, same
result). A `where=` is answered from a rollup when it binds over the rollup's dimension
columns alone (step, phase, labels, rank, ...): then it selects whole rollup rows, and the
sums over them equal the counts over the selected tokens. `querying.py` asks `selected_rollup`
and then fills a metric's input counts from its `rollup_*` blocks (queries/rollups.sql) in
place of the `routing_*` ones; the metric's own query is the same. The Spark engine makes the
same views (cluster.py, from `covered_parts`) and runs the same queries translated. Building
missing parts is analysis/rollup_build.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import duckdb

from routescope import schema
from routescope.analysis.runview import RunView as Run
from routescope.errors import RouteScopeError
from routescope.store.part_files import part_name
from routescope.store.rollups import coverage

# seconds since the epoch a part (path or URL) was last written; None: a local path's mtime
Modified = Callable[[Any], float] | None

ROLLUPS = schema.ROLLUP_TABLES
PREV = schema.ROLLUP_PREVIOUS
# CTE name under which a metric query reads the selected rows of each rollup table
SELECTED = {
    schema.ROLLUP_EXPERT_COUNTS: "selected_rollup",
    schema.ROLLUP_TOP1_PAIRS: "selected_pairs",
    schema.ROLLUP_REPETITION: "selected_repetition",
    schema.ROLLUP_COACTIVATION: "selected_coactivation",
}
_ENABLED: ContextVar[bool] = ContextVar("routescope_rollups", default=True)


@contextmanager
def without_rollups() -> Iterator[None]:
    """Metrics inside the block read `routing` even where rollups could answer (tests, checks)."""
    token = _ENABLED.set(False)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def rollups_enabled() -> bool:
    """False inside `without_rollups()` (part of a cached result's key)."""
    return _ENABLED.get()


def rollup_ctes(run: Run, where: str | None, tables: Iterable[str]) -> dict[str, str] | None:
    """CTE name -> SQL of the selected rows of each of `tables`, or None when any cannot answer."""
    if not _ENABLED.get():
        return None
    out = {}
    for table in tables:
        sql = selected_rollup(run, table, where)
        if sql is None:
            return None
        out[SELECTED[table]] = sql
    return out


def covered(found: dict[str, tuple[list[Any], list[Any]]], table: str, modified: Modified = None) -> bool:
    """True when `table`'s parts cover every routing part exactly once (store/rollups.py
    `coverage`), none covers a part that is gone, and none is older than a part it covers
    (`modified` tells the time of a part URL on object storage; local paths use their mtime)."""
    if table not in found or any(found.get(t, ([], []))[1] for t in (table, schema.TOKENS, schema.ROUTING)):
        return False
    routing = {part_name(p): p for p in found[schema.ROUTING][0]}
    rollup = {part_name(p): p for p in found[table][0]}
    if not routing:
        return False
    cover, stale = coverage(list(routing), list(rollup))
    if stale or any(len(c) != 1 for c in cover.values()):
        return False
    for name, (part,) in cover.items():
        mine, theirs = rollup[part], routing[name]
        if modified is not None:
            if modified(mine) < modified(theirs):
                return False
        elif isinstance(mine, Path) and mine.stat().st_mtime < theirs.stat().st_mtime:
            return False
    return True


def covered_parts(
    found: dict[str, tuple[list[Any], list[Any]]], modified: Modified = None
) -> dict[str, list[Any]]:
    """Rollup table -> its parts, for the tables that cover the run (`covered`); the Spark
    engine makes a view of each (cluster.py), DuckDB through `create_rollup_views`."""
    out = {}
    for table in ROLLUPS:
        try:
            if covered(found, table, modified):
                out[table] = found[table][0]
        except FileNotFoundError:
            continue  # a part compacted away meanwhile: read routing
    return out


def create_rollup_views(
    con: duckdb.DuckDBPyConnection,
    found: dict[str, tuple[list[Any], list[Any]]],
    labels: list[str],
    modified: Modified = None,
) -> None:
    """One view per covered rollup table (labels missing from older parts read NULL, the extra
    token columns their default, as in `tokens`); no view for the others."""
    for table in ROLLUPS:
        con.execute(f"DROP VIEW IF EXISTS {table}")
        try:
            if not covered(found, table, modified):
                continue
            _create_rollup_view(con, table, found[table][0], labels)
        except (duckdb.IOException, FileNotFoundError):
            con.execute(f"DROP VIEW IF EXISTS {table}")  # a part compacted away meanwhile: read routing


def _create_rollup_view(
    con: duckdb.DuckDBPyConnection, table: str, parts: list[Any], labels: list[str]
) -> None:
    """The view of one rollup table over its parts (what `create_rollup_views` makes per table)."""
    rel = con.read_parquet([str(p) for p in parts], hive_partitioning=True, union_by_name=True)
    prefixes = [""] + ([PREV] if table == schema.ROLLUP_REPETITION else [])
    added = [
        f'CAST(NULL AS VARCHAR) AS "{p}{lb}"' for p in prefixes for lb in labels if p + lb not in rel.columns
    ]
    added += [
        f"'{value}'::VARCHAR AS {p}{column}"
        for p in prefixes
        for column, value in schema.TOKEN_EXTRA_DEFAULTS.items()
        if p + column not in rel.columns
    ]
    if added:
        rel = rel.project(", ".join(["*", *added]))
    rel.create_view(table, replace=True)


def has_view(run: Run, table: str) -> bool:
    con = run.con
    if getattr(con, "engine", "duckdb") == "spark":
        return bool(con.has_view(table))
    if not hasattr(con, "execute"):
        return False
    try:
        return bool(
            con.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = ?", [table]).fetchone()[0]
        )
    except Exception:
        return False


def dimensions(run: Run, table: str) -> list[str]:
    """The dimension columns `table`'s view shares with `tokens`, plus rank."""
    rollup = [r[0] for r in run.con.execute(f"DESCRIBE {table}").fetchall()]
    tokens = {r[0] for r in run.con.execute("DESCRIBE tokens").fetchall()}
    dims = [c for c in rollup if c in tokens and c not in schema.ROLLUP_NON_DIMENSIONS]
    return dims + (["rank"] if "rank" in rollup else [])


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _names_only(where: str, dims: list[str]) -> bool:
    """True when every column `where` names is one of `dims` (parsed with sqlglot, which the
    Spark engine has loaded; a predicate it cannot parse is left to the probe)."""
    try:
        import sqlglot
        from sqlglot import exp

        tree = sqlglot.parse_one(f"SELECT 1 WHERE {where}", read="duckdb")
    except Exception:
        return True
    return all(column.name in dims for column in tree.find_all(exp.Column))


def selected_rollup(run: Run, table: str, where: str | None) -> str | None:
    """SQL of `table`'s rows that `where` selects, or None when the run cannot answer from it
    (no covering view, or a predicate over columns the rollup does not keep)."""
    if not has_view(run, table):
        return None
    if where is None:
        return f"SELECT * FROM {table}"
    dims = dimensions(run, table)
    if getattr(run.con, "engine", "duckdb") == "spark" and not _names_only(where, dims):
        return None  # decided without a probe: Spark logs a failed one at ERROR in the user's session
    probe = f"SELECT * FROM (SELECT {', '.join(map(_quote, dims))} FROM {table} LIMIT 0) WHERE ({where})"
    try:
        if len(duckdb.extract_statements(probe)) != 1:
            return None
        run.con.execute(probe).fetchall()
    except (duckdb.Error, RouteScopeError):  # RouteScopeError: Spark's QueryError
        return None
    selected = f"SELECT * FROM {table} WHERE ({where})"
    if table != schema.ROLLUP_REPETITION:
        return selected
    # a pair counts when both its tokens are selected: test the earlier token's dimensions too
    own = [d for d in dims if d != "rank"]
    if any(PREV + d not in [r[0] for r in run.con.execute(f"DESCRIBE {table}").fetchall()] for d in own):
        return None
    # the earlier token's columns under the later token's names (EXCLUDE, not REPLACE: Spark
    # has `* EXCEPT` but no `* REPLACE`)
    swap = ", ".join(f"{_quote(PREV + d)} AS {_quote(d)}" for d in own)
    drop = ", ".join(map(_quote, own))
    return f"SELECT * FROM (SELECT * EXCLUDE ({drop}), {swap} FROM ({selected})) WHERE ({where})"


__all__ = ["covered", "create_rollup_views", "part_name", "selected_rollup", "without_rollups"]

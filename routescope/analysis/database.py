"""DuckDB views over the Parquet parts of a run: one view per table, all ranks as one dataset."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq

from routescope import schema
from routescope.analysis.rollups import create_rollup_views
from routescope.analysis.sqlfiles import Cte, compose, get_query
from routescope.errors import RunFormatError
from routescope.store.layout import list_parts

# Tables filtered to one consistent view when a corrupt part was skipped (queries/consistency.sql),
# in the order they are built: tokens first, the others read it.
CONSISTENT = (schema.TOKENS, schema.ROUTING, schema.ROUTER_TOKENS, schema.ROUTER_STATS)

_DUCK_TYPES = {
    "int64": "BIGINT",
    "int32": "INTEGER",
    "int16": "SMALLINT",
    "int8": "TINYINT",
    "float": "REAL",
    "double": "DOUBLE",
    "string": "VARCHAR",
    "bool": "BOOLEAN",
}


def check_parts(
    parts: list[Path], skip_corrupt: bool, filesystem: Any = None
) -> tuple[list[Path], list[Path]]:
    """Read every part's footer; a corrupt or truncated one raises RunFormatError naming it.
    `filesystem`: the fsspec filesystem of a run on object storage (parts are its keys)."""
    good, skipped = [], []
    for part in parts:
        try:
            pq.read_metadata(part, filesystem=filesystem)
        except Exception as exc:
            if not skip_corrupt:
                raise RunFormatError(
                    f"corrupt or truncated Parquet part {part}: {exc} "
                    "(--skip-corrupt on the command line, open_run(..., skip_corrupt=True) in Python, "
                    "reads the rest)"
                ) from exc
            skipped.append(part)
        else:
            good.append(part)
    return good, skipped


def empty_select(table: str, labels: list[str]) -> str:
    """A typed, empty SELECT for a table that has no part yet, so queries still bind."""
    cols = [
        f"CAST(NULL AS {_DUCK_TYPES[str(t)]}) AS {name}" for name, t in schema.TABLE_COLUMNS[table].items()
    ]
    if table == schema.TOKENS:
        cols += [f"CAST(NULL AS VARCHAR) AS {name}" for name in schema.TOKEN_EXTRA_COLUMNS]
        # optional columns too (train_step of an rs.watch run), so a query written for a
        # training run binds before its first part is flushed
        cols += [
            f"CAST(NULL AS {_DUCK_TYPES[str(t)]}) AS {name}"
            for name, t in schema.TOKEN_OPTIONAL_COLUMNS.items()
        ]
        cols += [f'CAST(NULL AS VARCHAR) AS "{label}"' for label in labels]
    cols.append("CAST(NULL AS INTEGER) AS rank")
    return f"SELECT {', '.join(cols)} WHERE false"


def create_views(
    con: duckdb.DuckDBPyConnection, run_dir: Path, labels: list[str], skip_corrupt: bool = False
) -> list[Path]:
    """(Re)create one view per table over its parts; returns the parts that were skipped.

    When a part of tokens, routing, router_tokens or router_stats was skipped, those four views
    keep only the tokens (and steps) every table still holds, so no metric counts a token
    whose routing is gone, or routing whose token is gone (queries/consistency.sql).
    """
    found = {table: check_parts(list_parts(run_dir, table), skip_corrupt) for table in schema.TABLE_COLUMNS}
    # rollups: a corrupt one is not fatal (readers fall back to routing), so always skipped
    found.update({table: check_parts(list_parts(run_dir, table), True) for table in schema.ROLLUP_TABLES})
    return views_over_parts(con, found, labels)


def views_over_parts(
    con: duckdb.DuckDBPyConnection,
    found: dict[str, tuple[list[Any], list[Any]]],
    labels: list[str],
    modified: Any = None,
) -> list[Any]:
    """`create_views` on parts already listed and checked: table -> (good parts, skipped parts),
    each a path or a URL DuckDB can open (a run on object storage; `modified(url)` then tells
    when a part was written, for the rollups' coverage rule). Returns the skipped parts."""
    rollups = {t: found.pop(t) for t in schema.ROLLUP_TABLES if t in found}
    skipped = [part for _, bad in found.values() for part in bad]
    filtered = any(found[table][1] for table in CONSISTENT)
    create_rollup_views(con, {**found, **rollups}, labels, modified)
    for table, (parts, _) in found.items():
        name = f"raw_{table}" if filtered and table in CONSISTENT else table
        _create_view(con, name, table, parts, labels)
    if filtered:
        _consistent_views(con, {table: bool(parts or bad) for table, (parts, bad) in found.items()})
    return skipped


def _consistent_views(con: duckdb.DuckDBPyConnection, present: dict[str, bool]) -> None:
    """`tokens` keeps the tokens every per-token and per-step table still covers; the other
    views of CONSISTENT keep the rows of those tokens and steps (queries/consistency.sql)."""
    source = f"raw_{schema.TOKENS}"
    for index, table in enumerate(t for t in CONSISTENT[1:] if present[t]):
        name = f"raw_tokens_kept_{index}"
        sql = compose(get_query(f"tokens_with_{table}").sql, [Cte("kept_tokens", f"SELECT * FROM {source}")])
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")
        source = name
    con.execute(f"CREATE OR REPLACE VIEW {schema.TOKENS} AS SELECT * FROM {source}")
    for table in CONSISTENT[1:]:
        con.execute(f"CREATE OR REPLACE VIEW {table} AS {get_query(f'consistent_{table}').sql}")


def _create_view(
    con: duckdb.DuckDBPyConnection, name: str, table: str, parts: list[Path], labels: list[str]
) -> None:
    """View `name` over the parts of `table` (typed and empty when there are none)."""
    if not parts:
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {empty_select(table, labels)}")
        return
    rel = con.read_parquet([str(p) for p in parts], hive_partitioning=True, union_by_name=True)
    if table == schema.TOKENS:
        rel = with_token_columns(rel, labels)
    rel.create_view(name, replace=True)


def with_token_columns(rel: duckdb.DuckDBPyRelation, labels: Sequence[str]) -> duckdb.DuckDBPyRelation:
    """Tokens parts read as one relation, with every column a run's tokens table has: parts
    written before a label existed get it as NULL, parts written before the extra columns
    existed get their default (text, decoder)."""
    added = [f'CAST(NULL AS VARCHAR) AS "{label}"' for label in labels if label not in rel.columns]
    added += [
        f"'{value}'::VARCHAR AS {column}"
        for column, value in schema.TOKEN_EXTRA_DEFAULTS.items()
        if column not in rel.columns
    ]
    return rel.project(", ".join(["*", *added])) if added else rel

"""DuckDB views over the Parquet parts of a run: one view per table, all ranks as one dataset."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from routescope import schema
from routescope.errors import RunFormatError
from routescope.store.layout import list_parts

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


def check_parts(parts: list[Path], skip_corrupt: bool) -> tuple[list[Path], list[Path]]:
    """Read every part's footer; a corrupt or truncated one raises RunFormatError naming it."""
    good, skipped = [], []
    for part in parts:
        try:
            pq.read_metadata(part)
        except Exception as exc:
            if not skip_corrupt:
                raise RunFormatError(
                    f"corrupt or truncated Parquet part {part}: {exc} "
                    "(open_run(..., skip_corrupt=True) reads the rest)"
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
        cols += [f'CAST(NULL AS VARCHAR) AS "{label}"' for label in labels]
    cols.append("CAST(NULL AS INTEGER) AS rank")
    return f"SELECT {', '.join(cols)} WHERE false"


def create_views(
    con: duckdb.DuckDBPyConnection, run_dir: Path, labels: list[str], skip_corrupt: bool = False
) -> list[Path]:
    """(Re)create one view per table over its parts; returns the parts that were skipped."""
    skipped: list[Path] = []
    for table in schema.TABLE_COLUMNS:
        parts, bad = check_parts(list_parts(run_dir, table), skip_corrupt)
        skipped += bad
        if not parts:
            con.execute(f"CREATE OR REPLACE VIEW {table} AS {empty_select(table, labels)}")
            continue
        rel = con.read_parquet([str(p) for p in parts], hive_partitioning=True, union_by_name=True)
        if table == schema.TOKENS:
            # Parts written before a label existed lack its column: add it as NULL.
            missing = [label for label in labels if label not in rel.columns]
            added = [f'CAST(NULL AS VARCHAR) AS "{m}"' for m in missing]
            # Parts written before the extra columns existed: their default (text, decoder).
            added += [
                f"'{value}'::VARCHAR AS {name}"
                for name, value in schema.TOKEN_EXTRA_DEFAULTS.items()
                if name not in rel.columns
            ]
            if added:
                rel = rel.project(", ".join(["*", *added]))
        rel.create_view(table, replace=True)
    return skipped

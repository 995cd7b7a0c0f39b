"""Building a run's missing rollup parts (`routescope index`, `Run.build_rollups`, the dashboard's
first open), on the local disk or on object storage, with NumPy or with the named SQL.

Which parts to write: per rollup table, the routing parts it does not cover exactly once with a
part at least as new (`missing_parts`); the parts covering them, and stale ones, go first
(`_clear`). Rollup part N summarises routing part N of its rank, and every part is written whole
(a rename on disk, one PUT on object storage: store/part_files.py), so a build killed halfway
leaves parts that are complete or absent, and the next build writes what is missing.

Two builders compute the same rows:

- `numpy` (default): `store.rollups.part_rollups` on each routing part, the writer's own code;
  one part in memory at a time.
- `sql`: the `rollup_*_rows` blocks of queries/rollups.sql, per rank over groups of up to
  `SQL_CHUNK` missing parts (one query each, grouped by part), on the run's engine: DuckDB as written, Spark translated by `dialect.to_spark`
  (a fleet run: Spark reads the parts on the cluster; the driver receives the rollup rows,
  small by design, and writes one part per routing part in the run's layout).

`rollup_repetition` needs the token before each token, which may sit in another part, so both
builders compute it with its SQL block over the whole rank. The pair tables are then compacted
(store/rollups.py `compact`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from routescope import schema
from routescope.analysis.engines import is_spark
from routescope.analysis.runview import RunView as Run
from routescope.analysis.sqlfiles import Cte, compose, get_query
from routescope.store.part_files import LocalParts, PartFiles, RemoteParts
from routescope.store.rollups import COMPACTED, compact, coverage, dimension_columns, part_rollups

ROLLUPS = schema.ROLLUP_TABLES
PREV = schema.ROLLUP_PREVIOUS
BUILDERS = ("numpy", "sql")
ROUTING_COLUMNS = ["seq_id", "pos", "layer", "slot", "expert"]
INDEX_VIEW = "routescope_index_routing"
# rollup table -> its `*_rows` block in queries/rollups.sql (repetition: see `_build_repetition`)
ROW_QUERIES = {
    schema.ROLLUP_EXPERT_COUNTS: "rollup_expert_counts_rows",
    schema.ROLLUP_TOP1_PAIRS: "rollup_top1_pairs_rows",
    schema.ROLLUP_COACTIVATION: "rollup_coactivation_rows",
}
# routing parts per query of the SQL builder: its result comes back to this process whole
SQL_CHUNK = 8
Progress = Callable[[Iterable[Any], int, str], Iterable[Any]]


def part_files(run: Run) -> PartFiles:
    """The parts of `run` where they live: a local folder or an object-storage prefix."""
    store = getattr(run, "store", None)
    return RemoteParts(store) if store is not None else LocalParts(Path(run.path))


def _files(where: Path | str | PartFiles) -> PartFiles:
    return LocalParts(Path(where)) if isinstance(where, (str, Path)) else where


def missing_parts(where: Path | str | PartFiles) -> dict[str, list[str]]:
    """Per rollup table: the routing parts (rank=R/part-N) it does not cover exactly once with
    a part at least as new. Their covering parts are removed by `build_rollups`."""
    files = _files(where)
    routing = files.parts(schema.ROUTING)
    out = {}
    for table in ROLLUPS:
        have = files.parts(table)
        cover, _ = coverage(list(routing), list(have))
        out[table] = sorted(
            name
            for name, parts in cover.items()
            if len(parts) != 1 or files.modified(have[parts[0]]) < files.modified(routing[name])
        )
    return out


def _clear(files: PartFiles, missing: dict[str, list[str]]) -> None:
    """Remove the rollup parts that cover nothing or cover a part about to be rebuilt (a range
    part goes whole: its other parts are rebuilt with it)."""
    routing = list(files.parts(schema.ROUTING))
    for table in ROLLUPS:
        have = files.parts(table)
        cover, stale = coverage(routing, list(have))
        doomed = set(stale) | {p for name in missing[table] for p in cover[name]}
        files.remove([have[name] for name in sorted(doomed)])
        if doomed:  # parts a removed range part covered must be rebuilt too
            cover, _ = coverage(routing, [n for n in have if n not in doomed])
            missing[table] = sorted(n for n, parts in cover.items() if not parts)


def build_rollups(
    run: Run, force: bool = False, progress: Progress | None = None, builder: str = "numpy"
) -> dict[str, int]:
    """Write the rollup parts `run` lacks (all of them with `force`), local or on object storage;
    returns how many parts of each table were written. `builder`: "numpy" (per part) or "sql"
    (the named SQL per group of parts on the run's engine, DuckDB or Spark). `progress(iterable, total,
    description)` wraps the loop (a tqdm bar on the command line)."""
    if builder not in BUILDERS:
        raise ValueError(f"builder={builder!r} is not allowed; use one of {', '.join(map(repr, BUILDERS))}")
    files = part_files(run)
    missing = missing_parts(files)
    if force:
        every = sorted(files.parts(schema.ROUTING))
        missing = {t: every for t in ROLLUPS}
    _clear(files, missing)
    written = {t: 0 for t in ROLLUPS}
    dims = dimension_columns([c for c in _columns(run, "tokens") if c != "rank"])
    measures = {c for table in schema.ROLLUP_MEASURES.values() for c in table}
    if measures & set(dims) or any(d.startswith(PREV) for d in dims):
        return written  # a label named like a measure column: no rollups, readers use routing
    wrap = progress or (lambda it, total, desc: it)
    counts_todo = sorted(set().union(*(missing[t] for t in ROLLUPS if t != schema.ROLLUP_REPETITION)))
    if builder == "numpy":
        steps: list[tuple[str, Any]] = [("part", name) for name in counts_todo]
    else:
        steps = [
            ("parts", (t, chunk))
            for t in ROW_QUERIES
            for r in _ranks(missing[t])
            for chunk in _chunks([n for n in missing[t] if _rank(n) == r])
        ]
    steps += [("repetition", r) for r in _ranks(missing[schema.ROLLUP_REPETITION])]
    token_cache: dict[int, pa.Table] = {}
    for kind, item in wrap(steps, len(steps), "rollups"):
        if kind == "part":
            _numpy_part(run, files, item, missing, written, token_cache)
        elif kind == "parts":
            table, names = item
            written[table] += _sql_parts(run, files, table, _rank(names[0]), names, dims)
        else:
            names = [n for n in missing[schema.ROLLUP_REPETITION] if _rank(n) == item]
            written[schema.ROLLUP_REPETITION] += _build_repetition(run, files, item, names, dims)
    for table in COMPACTED:
        for rank in _ranks(list(files.parts(table))):
            compact(files, table, rank)
    run.refresh()
    return written


def _chunks(names: list[str]) -> list[list[str]]:
    """`names` in groups of SQL_CHUNK: one query's rollup rows (what the driver receives) stay bounded."""
    return [names[i : i + SQL_CHUNK] for i in range(0, len(names), SQL_CHUNK)]


def _rank(name: str) -> int:
    return int(name.split("/")[0].split("=")[1])


def _ranks(names: Iterable[str]) -> list[int]:
    return sorted({_rank(n) for n in names})


def _columns(run: Run, view: str) -> list[str]:
    return [r[0] for r in run.con.execute(f"DESCRIBE {view}").fetchall() if not str(r[0]).startswith("#")]


def _arrow(run: Run, sql: str, params: dict[str, Any] | None = None) -> pa.Table:
    """The result of `sql` on the run's engine as an Arrow table."""
    if is_spark(run.con):
        return run.con.execute(sql, params).to_arrow_table()
    table = run.con.sql(sql, params=params).to_arrow_table()
    return table if isinstance(table, pa.Table) else table.read_all()


def _numpy_part(
    run: Run,
    files: PartFiles,
    name: str,
    missing: dict[str, list[str]],
    written: dict[str, int],
    token_cache: dict[int, pa.Table],
) -> None:
    """The NumPy builder on one routing part: the writer's `part_rollups`."""
    rank = _rank(name)
    if rank not in token_cache:
        token_cache.clear()
        sql = "SELECT * EXCLUDE (rank) FROM tokens WHERE rank = $rank"
        token_cache[rank] = _arrow(run, sql, {"rank": rank})
    routing = files.read(files.parts(schema.ROUTING)[name], columns=ROUTING_COLUMNS)
    rows = part_rollups(token_cache[rank], routing, coactivation=name in missing[schema.ROLLUP_COACTIVATION])
    for table, data in rows.items():
        if name in missing[table]:
            files.write(table, name, data)
            written[table] += 1


def _routing_view(run: Run, files: PartFiles, names: list[str]) -> None:
    """View INDEX_VIEW: the routing rows of parts `names` with their part name as `part`."""
    routing = files.parts(schema.ROUTING)
    urls = [files.url(routing[n]) for n in names]
    if is_spark(run.con):
        run.con.routing_parts_view(INDEX_VIEW, urls, ROUTING_COLUMNS)
        return
    rel = run.con.read_parquet(urls, filename=True, hive_partitioning=False)
    rel = rel.project(
        ", ".join(ROUTING_COLUMNS) + ", regexp_extract(replace(filename, '\\', '/'), '[^/]+/[^/]+$') AS part"
    )
    rel.create_view(INDEX_VIEW, replace=True)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _token_cte(name: str, columns: list[str], prefix: str = "") -> Cte:
    picked = ", ".join(f"{_quote(c)} AS {_quote(prefix + c)}" for c in columns)
    return Cte(name, f"SELECT seq_id, pos{', ' if picked else ''}{picked} FROM tokens WHERE rank = $rank")


def _typed(run: Run, table: str, rows: pa.Table) -> pa.Table:
    """`rows` with the rollup's column types: dimensions as in tokens, measures as SPEC 3.3."""
    tokens = _arrow(run, "SELECT * EXCLUDE (rank) FROM tokens LIMIT 0").schema
    types = {**{f.name: f.type for f in tokens}, **{PREV + f.name: f.type for f in tokens}}
    types.update(schema.ROLLUP_MEASURES[table])
    return pa.table({c: rows[c].cast(types.get(c, rows.schema.field(c).type)) for c in rows.column_names})


def _write_by_part(run: Run, files: PartFiles, table: str, rows: pa.Table, names: list[str]) -> int:
    """One rollup part per routing part of `names` from the `part` column of `rows` (an empty
    part where it has none: the part's rollup is zero rows, and covers it)."""
    rows = _typed(run, table, rows)
    counted = {c for c, kind in schema.ROLLUP_MEASURES[table].items() if kind == pa.int64()}
    keys = [c for c in rows.column_names if c != "part" and c not in counted]
    for name in names:
        mine = rows.filter(pc.equal(rows["part"], name)).drop(["part"])
        mine = mine.sort_by([(k, "ascending") for k in keys]) if mine.num_rows else mine
        files.write(table, name, mine)
    return len(names)


def _sql_parts(run: Run, files: PartFiles, table: str, rank: int, names: list[str], dims: list[str]) -> int:
    """The SQL builder: `table`'s parts `names` of `rank` from its `*_rows` block, in one query."""
    if not names:
        return 0
    _routing_view(run, files, names)
    pair_dims = [d for d in dims if d not in ("step", schema.TRAIN_STEP)]
    ctes = [
        Cte("index_routing", f"SELECT * FROM {INDEX_VIEW}"),
        _token_cte("index_tokens", dims),
        _token_cte("pair_tokens", pair_dims),
    ]
    sql = compose(get_query(ROW_QUERIES[table]).sql, ctes)
    try:
        rows = _arrow(run, sql, {"rank": rank})
    finally:
        _drop_view(run)
    return _write_by_part(run, files, table, rows, names)


def _drop_view(run: Run) -> None:
    if is_spark(run.con):
        run.con.session.catalog.dropTempView(INDEX_VIEW)
    else:
        run.con.execute(f"DROP VIEW IF EXISTS {INDEX_VIEW}")


def _build_repetition(run: Run, files: PartFiles, rank: int, names: list[str], dims: list[str]) -> int:
    """rollup_repetition parts `names` of `rank`: pairs (previous token, token) of a sequence
    counted in the part that routes the later token, keyed by both tokens' dimensions."""
    if not names:
        return 0
    _routing_view(run, files, sorted(n for n in files.parts(schema.ROUTING) if _rank(n) == rank))
    ctes = [
        Cte("index_routing", f"SELECT * FROM {INDEX_VIEW}"),
        Cte("target_parts", "SELECT unnest($names::VARCHAR[]) AS part"),
        _token_cte("b_tokens", dims),
        _token_cte("a_tokens", dims, PREV),
    ]
    sql = compose(get_query("rollup_repetition_rows").sql, ctes)
    try:
        rows = _arrow(run, sql, {"names": names, "rank": rank})
    finally:
        _drop_view(run)
    return _write_by_part(run, files, schema.ROLLUP_REPETITION, rows, names)


def rollup_bytes(run_dir: Path) -> dict[str, int]:
    """Bytes on disk per table (rollups and routing/tokens), for the cost benchmark."""
    files = LocalParts(run_dir)
    tables = [schema.TOKENS, schema.ROUTING, *ROLLUPS]
    return {t: sum(p.stat().st_size for p in files.parts(t).values()) for t in tables}


__all__ = ["BUILDERS", "build_rollups", "missing_parts", "part_files", "rollup_bytes"]

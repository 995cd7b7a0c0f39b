"""Rollup tables on the reading side: which runs may answer from them, and building them.

A rollup part N summarises routing part N of its rank (store/rollups.py). When a run's views
are built, a rollup table gets its view (`rollup_expert_counts`, ...) only when its parts
cover exactly the routing parts present, none is older than its routing part and nothing was
skipped as corrupt; otherwise it has no view and every metric reads `routing` (slower, same
result). A `where=` is answered from a rollup when it binds over the rollup's dimension
columns alone (step, phase, labels, rank, ...): then it selects whole rollup rows, and the
sums over them equal the counts over the selected tokens. `metrics.py` asks `selected_rollup`;
`build_rollups` (`routescope index`, the dashboard's first open) writes missing parts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from routescope import schema
from routescope.analysis.runview import RunView as Run
from routescope.analysis.sqlfiles import Cte, compose, get_query
from routescope.store.layout import TMP_SUFFIX, list_parts, part_path
from routescope.store.rollups import COMPACTED, compact, coverage, part_rollups

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


def part_name(part: Any) -> str:
    """'rank=R/part-NNNNN.parquet' of a part path or URL."""
    text = str(part).replace("\\", "/")
    return "/".join(text.rsplit("/", 2)[-2:])


def covered(found: dict[str, tuple[list[Any], list[Any]]], table: str) -> bool:
    """True when `table`'s parts cover every routing part exactly once (store/rollups.py
    `coverage`), none covers a part that is gone, and none is older than a part it covers."""
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
        local = rollup[part]
        if isinstance(local, Path) and local.stat().st_mtime < routing[name].stat().st_mtime:
            return False
    return True


def create_rollup_views(
    con: duckdb.DuckDBPyConnection, found: dict[str, tuple[list[Any], list[Any]]], labels: list[str]
) -> None:
    """One view per covered rollup table (labels missing from older parts read NULL, the extra
    token columns their default, as in `tokens`); no view for the others."""
    for table in ROLLUPS:
        con.execute(f"DROP VIEW IF EXISTS {table}")
        try:
            if not covered(found, table):
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
    if getattr(con, "engine", "duckdb") != "duckdb" or not hasattr(con, "execute"):
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


def selected_rollup(run: Run, table: str, where: str | None) -> str | None:
    """SQL of `table`'s rows that `where` selects, or None when the run cannot answer from it
    (no covering view, or a predicate over columns the rollup does not keep)."""
    if not has_view(run, table):
        return None
    if where is None:
        return f"SELECT * FROM {table}"
    dims = dimensions(run, table)
    probe = f"SELECT * FROM (SELECT {', '.join(map(_quote, dims))} FROM {table} LIMIT 0) WHERE ({where})"
    try:
        if len(duckdb.extract_statements(probe)) != 1:
            return None
        run.con.execute(probe).fetchall()
    except duckdb.Error:
        return None
    selected = f"SELECT * FROM {table} WHERE ({where})"
    if table != schema.ROLLUP_REPETITION:
        return selected
    # a pair counts when both its tokens are selected: test the earlier token's dimensions too
    own = [d for d in dims if d != "rank"]
    if any(PREV + d not in [r[0] for r in run.con.execute(f"DESCRIBE {table}").fetchall()] for d in own):
        return None
    swap = ", ".join(f"{_quote(PREV + d)} AS {_quote(d)}" for d in own)
    return f"SELECT * FROM (SELECT * REPLACE ({swap}) FROM ({selected})) WHERE ({where})"


# -- building (routescope index) ---------------------------------------------------------
def _write(table: pa.Table, path: Path, metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def missing_parts(run_dir: Path) -> dict[str, list[str]]:
    """Per rollup table: the routing parts (rank=R/part-N) it does not cover exactly once with
    a part at least as new. Their covering parts are removed by `build_rollups`."""
    routing = {part_name(p): p for p in list_parts(run_dir, schema.ROUTING)}
    out = {}
    for table in ROLLUPS:
        have = {part_name(p): p for p in list_parts(run_dir, table)}
        cover, _ = coverage(list(routing), list(have))
        out[table] = sorted(
            name
            for name, parts in cover.items()
            if len(parts) != 1 or have[parts[0]].stat().st_mtime < routing[name].stat().st_mtime
        )
    return out


def _clear(run_dir: Path, missing: dict[str, list[str]]) -> None:
    """Remove the rollup parts that cover nothing or cover a part about to be rebuilt (a range
    part goes whole: its other parts are rebuilt with it)."""
    routing = [part_name(p) for p in list_parts(run_dir, schema.ROUTING)]
    for table in ROLLUPS:
        have = {part_name(p): p for p in list_parts(run_dir, table)}
        cover, stale = coverage(routing, list(have))
        doomed = set(stale) | {p for name in missing[table] for p in cover[name]}
        for name in doomed:
            have[name].unlink()
        if doomed:  # parts a removed range part covered must be rebuilt too
            cover, _ = coverage(routing, [n for n in have if n not in doomed])
            missing[table] = sorted(n for n, parts in cover.items() if not parts)


def build_rollups(
    run: Run, force: bool = False, progress: Callable[[Iterable[Any], int, str], Iterable[Any]] | None = None
) -> dict[str, int]:
    """Write the rollup parts a local run lacks (all of them with `force`); returns how many
    parts of each table were written. `progress(iterable, total, description)` wraps the loop
    over routing parts (a tqdm bar on the command line)."""
    run_dir = Path(run.path)
    missing = missing_parts(run_dir)
    if force:
        every = sorted(part_name(p) for p in list_parts(run_dir, schema.ROUTING))
        missing = {t: every for t in ROLLUPS}
    _clear(run_dir, missing)
    counts_todo = sorted(set().union(*(missing[t] for t in ROLLUPS if t != schema.ROLLUP_REPETITION)))
    repetition_todo = missing[schema.ROLLUP_REPETITION]
    written = {t: 0 for t in ROLLUPS}
    wrap = progress or (lambda it, total, desc: it)
    token_cache: dict[int, pa.Table] = {}
    steps = [("counts", name) for name in counts_todo] + [("repetition", r) for r in _ranks(repetition_todo)]
    for kind, item in wrap(steps, len(steps), "rollups"):
        if kind == "counts":
            rank = int(item.split("/")[0].split("=")[1])
            if rank not in token_cache:
                token_cache.clear()
                token_cache[rank] = _rank_tokens(run, rank)
            routing = pq.read_table(
                run_dir / schema.ROUTING / item, columns=["seq_id", "pos", "layer", "slot", "expert"]
            )
            rows = part_rollups(
                token_cache[rank], routing, coactivation=item in missing[schema.ROLLUP_COACTIVATION]
            )
            for table, data in rows.items():
                if item in missing[table]:
                    _write(data, run_dir / table / item)
                    written[table] += 1
        else:
            names = [n for n in repetition_todo if n.startswith(f"rank={item}/")]
            written[schema.ROLLUP_REPETITION] += _build_repetition(run, run_dir, item, names)
    for table in COMPACTED:
        for rank in _ranks([part_name(p) for p in list_parts(run_dir, table)]):
            compact(run_dir, table, rank)
    run.refresh()
    return written


def _ranks(names: list[str]) -> list[int]:
    return sorted({int(n.split("/")[0].split("=")[1]) for n in names})


def _rank_tokens(run: Run, rank: int) -> pa.Table:
    """The tokens of one rank as the tokens view shows them (defaults and NULL labels filled)."""
    table = run.con.sql("SELECT * EXCLUDE (rank) FROM tokens WHERE rank = ?", params=[rank]).to_arrow_table()
    return table if isinstance(table, pa.Table) else table.read_all()


def _build_repetition(run: Run, run_dir: Path, rank: int, names: list[str]) -> int:
    """rollup_repetition parts `names` of `rank`: pairs (previous token, token) of a sequence
    counted in the part that routes the later token, keyed by both tokens' dimensions."""
    parts = [str(p) for p in list_parts(run_dir, schema.ROUTING) if part_name(p).startswith(f"rank={rank}/")]
    tokens_cols = [r[0] for r in run.con.execute("DESCRIBE tokens").fetchall()]
    dims = [c for c in tokens_cols if c not in schema.ROLLUP_NON_DIMENSIONS]
    b_cols = ", ".join(_quote(d) for d in dims)
    a_cols = ", ".join(f"{_quote(d)} AS {_quote(PREV + d)}" for d in dims)
    con = run.con
    routing = con.read_parquet(parts, filename=True, hive_partitioning=False)
    routing = routing.project(
        "seq_id, pos, layer, slot, expert, regexp_extract(replace(filename, '\\', '/'), '[^/]+/[^/]+$') AS part"
    )
    routing.create_view("routescope_index_routing", replace=True)
    ctes = [
        Cte("index_routing", "SELECT * FROM routescope_index_routing"),
        Cte("target_parts", "SELECT unnest($names::VARCHAR[]) AS part"),
        Cte("b_tokens", f"SELECT seq_id, pos, {b_cols} FROM tokens WHERE rank = $rank"),
        Cte("a_tokens", f"SELECT seq_id, pos, {a_cols} FROM tokens WHERE rank = $rank"),
    ]
    sql = compose(get_query("rollup_repetition_rows").sql, ctes)
    table = con.sql(sql, params={"names": names, "rank": rank}).to_arrow_table()
    table = table if isinstance(table, pa.Table) else table.read_all()
    con.execute("DROP VIEW IF EXISTS routescope_index_routing")
    by_part = table.group_by("part").aggregate([]) if table.num_rows else None
    present = set(by_part["part"].to_pylist()) if by_part is not None else set()
    empty = table.schema.remove(table.schema.get_field_index("part"))
    for name in names:
        rows = (
            table.filter(pa.compute.equal(table["part"], name)).drop(["part"])
            if name in present
            else empty.empty_table()
        )
        _write(rows, run_dir / schema.ROLLUP_REPETITION / name)
    return len(names)


def rollup_bytes(run_dir: Path) -> dict[str, int]:
    """Bytes on disk per table (rollups and routing/tokens), for the cost benchmark."""
    tables = [schema.TOKENS, schema.ROUTING, *ROLLUPS]
    return {t: sum(p.stat().st_size for p in list_parts(run_dir, t)) for t in tables}


__all__ = ["build_rollups", "create_rollup_views", "missing_parts", "part_path", "selected_rollup"]

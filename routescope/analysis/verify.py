"""Checks a run against SPEC 3.2's invariants: `routescope check RUN` and `Run.verify()`.

A run written by two writers at once (issue 27, before the writer lock) holds repeated
`(seq_id, pos)` keys and a manifest that counts fewer tokens than its parts; a crash between
a part and its manifest update leaves the count behind. `verify_run` finds each kind of
damage and says what it found, so a user can tell whether an old run can be trusted.

It reads the parts itself, in its own in-memory DuckDB, not through `Run`'s views: those
views may hide rows to stay consistent (skipped corrupt parts), and a check must see every
row. The SQL is `queries/verify.sql`; nothing here needs torch. A run on object storage
(`s3://...`) is read through its fsspec filesystem (`store.remote.ObjectStore`), which the
check's DuckDB is given as `rs.open_run` gives it to the Run's (analysis/opening.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from routescope import schema
from routescope.analysis.database import check_parts
from routescope.analysis.sqlfiles import get_query
from routescope.errors import RunFormatError
from routescope.store.layout import list_parts
from routescope.store.lock import describe_lock
from routescope.store.manifest import read_manifest
from routescope.store.remote import ObjectStore, is_remote, local_path, read_remote_manifest
from routescope.store.rollups import coverage

EXAMPLES = 5  # offending keys shown per failed check


@dataclass(frozen=True)
class Finding:
    """One invariant: whether it holds, a sentence saying what was found, and examples."""

    check: str
    ok: bool
    message: str
    count: int = 0  # offending keys or rows (0 when ok)
    examples: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Verification:
    """What `verify_run` found: `ok` when every invariant holds; `notes` never fail a run."""

    path: str
    findings: list[Finding]
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.findings)

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if not f.ok]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "findings": [asdict(f) for f in self.findings],
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        lines = [f"{'ok  ' if f.ok else 'FAIL'}  {f.check}: {f.message}" for f in self.findings]
        lines += [f"note  {note}" for note in self.notes]
        failed = len(self.problems)
        verdict = "every invariant holds" if not failed else f"{failed} of {len(self.findings)} checks failed"
        return "\n".join([*lines, f"{self.path}: {verdict}"])


@dataclass(frozen=True)
class _RunFiles:
    """The files of the run being checked: a local directory, or a prefix on object storage."""

    path: Path  # the directory, or the store's bucket/prefix
    store: ObjectStore | None = None

    @property
    def name(self) -> str:
        return self.store.uri if self.store else str(self.path)

    @property
    def fs(self) -> Any:
        return self.store.fs if self.store else None

    def manifest(self) -> dict[str, Any]:
        return read_remote_manifest(self.store) if self.store else read_manifest(self.path)

    def parts(self, table: str) -> list[str]:
        """All ranks' parts: local paths, or keys of `fs`."""
        return self.store.list_parts(table) if self.store else [str(p) for p in list_parts(self.path, table)]

    def url(self, part: str) -> str:
        return self.store.url(part) if self.store else part

    def relative(self, part: str) -> str:
        return str(Path(part).relative_to(self.path))

    def fragments(self) -> dict[str, str]:
        """manifest.rank=R.json name -> text."""
        if self.store:
            keys = self.store.glob("manifest.rank=*.json")
            return {key.rsplit("/", 1)[-1]: self.store.fs.cat_file(key).decode("utf-8") for key in keys}
        return {p.name: p.read_text(encoding="utf-8") for p in self.path.glob("manifest.rank=*.json")}

    def locks(self) -> list[tuple[str, dict[str, Any] | None]]:
        """(name, holder) of each writer lock file or object."""
        if self.store:
            found = []
            for key in self.store.glob(".lock*"):
                try:
                    found.append((key.rsplit("/", 1)[-1], json.loads(self.store.fs.cat_file(key))))
                except (OSError, ValueError):
                    found.append((key.rsplit("/", 1)[-1], None))
            return found
        return [(p.name, describe_lock(p)) for p in sorted(self.path.glob(".lock*"))]


def verify_run(path: str | Path, storage_options: dict[str, Any] | None = None) -> Verification:
    """Check the run at `path`, a directory or a URI (s3://, gs://, ...; fsspec `storage_options`).
    FileNotFoundError / RunFormatError when it is not a run at all; damage inside a run
    (corrupt parts, repeated keys, wrong counts) is reported, not raised."""
    if is_remote(path):
        store = ObjectStore(str(path), storage_options)
        store.fs.invalidate_cache()
        if not store.fs.exists(store.root):
            raise FileNotFoundError(f"no run at {path}: nothing is stored under that prefix")
        files = _RunFiles(Path(store.root), store)
    else:
        files = _RunFiles(local_path(path))
        if not files.path.exists():
            raise FileNotFoundError(f"no run at {files.path}: the path does not exist")
    manifest = files.manifest()
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET enable_progress_bar = false")
    except duckdb.Error:
        pass
    try:
        if files.store:
            con.register_filesystem(files.fs)
        corrupt = _create_views(con, files, manifest)
        return _Checker(con, files, manifest, corrupt).run()
    finally:
        con.close()


def _create_views(con: duckdb.DuckDBPyConnection, files: _RunFiles, manifest: dict[str, Any]) -> list[str]:
    """check_tokens, check_routing and check_layers; returns the parts that cannot be read."""
    corrupt: list[str] = []
    for table, view in ((schema.TOKENS, "check_tokens"), (schema.ROUTING, "check_routing")):
        parts, bad = check_parts(files.parts(table), True, files.fs)
        corrupt += bad
        if not parts:
            cols = {"seq_id": "BIGINT", "pos": "INTEGER", "rank": "INTEGER"}
            cols.update(
                {"stack": "VARCHAR"}
                if table == schema.TOKENS
                else {"layer": "SMALLINT", "slot": "TINYINT", "expert": "SMALLINT"}
            )
            select = ", ".join(f"CAST(NULL AS {t}) AS {c}" for c, t in cols.items())
            con.execute(f"CREATE VIEW {view} AS SELECT {select} WHERE false")
            continue
        rel = con.read_parquet([files.url(p) for p in parts], hive_partitioning=True, union_by_name=True)
        if table == schema.TOKENS and "stack" not in rel.columns:
            rel = rel.project(f"*, '{schema.TOKEN_EXTRA_DEFAULTS['stack']}'::VARCHAR AS stack")
        rel.create_view(view)
    stacks = manifest.get("stacks") or {}
    rows = []
    for layer in manifest.get("moe_layers", []):
        key = str(layer)
        owner = next((name for name, (lo, hi) in stacks.items() if lo <= int(layer) < hi), None)
        rows.append(
            {
                "layer": int(layer),
                "num_experts": int(manifest["num_experts"][key]),
                "top_k": int(manifest["top_k"][key]),
                "stack": owner,
            }
        )
    layers = pd.DataFrame(rows, columns=["layer", "num_experts", "top_k", "stack"])
    layers = layers.astype({"layer": "int64", "num_experts": "int64", "top_k": "int64", "stack": "object"})
    con.register("check_layers_df", layers)
    con.execute("CREATE VIEW check_layers AS SELECT * FROM check_layers_df")
    return corrupt


class _Checker:
    def __init__(
        self, con: duckdb.DuckDBPyConnection, files: _RunFiles, manifest: dict[str, Any], corrupt: list[str]
    ) -> None:
        self.con, self.files, self.manifest, self.corrupt = con, files, manifest, corrupt
        self.ranks = _rank_manifests(files, manifest)
        self.notes: list[str] = []

    def run(self) -> Verification:
        checks: list[Callable[[], Finding]] = [
            self.parts_readable,
            self.unique_token_keys,
            self.unique_routing_keys,
            self.k_rows_per_token,
            self.routing_has_tokens,
            self.routing_in_range,
            self.manifest_counts,
            self.next_seq_id,
            self.rollups_match,
        ]
        findings = [check() for check in checks]
        self._add_notes()
        return Verification(self.files.name, findings, self.notes)

    # -- helpers -----------------------------------------------------------------------
    def _offending(self, name: str, count_sql: str) -> tuple[int, int, list[dict[str, Any]]]:
        """(offending keys, `count_sql` summed over them, examples) of named query `name`; the
        offending rows are kept once in a temporary table, so the query runs once."""
        self.con.execute(f"CREATE OR REPLACE TEMP TABLE offending AS {get_query(name).sql}")
        n, total = self.con.execute(f"SELECT count(*), coalesce({count_sql}, 0) FROM offending").fetchone()
        examples = self.con.execute(f"SELECT * FROM offending ORDER BY ALL LIMIT {EXAMPLES}").df()
        return int(n), int(total), _records(examples)

    # -- the invariants ----------------------------------------------------------------
    def parts_readable(self) -> Finding:
        if not self.corrupt:
            return Finding("parts_readable", True, "every tokens and routing part reads")
        names = [self.files.relative(p) for p in self.corrupt]
        return Finding(
            "parts_readable",
            False,
            f"{len(names)} corrupt or truncated part(s), left out of the other checks: {', '.join(names)}",
            len(names),
            [{"part": n} for n in names[:EXAMPLES]],
        )

    def unique_token_keys(self) -> Finding:
        keys, copies, examples = self._offending("verify_duplicate_token_keys", "sum(copies)")
        if not keys:
            return Finding("unique_token_keys", True, "no (seq_id, pos) appears twice in tokens")
        return Finding(
            "unique_token_keys",
            False,
            f"{keys:,} (seq_id, pos) keys appear more than once in tokens ({copies - keys:,} extra rows); "
            "two writers appended at once, and every metric counts those tokens twice",
            keys,
            examples,
        )

    def unique_routing_keys(self) -> Finding:
        keys, copies, examples = self._offending("verify_duplicate_routing_keys", "sum(copies)")
        if not keys:
            return Finding(
                "unique_routing_keys", True, "no (seq_id, pos, layer, slot) appears twice in routing"
            )
        return Finding(
            "unique_routing_keys",
            False,
            f"{keys:,} (seq_id, pos, layer, slot) keys appear more than once in routing "
            f"({copies - keys:,} extra rows)",
            keys,
            examples,
        )

    def k_rows_per_token(self) -> Finding:
        if self.manifest.get("counts_only"):
            return Finding("k_rows_per_token", True, "counts-only run: no per-token rows to check")
        pairs, _, examples = self._offending("verify_routing_rows_per_token", "sum(rows)")
        if not pairs:
            return Finding(
                "k_rows_per_token", True, "every token has exactly top_k routing rows in every MoE layer"
            )
        return Finding(
            "k_rows_per_token",
            False,
            f"{pairs:,} (token, MoE layer) pairs do not have exactly top_k routing rows",
            pairs,
            examples,
        )

    def routing_has_tokens(self) -> Finding:
        keys, rows, examples = self._offending("verify_routing_without_token", "sum(copies)")
        if not keys:
            return Finding("routing_has_tokens", True, "every routing row has its tokens row")
        return Finding(
            "routing_has_tokens",
            False,
            f"{rows:,} routing rows of {keys:,} (seq_id, pos) keys have no tokens row",
            keys,
            examples,
        )

    def routing_in_range(self) -> Finding:
        groups, rows, examples = self._offending("verify_routing_out_of_range", "sum(copies)")
        if not groups:
            return Finding(
                "routing_in_range", True, "every routing row is in a recorded MoE layer, slot < k, expert < E"
            )
        return Finding(
            "routing_in_range",
            False,
            f"{rows:,} routing rows have a layer outside moe_layers, a slot >= top_k or an expert >= num_experts",
            rows,
            examples,
        )

    def _per_rank(self) -> pd.DataFrame:
        return self.con.execute(get_query("verify_tokens_per_rank").sql).df()

    def manifest_counts(self) -> Finding:
        if self.manifest.get("counts_only"):
            return Finding("manifest_counts", True, "counts-only run: its token count is an estimate")
        found = {int(r.rank): int(r.tokens) for r in self._per_rank().itertuples()}
        said = {rank: int(m.get("tokens", 0)) for rank, m in self.ranks.items()}
        wrong = [
            {"rank": rank, "manifest_tokens": said.get(rank, 0), "token_rows": found.get(rank, 0)}
            for rank in sorted(set(said) | set(found))
            if said.get(rank, 0) != found.get(rank, 0)
        ]
        total = sum(found.values())
        if not wrong:
            return Finding("manifest_counts", True, f"the manifest's {total:,} tokens equal the token rows")
        lines = "; ".join(
            f"rank {w['rank']}: manifest {w['manifest_tokens']:,}, parts {w['token_rows']:,}" for w in wrong
        )
        return Finding(
            "manifest_counts",
            False,
            f"the manifest's token count disagrees with the parts ({lines})",
            len(wrong),
            wrong,
        )

    def next_seq_id(self) -> Finding:
        """Each rank's `next_seq_id` must lie above its ids, or the next append repeats them."""
        said = {rank: int(m["next_seq_id"]) for rank, m in self.ranks.items() if "next_seq_id" in m}
        wrong = [
            {"rank": int(r.rank), "next_seq_id": said[int(r.rank)], "max_seq_id": int(r.max_seq_id)}
            for r in self._per_rank().itertuples()
            if int(r.rank) in said and int(r.max_seq_id) >= said[int(r.rank)]
        ]
        if not wrong:
            return Finding("next_seq_id", True, "an append would start above every recorded seq_id")
        return Finding(
            "next_seq_id",
            False,
            "next_seq_id in the manifest is not above the recorded seq_ids, so an append would repeat them",
            len(wrong),
            wrong,
        )

    def rollups_match(self) -> Finding:
        """Rollup parts (SPEC 3.3) hold the counts of the routing part of the same name; a routing
        part without them is a note (readers use routing), a rollup that disagrees a failure."""
        routing = {_part_name(p): p for p in self.files.parts(schema.ROUTING) if p not in self.corrupt}
        counts = {_part_name(p): p for p in self.files.parts(schema.ROLLUP_EXPERT_COUNTS)}
        if not any(self.files.parts(t) for t in schema.ROLLUP_TABLES):
            self.notes.append(
                "no rollup tables: `routescope index RUN` builds them (metrics read routing meanwhile)"
            )
            return Finding("rollups_match", True, "no rollups to check")
        lacking, stale = set(), []
        for table in schema.ROLLUP_TABLES:
            cover, gone = coverage(list(routing), [_part_name(p) for p in self.files.parts(table)])
            lacking |= {n for n, parts in cover.items() if len(parts) != 1}
            stale += [f"{table}/{n}" for n in gone]
        lacking = sorted(lacking)
        if lacking:
            self.notes.append(
                f"{len(lacking)} routing part(s) are not covered once by each rollup table ({', '.join(lacking[:EXAMPLES])}"
                f"{', ...' if len(lacking) > EXAMPLES else ''}): `routescope index RUN` builds them"
            )
        common = sorted(set(routing) & set(counts))
        wrong: list[dict[str, Any]] = []
        for name in common:
            raw = f"SELECT layer, expert, count(*) AS n FROM read_parquet('{_sql_text(routing[name], self.files)}') GROUP BY ALL"
            rolled = (
                "SELECT layer, expert, sum(tokens) AS n "
                f"FROM read_parquet('{_sql_text(counts[name], self.files)}') GROUP BY ALL"
            )
            diff = self.con.execute(f"({raw} EXCEPT {rolled}) UNION ALL ({rolled} EXCEPT {raw})").fetchall()
            if diff:
                wrong.append({"part": name, "cells": len(diff)})
        wrong += [{"part": n, "cells": "no routing part"} for n in stale]
        if not wrong:
            return Finding(
                "rollups_match", True, f"the rollups of {len(common)} routing part(s) match their counts"
            )
        names = ", ".join(w["part"] for w in wrong[:EXAMPLES])
        return Finding(
            "rollups_match",
            False,
            f"{len(wrong)} rollup part(s) disagree with routing ({names}): rebuild them with "
            "`routescope index --force RUN`",
            len(wrong),
            wrong[:EXAMPLES],
        )

    def _add_notes(self) -> None:
        if not all(m.get("complete", False) for m in self.ranks.values()):
            self.notes.append(
                "the manifest says complete: false (still being written, or its writer stopped early): "
                "counts may lag the parts while a writer is running"
            )
        for name, holder in self.files.locks():
            who = (
                f"pid {holder['pid']} on {holder['host']} since {holder['started_at']}"
                if holder
                else "unknown"
            )
            self.notes.append(f"writer lock {name} names {who} (a writer is running, or one died)")


def _rank_manifests(files: _RunFiles, manifest: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """rank -> its manifest: manifest.json (rank 0) and each manifest.rank=R.json; a rank of
    `world_size` that left none counts as an empty, incomplete one."""
    ranks = {int(manifest.get("rank", 0) or 0): manifest}
    for fragment, text in files.fragments().items():
        try:
            data = json.loads(text)
            ranks[int(data["rank"])] = data
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RunFormatError(f"{files.name}/{fragment} is not a valid rank manifest: {exc}") from exc
    for rank in range(int(manifest.get("world_size", 1) or 1)):
        ranks.setdefault(rank, {"tokens": 0, "complete": False})
    return ranks


def _sql_text(part: str, files: _RunFiles) -> str:
    """A part's path or URL as a SQL string literal body (read_parquet takes no bound list here)."""
    return files.url(part).replace("'", "''")


def _part_name(part: str) -> str:
    """'<table-free> rank=R/part-NNNNN.parquet' of a part path or key."""
    return "/".join(str(part).replace("\\", "/").rsplit("/", 2)[-2:])


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [
        {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()} for row in df.to_dict("records")
    ]

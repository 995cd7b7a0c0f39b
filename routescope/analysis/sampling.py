"""A bounded sample of a run's routing: whole routing parts, evenly spaced, for the few
dashboard figures no rollup can answer (pathways need every token's path; co-activation
under a step filter needs pairs per step, which `rollup_coactivation` does not keep).

`choose_parts` picks routing parts up to a row budget: every part when the run (or the
parts holding the selected tokens) fits, else parts at evenly spaced positions among the
candidates (a systematic sample, so early and late recording both count). `SampledRun`
opens the run with its `routing` view over those parts only (every other table whole, no
rollup views), so any metric run on it is the exact metric of the sampled tokens. The
reader says how much was read (`PartSample.describe`). Local DuckDB runs only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from routescope import schema
from routescope.analysis.database import views_over_parts, with_token_columns
from routescope.analysis.querying import rollup_twin
from routescope.analysis.rollups import part_name
from routescope.analysis.run import Run, merge_rank_manifests
from routescope.store.layout import list_parts
from routescope.store.manifest import read_manifest


@dataclass(frozen=True)
class PartSample:
    """Which routing parts a sample reads, and how much of the run (or selection) that is."""

    parts: tuple[str, ...]  # 'rank=R/part-N.parquet', in run order
    rows: int  # routing rows in the sampled parts
    total_rows: int  # routing rows in every candidate part
    total_parts: int  # candidate parts (those that may hold selected tokens)

    @property
    def complete(self) -> bool:
        return len(self.parts) == self.total_parts

    def describe(self) -> str:
        if self.complete:
            return f"all {self.total_rows:,} routing rows"
        return (
            f"a sample: {len(self.parts)} of {self.total_parts} recording parts, evenly spaced "
            f"({self.rows:,} of {self.total_rows:,} routing rows, {self.rows / max(self.total_rows, 1):.0%})"
        )


def can_sample(run: Any) -> bool:
    """Only a local run read by DuckDB (not object storage, not Spark, not a run set)."""
    return type(run) is Run and run.engine == "duckdb"


def answers_from_rollups(run: Run, name: str, where: str | None = None) -> bool:
    """True when metric query `name` under `where` reads the run's rollups, not routing."""
    return rollup_twin(run, name, where) is not None


def part_rows(run_dir: Path) -> dict[str, int]:
    """Routing rows per routing part, from the footers."""
    return {part_name(p): pq.read_metadata(p).num_rows for p in list_parts(run_dir, schema.ROUTING)}


def candidate_parts(run: Run, where: str | None, params: list[Any] | None = None) -> list[str]:
    """Routing parts that may hold tokens `where` selects: those whose tokens part of the same
    name has one (the writer flushes a step's tokens and routing under one part name). A
    routing part without such a tokens part stays a candidate."""
    names = list(part_rows(run.path))
    if where is None:
        return names
    tokens = [p for p in list_parts(run.path, schema.TOKENS)]
    if not tokens:
        return names
    rel = run.con.read_parquet(
        [str(p) for p in tokens], filename=True, hive_partitioning=True, union_by_name=True
    )
    rel = with_token_columns(rel, run.labels)
    view = "routescope_sampling_tokens"
    rel.create_view(view, replace=True)
    try:
        rows = run.con.execute(
            f"SELECT filename, count(*) FILTER (WHERE ({where})) FROM {view} GROUP BY filename", params or []
        ).fetchall()
    finally:
        run.con.execute(f"DROP VIEW IF EXISTS {view}")
    selected = {part_name(f): n for f, n in rows}
    return [n for n in names if selected.get(n, 1) > 0]


def choose_parts(
    run: Run, max_rows: int, where: str | None = None, params: list[Any] | None = None
) -> PartSample:
    """Evenly spaced candidate parts whose routing rows sum to at most `max_rows` (at least one)."""
    rows = part_rows(run.path)
    names = candidate_parts(run, where, params)
    total = sum(rows[n] for n in names)
    if total <= max_rows or len(names) <= 1:
        return PartSample(tuple(names), total, total, len(names))
    mean = total / len(names)
    count = max(1, min(len(names), int(max_rows // max(mean, 1))))
    while True:
        picked = [names[int((i + 0.5) * len(names) / count)] for i in range(count)]
        read = sum(rows[n] for n in picked)
        if read <= max_rows or count == 1:
            return PartSample(tuple(picked), read, total, len(names))
        count -= 1


class SampledRun(Run):
    """`run` with its `routing` view over the parts of `sample` only; every other table whole
    and no rollup views, so metrics on it read the sampled routing rows."""

    def __init__(self, run: Run, sample: PartSample) -> None:
        self.sample = sample
        super().__init__(run.path, skip_corrupt=run.skip_corrupt)

    def refresh(self) -> SampledRun:
        self.manifest = merge_rank_manifests(self.path, read_manifest(self.path))
        chosen = set(self.sample.parts)
        found: dict[str, tuple[list[Any], list[Any]]] = {
            table: (list_parts(self.path, table), []) for table in schema.TABLE_COLUMNS
        }
        found[schema.ROUTING] = ([p for p in found[schema.ROUTING][0] if part_name(p) in chosen], [])
        self.skipped = views_over_parts(self.con, found, self.labels)
        return self


__all__ = ["PartSample", "SampledRun", "answers_from_rollups", "can_sample", "choose_parts"]

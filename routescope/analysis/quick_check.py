"""The cheap invariants of a run, read from manifests and Parquet footers only: `quick_check`.

`routescope check` (verify.py) reads every row and is the judge; this is the smoke alarm that
`rs.open_run` (a warning), `report` (a banner), the dashboard (a banner) and the doctor run on
every open, so a damaged run is never reported as if it were healthy. It reads no row, only
each part's footer (the row count and the column statistics the writer stored), so it costs
the same on 100 million rows as on a thousand:

- **copied parts**: two parts of one table with the same row count and the same min/max of
  every column in every row group hold the same rows (a part copied under a new name, or a
  part written twice); real parts of one run never agree on all of that;
- **parts against the manifest**: on a complete run, each rank's `tokens` rows (summed from
  the footers) must equal the tokens its manifest counts. While a run is written (or after a
  crash) the parts may run ahead of the manifest, so an incomplete run is not judged here.

Each problem is one sentence; `routescope check RUN` names every failed invariant.
"""

from __future__ import annotations

import re
import warnings
from collections import defaultdict
from typing import Any

import pyarrow.parquet as pq

from routescope import schema
from routescope.store.layout import list_parts

# `run` below is an analysis.run.Run (or RemoteRun); not imported: run.py calls this module.
Run = Any

_RANK = re.compile(r"rank=(\d+)")


def quick_check(run: Run) -> list[str]:
    """Problems found in `run` from its manifest and part footers (empty: none found)."""
    fs = getattr(getattr(run, "store", None), "fs", None)
    problems: list[str] = []
    token_rows: dict[int, int] = defaultdict(int)
    for table in (schema.TOKENS, schema.ROUTING):
        seen: dict[tuple[Any, ...], str] = {}
        for part in _parts(run, table):
            try:
                meta = pq.read_metadata(part, filesystem=fs)
            except Exception:
                continue
            name = _relative(run, part)
            if table == schema.TOKENS:
                token_rows[_rank_of(name)] += meta.num_rows
            key = _fingerprint(meta)
            if key in seen:
                problems.append(
                    f"{name} holds the same rows as {seen[key]} (a copied part: rows counted twice)"
                )
            else:
                seen[key] = name
    problems += _count_problems(run, token_rows)
    return problems


def warn_if_damaged(run: Run, stacklevel: int = 3) -> list[str]:
    """`quick_check(run)`, kept as `run.damage`; a RuntimeWarning (the caller of `open_run` by
    default) when it finds something."""
    problems = quick_check(run)
    run.damage = problems
    if problems:
        where = getattr(run, "uri", None) or str(run.path)
        warnings.warn(f"routescope: {damage_message(where, problems)}", RuntimeWarning, stacklevel=stacklevel)
    return problems


def damage_message(where: str, problems: list[str]) -> str:
    """One line for a warning or a banner: what is wrong and what to run."""
    return (
        f"{where} looks damaged: {'; '.join(problems)}. Its numbers cannot be trusted; "
        f"`routescope check {where}` lists every failed invariant"
    )


def _count_problems(run: Run, token_rows: dict[int, int]) -> list[str]:
    m = run.manifest
    if m.get("counts_only") or not m.get("complete") or getattr(run, "skipped", None):
        return []  # estimated counts; a run still written; skipped parts already said PARTIAL
    ranks = m.get("ranks") or [{"rank": int(m.get("rank", 0) or 0), "tokens": m.get("tokens", 0)}]
    said = {int(r["rank"]): int(r.get("tokens", 0)) for r in ranks}
    return [
        f"rank {rank}'s tokens parts hold {token_rows.get(rank, 0):,} rows but its manifest counts "
        f"{said.get(rank, 0):,} tokens"
        for rank in sorted(set(said) | set(token_rows))
        if token_rows.get(rank, 0) != said.get(rank, 0)
    ]


def _parts(run: Run, table: str) -> list[Any]:
    store = getattr(run, "store", None)
    if store is not None:
        return list(store.list_parts(table))
    return list(list_parts(run.path, table))


def _relative(run: Run, part: Any) -> str:
    text, root = str(part), str(run.path)
    return text[len(root) + 1 :] if text.startswith(root + "/") else text


def _rank_of(name: str) -> int:
    found = _RANK.search(name)
    return int(found.group(1)) if found else 0


def _fingerprint(meta: pq.FileMetaData) -> tuple[Any, ...]:
    """Row count plus every column chunk's (rows, min, max): equal only for equal contents."""
    chunks: list[Any] = [meta.num_rows]
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            stats = group.column(c).statistics
            if stats is not None and stats.has_min_max:
                chunks.append((g, c, stats.num_values, stats.min, stats.max))
            else:
                chunks.append((g, c, group.column(c).total_compressed_size))
    return tuple(chunks)

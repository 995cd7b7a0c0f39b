"""Rollup rows of one routing part (SPEC 3.3 `rollup_*`), computed with NumPy from host arrays.

The writer sums the rows of a part from its recorded steps' own counts (store/step_rollups.py,
the same rows); it calls `part_rollups` on the tokens and routing it is about to write when the
steps bring none (or cannot describe the part alone), on a second thread while it writes the
routing part, and writes each result as
`rollup_<name>/rank=R/part-NNNNN.parquet` with the routing part's number: rollup part N summarises routing part N, so a reader knows which parts its
rollups cover by their names alone (analysis/rollups.py), a crash leaves at worst a routing part
without its rollup (readers then fall back to `routing`; `check` names it), and append and
ranks follow the parts. `routescope index` calls the same function on the parts of runs that
lack rollups (imported or older runs).

Every rollup row is keyed by the token's *dimensions*: every `tokens` column except seq_id,
pos and token_id (step, phase, modality, stack, train_step when present, the labels), so a
`where=` over those columns selects whole rollup rows and gives the same counts as over tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from routescope import schema
from routescope.store.pair_totals import PairTotals
from routescope.store.part_files import LocalParts, PartFiles

EXPERT_COUNTS = schema.ROLLUP_EXPERT_COUNTS
TOP1_PAIRS = schema.ROLLUP_TOP1_PAIRS
COACTIVATION = schema.ROLLUP_COACTIVATION
COMPACTED = (TOP1_PAIRS, COACTIVATION)  # tables without the step: compacted at close and by index
# Per-step columns left out of rollup_top1_pairs: with them its rows would be nearly one per
# token and layer pair; without them a compacted part holds at most E² cells per layer pair
# and label value (a `where=` over the step reads `routing` for entanglement).
PAIR_FREE = ("step", schema.TRAIN_STEP)
# compact() reads and sums this many one-part rollups at a time (a 1B-row run's co-activation
# parts, read all at once, took over 20 GB)
COMPACT_CHUNK = 16
# Dense counting (np.bincount) up to this many cells; sparse (np.unique) beyond.
_DENSE_CELLS = 1 << 24


def dimension_columns(token_columns: list[str]) -> list[str]:
    """The rollup key columns a tokens table with these columns gives (its order kept)."""
    return [c for c in token_columns if c not in schema.ROLLUP_NON_DIMENSIONS]


def _local(index: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values, each value's rank among them) of non-negative ints below `size`, in O(n)."""
    present = np.zeros(max(size, 1), dtype=bool)
    present[index] = True
    rank = np.cumsum(present) - 1
    return np.flatnonzero(present), rank[index]


def _present(values: np.ndarray) -> np.ndarray:
    """The distinct values of a small-int array, sorted, as int64 (a presence table over
    min..max: one pass, no sort)."""
    low, high = int(values.min()), int(values.max())
    seen = np.zeros(high - low + 1, dtype=bool)
    seen[values if low == 0 else values.astype(np.int64) - low] = True
    return np.flatnonzero(seen).astype(np.int64) + low


def _count(keys: np.ndarray, cells: int, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(distinct keys, count per key) of non-negative int64 keys below `cells`, zero counts dropped."""
    if cells <= _DENSE_CELLS:
        counts = np.bincount(keys, weights=weights, minlength=cells)
        present = np.flatnonzero(counts)
        return present, counts[present].astype(np.int64, copy=False)
    if weights is None:
        uniq, counts = np.unique(keys, return_counts=True)
        return uniq, counts.astype(np.int64, copy=False)
    uniq, inverse = np.unique(keys, return_inverse=True)
    counts = np.bincount(inverse, weights=weights, minlength=len(uniq)).astype(np.int64)
    keep = counts > 0
    return uniq[keep], counts[keep]


def _token_groups(tokens: pa.Table, dims: list[str]) -> tuple[np.ndarray, pd.DataFrame]:
    """Per token the id of its dimension tuple, and the tuples (one row per id)."""
    frame = tokens.select(dims).to_pandas()
    if not dims or len(frame) == 0:
        return np.zeros(len(frame), dtype=np.int64), frame.iloc[:1] if dims else pd.DataFrame(index=[0])
    grouped = frame.groupby(dims, dropna=False, sort=True)
    ids = grouped.ngroup().to_numpy(dtype=np.int64)
    first = np.zeros(int(ids.max()) + 1, dtype=np.int64)
    first[ids[::-1]] = np.arange(len(ids) - 1, -1, -1)  # first row of each group
    return ids, frame.iloc[first].reset_index(drop=True)


def _with_dims(
    groups: pd.DataFrame, ids: np.ndarray, dims: list[str], tokens: pa.Table
) -> dict[str, pa.Array]:
    """The dimension columns of rollup rows whose group ids are `ids`, typed as in `tokens`."""
    if not dims:
        return {}
    small = pa.table(
        {
            name: pa.array(groups[name].to_numpy(), type=tokens.schema.field(name).type, from_pandas=True)
            for name in dims
        }
    )
    taken = small.take(pa.array(ids, pa.int64()))
    return {name: taken[name].combine_chunks() for name in dims}


def _routing_tokens(tokens: pa.Table, routing: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Routing rows in runs of equal (seq_id, pos): (first row of each run, the index of its
    token in `tokens` or -1, whether it has one). Routing is token-major (layers x k rows per
    token), so only the runs' heads are looked up; any order gives the same answer."""
    seq = routing["seq_id"].to_numpy()
    pos = routing["pos"].to_numpy()
    change = np.empty(len(seq), dtype=bool)
    change[:1] = True
    np.not_equal(seq[1:], seq[:-1], out=change[1:])
    change[1:] |= pos[1:] != pos[:-1]
    heads = np.flatnonzero(change)
    token_keys = (tokens["seq_id"].to_numpy().astype(np.int64) << 32) + tokens["pos"].to_numpy().astype(
        np.int64
    )
    order = np.argsort(token_keys, kind="stable")
    sorted_keys = token_keys[order]
    r_keys = (seq[heads].astype(np.int64) << 32) + pos[heads].astype(np.int64)
    if not len(sorted_keys):
        return heads, np.full(len(heads), -1, dtype=np.int64), np.zeros(len(heads), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_keys, r_keys), len(sorted_keys) - 1)
    found = sorted_keys[at] == r_keys
    return heads, np.where(found, order[at], -1), found


def part_rollups(
    tokens: pa.Table, routing: pa.Table, coactivation: bool = False, cells_out: dict | None = None
) -> dict[str, pa.Table]:
    """`rollup_expert_counts` and `rollup_top1_pairs` rows of `routing` (its tokens in `tokens`,
    which may hold more tokens than the part routes), and with `coactivation` the
    `rollup_coactivation` rows (k(k-1)/2 pairs per token and layer: several times the cost of
    the others, so the writer leaves them to `routescope index`). Routing rows whose token is absent count
    under NULL dimensions, so an unfiltered sum still equals `routing`'s count. A `cells_out`
    dict receives the pair rows' cells as arrays (store/pair_totals.py sums them across parts)."""
    dims = dimension_columns(tokens.column_names)
    measures = {c for table in schema.ROLLUP_MEASURES.values() for c in table}
    if (
        routing.num_rows == 0
        or measures & set(dims)
        or any(d.startswith(schema.ROLLUP_PREVIOUS) for d in dims)
    ):
        return {}  # a label named like a measure column: no rollups, readers use routing
    group_of_token, groups = _token_groups(tokens, dims)
    heads, token_of_run, found_run = _routing_tokens(tokens, routing)
    runs = np.diff(np.append(heads, routing.num_rows))  # rows per run of equal (seq_id, pos)
    found_all = bool(found_run.all())
    if not found_all:  # routing without its token: one extra all-NULL group
        missing = len(groups)
        groups = pd.concat([groups, pd.DataFrame({d: [None] for d in dims})], ignore_index=True)
        group_run = np.where(found_run, group_of_token[np.maximum(token_of_run, 0)], missing)
    else:
        group_run = group_of_token[token_of_run]
    n_groups = len(groups)
    layer = routing["layer"].to_numpy()  # small ints: used as they are, no int64 copies
    expert = routing["expert"].to_numpy()
    slot = routing["slot"].to_numpy()
    width = int(expert.max()) + 1
    layers = _present(layer)  # the part's layers, sorted
    n_layers = len(layers)
    key_type = np.int32 if n_groups * n_layers * width < 2**31 else np.int64
    position = np.zeros(int(layers[-1]) + 1, dtype=key_type)
    position[layers] = np.arange(len(layers))
    # layers numbered without gaps (the usual case): a layer's position is arithmetic
    offset = int(layers[0]) if int(layers[-1]) - int(layers[0]) + 1 == n_layers else None

    cells = n_groups * n_layers * width
    # key = (group * n_layers + layer_pos) * width + expert, the group part once per run
    base = group_run * (n_layers * width) - (offset or 0) * width
    keys = np.repeat(base.astype(key_type), runs)
    if offset is None:
        keys += position[layer] * key_type(width)
    else:
        keys += np.multiply(layer, width, dtype=key_type)
    keys += expert
    is_first = slot == 0
    key_all, rows = _count(keys, cells)
    key_first, firsts = _count(keys[is_first], cells)
    first = np.zeros(len(key_all), dtype=np.int64)
    first[np.searchsorted(key_all, key_first)] = firsts
    g, rest = np.divmod(key_all, n_layers * width)
    counts = {
        **_with_dims(groups, g, dims, tokens),
        "layer": pa.array(layers[rest // width], pa.int16()),
        "expert": pa.array(rest % width, pa.int16()),
        "tokens": pa.array(rows, pa.int64()),
        "first": pa.array(first, pa.int64()),
    }
    out = {EXPERT_COUNTS: pa.table(counts)}

    # slot-0 expert of every token at every layer of this part; tokens missing one are left out,
    # as `top1_paths` leaves them out
    slot0 = np.flatnonzero(is_first)
    run_of = np.searchsorted(heads, slot0, side="right") - 1 if len(heads) > 1 else None
    token_index = token_of_run[run_of] if run_of is not None else np.repeat(token_of_run, len(slot0))
    if not found_all:
        kept = token_index >= 0
        slot0, token_index = slot0[kept], token_index[kept]
        run_of = run_of[kept] if run_of is not None else None
    local_ids, local = _local(token_index, len(tokens))  # the part's tokens, 0..n-1
    path = np.full((len(local_ids), n_layers), -1, dtype=np.int64)
    path[local, position[layer[slot0]]] = expert[slot0]
    token_group = np.full(len(local_ids), -1, dtype=np.int64)
    token_group[local] = group_run[run_of] if run_of is not None else group_run[0]
    complete = (path >= 0).all(axis=1)
    pair_dims = [d for d in dims if d not in PAIR_FREE]
    # the pair tables' groups: the dimension groups without their step
    pair_groups = groups[pair_dims] if pair_dims else pd.DataFrame(index=groups.index)
    if pair_dims:
        regroup = pair_groups.groupby(pair_dims, dropna=False, sort=True).ngroup().to_numpy(dtype=np.int64)
    else:
        regroup = np.zeros(len(groups), dtype=np.int64)
    first_of = np.zeros(int(regroup.max()) + 1, dtype=np.int64)
    first_of[regroup[::-1]] = np.arange(len(regroup) - 1, -1, -1)
    pair_groups = pair_groups.iloc[first_of].reset_index(drop=True)
    if n_layers >= 2 and complete.any():
        p, tg = path[complete], regroup[token_group[complete]]
        n_groups = len(pair_groups)
        step = np.arange(n_layers - 1, dtype=np.int64)
        pair_keys = (
            ((tg[:, None] * (n_layers - 1) + step[None, :]) * width + p[:, :-1]) * width + p[:, 1:]
        ).ravel()
        pair_cells = n_groups * (n_layers - 1) * width * width
        key_pairs, pair_counts = _count(pair_keys, pair_cells)
        g, rest = np.divmod(key_pairs, (n_layers - 1) * width * width)
        idx, rest = np.divmod(rest, width * width)
        expert_a, expert_b = np.divmod(rest, width)
        pairs = {
            **_with_dims(pair_groups, g, pair_dims, tokens),
            "layer": pa.array(layers[idx], pa.int16()),
            "next_layer": pa.array(layers[idx + 1], pa.int16()),
            "expert_a": pa.array(expert_a, pa.int16()),
            "expert_b": pa.array(expert_b, pa.int16()),
            "count": pa.array(pair_counts, pa.int64()),
        }
        out[TOP1_PAIRS] = pa.table(pairs)
        if cells_out is not None:
            cells_out.update(
                groups=pair_groups,
                group=g,
                pair=idx,
                layers=layers,
                a=expert_a,
                b=expert_b,
                count=pair_counts,
            )
    if coactivation and n_layers >= 1 and complete.any():
        found = np.repeat(found_run, runs)
        out[COACTIVATION] = _coactivation(
            routing,
            found,
            np.repeat(token_of_run, runs),
            np.repeat(group_run, runs),
            regroup,
            pair_groups,
            pair_dims,
            tokens,
            layers,
            position[layer],
            width,
        )
    return out


def _coactivation(
    routing: pa.Table,
    found: np.ndarray,
    token_index: np.ndarray,
    group: np.ndarray,
    regroup: np.ndarray,
    pair_groups: pd.DataFrame,
    pair_dims: list[str],
    tokens: pa.Table,
    layers: np.ndarray,
    layer_pos: np.ndarray,
    width: int,
) -> pa.Table:
    """Unordered pairs {a, b} (a < b) of experts chosen for the same token in one layer: the
    ordered counts of SPEC 4.3 are these counts both ways round."""
    slot = routing["slot"].to_numpy().astype(np.int64)
    k = int(slot.max()) + 1
    n_layers = len(layers)
    keep = found
    # the part's own tokens, numbered 0..n-1 (the tokens table may hold a whole rank)
    local_ids, local = _local(token_index[keep], len(tokens))
    cell = (local * n_layers + layer_pos[keep]) * k + slot[keep]
    n_cells = max(len(local_ids), 1) * n_layers * k
    chosen = np.full(n_cells, -1, dtype=np.int64)
    chosen[cell] = routing["expert"].to_numpy().astype(np.int64)[keep]
    chosen = chosen.reshape(-1, n_layers, k)
    tok_group = np.full(len(chosen), -1, dtype=np.int64)
    tok_group[local] = regroup[group[keep]]
    g_cells = len(pair_groups) * n_layers * width * width
    first, second = np.triu_indices(k, 1)  # every unordered slot pair
    a, b = chosen[:, :, first], chosen[:, :, second]  # (tokens, layers, pairs)
    ok = (a >= 0) & (b >= 0) & (tok_group[:, None, None] >= 0)
    layer_ids = np.arange(n_layers, dtype=np.int64)[None, :, None]
    keys = (
        (tok_group[:, None, None] * n_layers + layer_ids) * width + np.minimum(a, b)
    ) * width + np.maximum(a, b)
    keys = keys[ok]
    uniq, counts = _count(keys, g_cells)
    g, rest = np.divmod(uniq, n_layers * width * width)
    lp, rest = np.divmod(rest, width * width)
    return pa.table(
        {
            **_with_dims(pair_groups, g, pair_dims, tokens),
            "layer": pa.array(layers[lp], pa.int16()),
            "expert_a": pa.array(rest // width, pa.int16()),
            "expert_b": pa.array(rest % width, pa.int16()),
            "count": pa.array(counts, pa.int64()),
        }
    )


# -- compaction --------------------------------------------------------------------------
# A rollup part `part-A-B.parquet` covers routing parts A..B of its rank (`part-A.parquet`
# covers part A). Compacting many one-part pair rollups into one range part sums equal keys,
# so the table is bounded by the distinct cells, not by the number of parts.


def covered_range(name: str) -> tuple[int, int]:
    """(first, last) routing part index a rollup part file name covers."""
    stem = name.rsplit("/", 1)[-1].removesuffix(".parquet")
    bits = stem.split("-")[1:]
    return int(bits[0]), int(bits[-1])


def sum_rows(table: pa.Table, measures: list[str]) -> pa.Table:
    """Rows with equal keys summed (keys: every column but `measures`), sorted by key (nulls last)."""
    keys = [c for c in table.column_names if c not in measures]
    try:
        code = _key_codes(table, keys)
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):
        code = None  # a key type Arrow cannot rank this way: its group_by does it
    if code is None or any(table[m].null_count for m in measures):
        return _sum_rows_arrow(table, keys, measures)
    order = np.argsort(code, kind="stable")
    sorted_code = code[order]
    starts = np.flatnonzero(np.r_[True, sorted_code[1:] != sorted_code[:-1]]) if len(code) else order
    out = table.select(keys).take(pa.array(order[starts], pa.int64()))
    for m in measures:
        values = table[m].to_numpy()[order]
        summed = np.add.reduceat(values, starts) if len(values) else values
        out = out.append_column(table.schema.field(m), pa.array(summed, table.schema.field(m).type))
    return out.select(table.column_names).combine_chunks()


def _key_codes(table: pa.Table, keys: list[str]) -> np.ndarray | None:
    """One int64 per row whose order is the rows' key order (each column's values ranked, nulls
    last), or None where the ranks do not fit in 63 bits."""
    code = np.zeros(table.num_rows, dtype=np.int64)
    span = 1
    for name in keys:
        column = table[name]
        values = pc.unique(column)
        values = values.take(pc.array_sort_indices(values, null_placement="at_end"))
        span *= max(len(values), 1)
        if span >= 2**62:
            return None
        rank = pc.index_in(column, value_set=values, skip_nulls=False)
        code = code * len(values) + rank.to_numpy(zero_copy_only=False).astype(np.int64)
    return code


def _sum_rows_arrow(table: pa.Table, keys: list[str], measures: list[str]) -> pa.Table:
    out = table.group_by(keys, use_threads=False).aggregate([(m, "sum") for m in measures])
    summed = {f"{m}_sum": m for m in measures}
    out = out.rename_columns([summed.get(c, c) for c in out.column_names]).select(table.column_names)
    return out.sort_by([(k, "ascending") for k in keys])


def rank_and_range(name: str) -> tuple[int, int, int]:
    """(rank, first, last) of 'rank=R/part-A[-B].parquet'."""
    rank = int(name.split("/")[0].split("=")[1])
    return (rank, *covered_range(name))


def coverage(routing: list[str], rollup: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """For part names 'rank=R/part-...': each routing part -> the rollup parts covering it, and
    the rollup parts that cover no routing part (stale)."""
    by_rank: dict[int, list[tuple[int, str]]] = {}
    for name in routing:
        rank, index, _ = rank_and_range(name)
        by_rank.setdefault(rank, []).append((index, name))
    cover: dict[str, list[str]] = {name: [] for name in routing}
    stale = []
    for name in rollup:
        rank, first, last = rank_and_range(name)
        hits = [r for i, r in by_rank.get(rank, []) if first <= i <= last]
        if not hits:
            stale.append(name)
        for r in hits:
            cover[r].append(name)
    return cover, stale


def compact(files: PartFiles | Path, table: str, rank: int, totals: PairTotals | None = None) -> Any:
    """Merge `table`'s one-part rollups of `rank` into one range part (equal keys summed);
    written whole (a rename, or one PUT on object storage) before the one-part parts go, so a
    crash between leaves a double cover that readers refuse (they read routing) and
    `routescope index` repairs. `files`: the run's parts (store/part_files.py; a Path is a
    local run). `totals`: the writer's running sums, used instead of reading the parts back
    when they cover exactly them."""
    files = LocalParts(files) if isinstance(files, Path) else files
    mine = {n: h for n, h in files.parts(table).items() if n.startswith(f"rank={rank}/")}
    ranges = [covered_range(n) for n in mine if len(n.rsplit("/", 1)[-1].split("-")) == 3]
    singles, leftovers = [], []
    for name in sorted(mine):
        if len(name.rsplit("/", 1)[-1].split("-")) != 2:
            continue
        index = covered_range(name)[0]
        if any(a <= index <= b for a, b in ranges):
            leftovers.append(mine[name])  # left by a crash after its range part was written
        else:
            singles.append(name)
    files.remove(leftovers)
    if len(singles) < 2:
        return None
    merged = None
    if totals is not None and [covered_range(n)[0] for n in singles] == sorted(totals.parts):
        merged = totals.table()
    if merged is None:  # summed a few parts at a time: memory stays that of the sums, not the run's
        measures = [m for m in schema.ROLLUP_MEASURES[table] if m not in _KEYS[table]]
        for at in range(0, len(singles), COMPACT_CHUNK):
            tables = [files.read(mine[n]) for n in singles[at : at + COMPACT_CHUNK]]
            tables = [t.drop(["rank"]) if "rank" in t.column_names else t for t in tables]
            whole = pa.concat_tables(
                tables + ([merged] if merged is not None else []), promote_options="default"
            )
            merged = sum_rows(whole, measures)
    first, last = covered_range(singles[0])[0], covered_range(singles[-1])[1]
    # zstd level 9: written once, worth it
    path = files.write(table, f"rank={rank}/part-{first:05d}-{last:05d}.parquet", merged, level=9)
    files.remove([mine[n] for n in singles])
    return path


_KEYS = {
    EXPERT_COUNTS: ("layer", "expert"),
    COACTIVATION: ("layer", "expert_a", "expert_b"),
    TOP1_PAIRS: ("layer", "next_layer", "expert_a", "expert_b"),
    schema.ROLLUP_REPETITION: ("layer",),
}

"""Rollup rows of one routing part (SPEC 3.3 `rollup_*`), computed with NumPy from host arrays.

The writer calls `part_rollups` on the tokens and routing it is about to write, on its own
thread, and writes each result as `rollup_<name>/rank=R/part-NNNNN.parquet` with the routing
part's number: rollup part N summarises routing part N, so a reader knows which parts its
rollups cover by their names alone (analysis/rollups.py), a crash leaves at worst a routing part
without its rollup (readers then fall back to `routing`; `check` names it), and append and
ranks follow the parts. `routescope index` calls the same function on the parts of runs that
lack rollups (imported or older runs).

Every rollup row is keyed by the token's *dimensions*: every `tokens` column except seq_id,
pos and token_id (step, phase, modality, stack, train_step when present, the labels), so a
`where=` over those columns selects whole rollup rows and gives the same counts as over tokens.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from routescope import schema

EXPERT_COUNTS = schema.ROLLUP_EXPERT_COUNTS
TOP1_PAIRS = schema.ROLLUP_TOP1_PAIRS
# Dense counting (np.bincount) up to this many cells; sparse (np.unique) beyond.
_DENSE_CELLS = 1 << 24


def dimension_columns(token_columns: list[str]) -> list[str]:
    """The rollup key columns a tokens table with these columns gives (its order kept)."""
    return [c for c in token_columns if c not in schema.ROLLUP_NON_DIMENSIONS]


def _count(keys: np.ndarray, cells: int, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(distinct keys, count per key) of non-negative int64 keys below `cells`, zero counts dropped."""
    if cells <= _DENSE_CELLS:
        counts = np.bincount(keys, weights=weights, minlength=cells)
        present = np.flatnonzero(counts)
        return present, counts[present].astype(np.int64)
    if weights is None:
        uniq, counts = np.unique(keys, return_counts=True)
        return uniq, counts.astype(np.int64)
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


def _with_dims(groups: pd.DataFrame, ids: np.ndarray, dims: list[str], tokens: pa.Table) -> dict[str, pa.Array]:
    """The dimension columns of rollup rows whose group ids are `ids`, typed as in `tokens`."""
    out = {}
    for name in dims:
        values = groups[name].to_numpy()[ids]
        out[name] = pa.array(values, type=tokens.schema.field(name).type, from_pandas=True)
    return out


def part_rollups(tokens: pa.Table, routing: pa.Table) -> dict[str, pa.Table]:
    """`rollup_expert_counts` and `rollup_top1_pairs` rows of `routing` (its tokens in `tokens`,
    which may hold more tokens than the part routes). Routing rows whose token is absent count
    under NULL dimensions, so an unfiltered sum still equals `routing`'s count."""
    dims = dimension_columns(tokens.column_names)
    measures = {c for table in schema.ROLLUP_MEASURES.values() for c in table}
    if routing.num_rows == 0 or measures & set(dims) or any(d.startswith(schema.ROLLUP_PREVIOUS) for d in dims):
        return {}  # a label named like a measure column: no rollups, readers use routing
    group_of_token, groups = _token_groups(tokens, dims)
    token_keys = (tokens["seq_id"].to_numpy().astype(np.int64) << 32) + tokens["pos"].to_numpy().astype(np.int64)
    order = np.argsort(token_keys, kind="stable")
    sorted_keys = token_keys[order]
    r_keys = (routing["seq_id"].to_numpy().astype(np.int64) << 32) + routing["pos"].to_numpy().astype(np.int64)
    at = np.minimum(np.searchsorted(sorted_keys, r_keys), max(len(sorted_keys) - 1, 0))
    found = sorted_keys[at] == r_keys if len(sorted_keys) else np.zeros(len(r_keys), dtype=bool)
    token_index = np.where(found, order[at] if len(order) else 0, -1)
    if not found.all():  # routing without its token: one extra all-NULL group
        missing = len(groups)
        groups = pd.concat([groups, pd.DataFrame({d: [None] for d in dims})], ignore_index=True)
        group = np.where(found, group_of_token[np.maximum(token_index, 0)] if len(group_of_token) else 0, missing)
    else:
        group = group_of_token[token_index]
    n_groups = len(groups)
    layer = routing["layer"].to_numpy().astype(np.int64)
    expert = routing["expert"].to_numpy().astype(np.int64)
    slot = routing["slot"].to_numpy()
    width = int(expert.max()) + 1
    layers = np.unique(layer)
    layer_pos = np.searchsorted(layers, layer)
    n_layers = len(layers)

    cells = n_groups * n_layers * width
    keys = (group * n_layers + layer_pos) * width + expert
    key_all, rows = _count(keys, cells)
    is_first = (slot == 0).astype(np.float64)
    key_first, firsts = _count(keys, cells, is_first)
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
    slot0 = slot == 0
    tok = np.where(found, token_index, -1)[slot0]
    n_tokens = max(len(token_keys), 1) + 1
    tok = np.where(tok < 0, n_tokens - 1, tok)  # orphan rows share one row, dropped below
    path = np.full((n_tokens, n_layers), -1, dtype=np.int64)
    path[tok, layer_pos[slot0]] = expert[slot0]
    token_group = np.full(n_tokens, -1, dtype=np.int64)
    token_group[tok] = group[slot0]
    complete = (path >= 0).all(axis=1)
    complete[n_tokens - 1] = False
    if n_layers >= 2 and complete.any():
        p, tg = path[complete], token_group[complete]
        step = np.arange(n_layers - 1, dtype=np.int64)
        pair_keys = (((tg[:, None] * (n_layers - 1) + step[None, :]) * width + p[:, :-1]) * width + p[:, 1:]).ravel()
        pair_cells = n_groups * (n_layers - 1) * width * width
        key_pairs, pair_counts = _count(pair_keys, pair_cells)
        g, rest = np.divmod(key_pairs, (n_layers - 1) * width * width)
        idx, rest = np.divmod(rest, width * width)
        pairs = {
            **_with_dims(groups, g, dims, tokens),
            "layer": pa.array(layers[idx], pa.int16()),
            "next_layer": pa.array(layers[idx + 1], pa.int16()),
            "expert_a": pa.array(rest // width, pa.int16()),
            "expert_b": pa.array(rest % width, pa.int16()),
            "count": pa.array(pair_counts, pa.int64()),
        }
        out[TOP1_PAIRS] = pa.table(pairs)
    return out

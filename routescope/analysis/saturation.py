"""Router saturation (SPEC 4.7) over content-matched token pairs, one pass over each run's routing.

`compare.router_saturation` matches tokens by content (`content.py`) and hands the pairs
here. Each run's routing is turned into a [pairs, layers, slots] array of expert ids, and
the overlap |topk_A ∩ topk_B| of every (pair, layer) is a comparison of two small arrays in
NumPy, chunk by chunk; the same overlap gives the exact agreement of the sets (the overlap
is all of both) and the tokens whose set differs in any layer (R3's statistic). The SQL join of both runs'
routing rows on (pair, layer, expert) that this replaces took 10-15 s of compare's 17-23 s
at 100M routing rows (benchmarks/RESULTS.md).

How a run's array is filled, fastest first:

- **Scan** (the layout the recorder and the importers write: the k rows of one (token, layer)
  lie together in slot order, every layer with the same k). Two scans in file order: `slot,
  expert` of every row, and (token, layer) of every slot-0 row; row i // k of the first is
  group i of the second. DuckDB keeps the order of a plain scan (`preserve_insertion_order`,
  on by default), and the slots are checked to run 0..k-1, group after group, before the
  rows are used. Groups are placed by a sorted search of their token key. Nothing is joined.
- **Join** (any other layout): routing joined with the pair table in DuckDB, one row per
  routing row of a matched token, scattered into the array.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from routescope.analysis.sqlfiles import Cte, compose, get_query

MISSING_A, MISSING_B = -1, -2  # fill of absent slots: never equal to each other or to an expert
CHUNK_PAIRS = 2048  # pairs compared at once: the [chunk, layers, slots, slots] temporary stays in cache
POS_BITS = 24  # token key = seq_id << 24 | pos (the `slot0_groups` query packs it the same way)


def token_keys(seq_id: np.ndarray, pos: np.ndarray) -> np.ndarray:
    return (np.asarray(seq_id, dtype=np.int64) << POS_BITS) | np.asarray(pos, dtype=np.int64)


def keys_fit(*columns: tuple[np.ndarray, np.ndarray]) -> bool:
    """Whether every (seq_id, pos) packs into one BIGINT token key without collisions."""
    for seq_id, pos in columns:
        if len(seq_id) and (seq_id.min() < 0 or seq_id.max() >= 2 ** (63 - POS_BITS)):
            return False
        if len(pos) and (pos.min() < 0 or pos.max() >= 2**POS_BITS):
            return False
    return True


@dataclass
class Agreement:
    """`agreement_table`'s result: per layer, and over all layers per matched token."""

    per_layer: pd.DataFrame  # layer, top_k, tokens_matched, saturation, top1_agreement, exact_match
    tokens_matched: int
    tokens_differing: int  # matched tokens whose top-k set differs in at least one layer


def saturation_table(
    con: Any,
    pairs: dict[str, np.ndarray],
    layers: list[int],
    top_k: list[int],
    slots: int,
    b_routing: list[str],
    scan: bool = True,
) -> pd.DataFrame:
    """layer, top_k, tokens_matched, saturation, top1_agreement, exact_match (see `agreement_table`)."""
    return agreement_table(con, pairs, layers, top_k, slots, b_routing, scan).per_layer


def agreement_table(
    con: Any,
    pairs: dict[str, np.ndarray],
    layers: list[int],
    top_k: list[int],
    slots: int,
    b_routing: list[str],
    scan: bool = True,
) -> Agreement:
    """Per layer over `pairs` (a_seq_id, a_pos, b_seq_id, b_pos): tokens_matched, saturation
    (mean |topk_A ∩ topk_B| / k), top1_agreement (slot 0 equal), exact_match (the top-k sets
    equal); and the matched tokens whose set differs in at least one layer (R3's statistic).
    Run A is `con`'s `routing` view; run B is read from `b_routing`.
    `slots`: the largest k of either run; `top_k`: the k each layer's saturation divides by;
    `scan`: try the scan (the token keys fit, see `keys_fit`) before the join. Both ways fill
    the same arrays, so every number comes from the same comparison."""
    n = len(pairs["a_seq_id"])
    shared = np.zeros(len(layers), dtype=np.int64)
    same_top1 = np.zeros(len(layers), dtype=np.int64)
    same_set = np.zeros(len(layers), dtype=np.int64)
    differing = 0
    if n:
        a, b = _cells(con, pairs, layers, slots, b_routing, scan)
        # equal sets (ids are distinct; absent slots hold -1 in A and -2 in B and never match):
        # the overlap is every id of A and every id of B, and there is at least one. With every
        # slot filled on both sides (the usual case) that is: the overlap is `slots`.
        filled = bool((a >= 0).all() and (b >= 0).all())
        for start in range(0, n, CHUNK_PAIRS):
            ca, cb = a[start : start + CHUNK_PAIRS], b[start : start + CHUNK_PAIRS]
            overlap = (ca[..., :, None] == cb[..., None, :]).sum(axis=(2, 3))  # [chunk, layers]
            shared += overlap.sum(axis=0)
            same_top1 += (ca[..., 0] == cb[..., 0]).sum(axis=0)
            if filled:
                equal = overlap == slots
            else:
                size_a, size_b = (ca >= 0).sum(axis=-1), (cb >= 0).sum(axis=-1)
                equal = (overlap == size_a) & (overlap == size_b) & (size_a > 0)
            same_set += equal.sum(axis=0)
            differing += int((~equal).any(axis=1).sum())
    k = np.asarray(top_k, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        saturation = shared / (n * k) if n else np.full(len(layers), np.nan)
        top1 = same_top1 / n if n else np.full(len(layers), np.nan)
        exact = same_set / n if n else np.full(len(layers), np.nan)
    per_layer = pd.DataFrame(
        {
            "layer": np.asarray(layers, dtype=np.int16),
            "top_k": np.asarray(top_k, dtype=np.int32),
            "tokens_matched": np.full(len(layers), n, dtype=np.int64),
            "saturation": saturation,
            "top1_agreement": top1,
            "exact_match": exact,
        }
    )
    return Agreement(per_layer, n, differing)


def _cells(
    con: Any, pairs: dict[str, np.ndarray], layers: list[int], slots: int, b_routing: list[str], scan: bool
) -> tuple[np.ndarray, np.ndarray]:
    """[pairs, layers, slots] expert ids of A and B (absent slots hold MISSING_A / MISSING_B)."""
    sides = (
        ("routing_of_a", {}, MISSING_A, token_keys(pairs["a_seq_id"], pairs["a_pos"])),
        ("routing_of_b", {"b_routing": b_routing}, MISSING_B, token_keys(pairs["b_seq_id"], pairs["b_pos"])),
    )
    out: list[np.ndarray] = []
    joined: tuple[np.ndarray, np.ndarray] | None = None
    for source, params, fill, keys in sides:
        # file order is a DuckDB promise (preserve_insertion_order); another engine joins
        ordered = scan and isinstance(con, duckdb.DuckDBPyConnection)
        cells = _scanned_cells(con, source, params, layers, slots, fill, keys) if ordered else None
        if cells is None:
            joined = joined or _joined_cells(con, pairs, layers, slots, b_routing)
            cells = joined[len(out)]
        out.append(cells)
    return out[0], out[1]


def _run_sql(con: Any, sql: str, params: dict[str, Any]) -> pa.Table:
    """A query's result as Arrow; DuckDB's relation API hands it over without a DB-API copy."""
    if isinstance(con, duckdb.DuckDBPyConnection):
        return con.sql(sql, params=params or None).to_arrow_table()
    return pa.Table.from_pandas(con.execute(sql, params).df(), preserve_index=False)


def _scanned_cells(
    con: Any,
    source: str,
    params: dict[str, Any],
    layers: list[int],
    slots: int,
    fill: int,
    keys: np.ndarray,
) -> np.ndarray | None:
    """The scan (module docstring); None when the rows are not in the layout it needs."""
    ctes = [Cte("source_routing", get_query(source).sql)]
    rows = _run_sql(con, compose(get_query("slot_experts").sql, ctes), params)
    slot = rows.column("slot").to_numpy()
    k = int(slot.max()) + 1 if len(slot) else 0
    if k == 0 or k > slots or len(slot) % k or not _slots_in_order(slot, k):
        return None
    experts = rows.column("expert").to_numpy().reshape(-1, k)
    groups = _run_sql(con, compose(get_query("slot0_groups").sql, ctes), params)
    if groups.num_rows != len(experts):
        return None
    group_token = groups.column("token").to_numpy()
    group_layer = groups.column("layer").to_numpy()
    rank_of = np.full(max(max(layers), int(group_layer.max())) + 1, -1, dtype=np.int64)
    rank_of[np.asarray(layers)] = np.arange(len(layers))
    rank = rank_of[group_layer]
    # distinct tokens of the pairs (a token of B may partner several tokens of A)
    tokens, pair_token = np.unique(keys, return_inverse=True)
    where = np.minimum(np.searchsorted(tokens, group_token), len(tokens) - 1)
    hit = (tokens[where] == group_token) & (rank >= 0)
    per_token = np.full((len(tokens) * len(layers), slots), fill, dtype=np.int16)
    cell = where * len(layers) + rank
    if k == slots:  # whole rows: one k·2-byte item each, not k int16 items
        row = np.dtype((np.void, 2 * k))
        target, values = per_token.view(row).reshape(-1), np.ascontiguousarray(experts).view(row).reshape(-1)
    else:
        target, values = per_token[:, :k], experts
    if hit.all():  # every group belongs to a matched token of a common layer (the usual case)
        target[cell] = values
    else:
        keep = np.flatnonzero(hit)
        target[cell[keep]] = values[keep]
    return per_token.reshape(len(tokens), len(layers), slots)[pair_token.reshape(-1)]


def _slots_in_order(slot: np.ndarray, k: int) -> bool:
    """slot == 0, 1, ..., k-1 repeated: with k bytes a word, one comparison per group."""
    slot = np.ascontiguousarray(slot, dtype=np.int8)
    word = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}.get(k)
    if word is None:
        return bool((slot.reshape(-1, k) == np.arange(k)).all())
    return bool((slot.view(word) == np.arange(k, dtype=np.int8).view(word)[0]).all())


def _joined_cells(
    con: Any, pairs: dict[str, np.ndarray], layers: list[int], slots: int, b_routing: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """The join (module docstring): both sides' arrays."""
    n = len(pairs["a_seq_id"])
    shape = (n, len(layers), slots)
    # 32-bit cell numbers when they fit: half the bytes DuckDB hands over (the cost that dominates)
    index = np.int32 if int(np.prod(shape)) < 2**31 else np.int64
    table = pa.table({"pair": np.arange(n, dtype=index), **{k: pairs[k] for k in pairs}})
    ranks = pa.table(
        {"layer": np.asarray(layers, dtype=np.int16), "rank": np.arange(len(layers), dtype=index)}
    )
    params = {"cells_per_pair": int(len(layers) * slots), "slots": int(slots)}
    con.register("content_pairs", table)
    con.register("saturation_layers", ranks)
    try:
        out = []
        for name, fill, extra in (
            ("saturation_cells_a", MISSING_A, {}),
            ("saturation_cells_b", MISSING_B, {"b_routing": b_routing}),
        ):
            flat = np.full(int(np.prod(shape)), fill, dtype=np.int16)
            rows = _run_sql(con, get_query(name).sql, {**params, **extra})
            flat[rows.column("cell").to_numpy()] = rows.column("expert").to_numpy()
            out.append(flat.reshape(shape))
    finally:
        con.unregister("content_pairs")
        con.unregister("saturation_layers")
    return out[0], out[1]

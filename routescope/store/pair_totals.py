"""Running sums of one writer's `rollup_top1_pairs` parts, so that its close writes the compacted
part from memory instead of reading its one-part files back and summing them (store/rollups.py
`compact`, which stays the path for any other case: parts of an earlier session, a crash, a
label set that changes, too many cells).

The sums are a dense int64 array over (pair group, layer pair, expert a, expert b), grown as
parts bring new groups, layer pairs or experts, and given up (`failed`) beyond `MAX_CELLS`.
`table()` gives the rows `compact` would give: the same columns and types, equal keys summed,
sorted by key with nulls last.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

# 8M int64 cells (64 MB): e.g. 4 label values x 47 layer pairs x 128 x 128 experts is 3M
MAX_CELLS = 1 << 23


def _key(values: tuple) -> tuple:
    return tuple(None if v is None or (isinstance(v, float) and np.isnan(v)) else v for v in values)


class PairTotals:
    """Sums of the pair rollup rows `add` is given, part by part, and the parts they cover."""

    def __init__(self) -> None:
        self.failed = False
        self.parts: list[int] = []  # routing part indexes whose pair rows were added and written
        self._schema: pa.Schema | None = None
        self._groups: dict[tuple, int] = {}
        self._pairs: dict[tuple[int, int], int] = {}
        self._experts = 0
        self._dense = np.zeros((0, 0, 0, 0), dtype=np.int64)

    def add(self, table: pa.Table, cells: dict) -> None:
        """Add one part's `rollup_top1_pairs` rows (`table`) given as cells by `part_rollups`."""
        if self.failed:
            return
        if self._schema is None:
            self._schema = table.schema
        elif not table.schema.equals(self._schema):
            self._give_up()  # e.g. a label that only some parts have: `compact` merges them
            return
        frame: pd.DataFrame = cells["groups"]
        group_map = np.array(
            [self._groups.setdefault(_key(row), len(self._groups)) for row in frame.itertuples(index=False)]
            or [0],
            dtype=np.int64,
        )
        layers = cells["layers"]
        pair_map = np.array(
            [
                self._pairs.setdefault((int(layers[i]), int(layers[i + 1])), len(self._pairs))
                for i in range(len(layers) - 1)
            ],
            dtype=np.int64,
        )
        experts = max(self._experts, int(cells["a"].max()) + 1, int(cells["b"].max()) + 1)
        shape = (max(len(self._groups), 1), len(self._pairs), experts, experts)
        if int(np.prod(shape, dtype=np.int64)) > MAX_CELLS:
            self._give_up()
            return
        if shape != self._dense.shape:
            grown = np.zeros(shape, dtype=np.int64)
            old = self._dense.shape
            grown[: old[0], : old[1], : old[2], : old[3]] = self._dense
            self._dense, self._experts = grown, experts
        flat = (
            (group_map[cells["group"]] * shape[1] + pair_map[cells["pair"]]) * experts + cells["a"]
        ) * experts
        flat += cells["b"]
        self._dense.reshape(-1)[flat] += cells["count"]  # one row per cell in a part: no repeats

    def _give_up(self) -> None:
        self.failed = True
        self._dense = np.zeros((0, 0, 0, 0), dtype=np.int64)

    def table(self) -> pa.Table | None:
        """The summed rows, as `compact` writes them; None when nothing was added or it gave up."""
        if self.failed or self._schema is None or not self._pairs:
            return None
        names = self._schema.names
        dims = names[: names.index("layer")]
        rows = list(self._groups) or [()]
        groups = pa.table(
            {d: pa.array([r[i] for r in rows], self._schema.field(d).type) for i, d in enumerate(dims)}
            | {"__id": pa.array(np.arange(len(rows)), pa.int64())}
        )
        if dims:  # the key order of `sum_rows`: Arrow's ascending sort, nulls last
            groups = groups.sort_by([(d, "ascending") for d in dims])
        group_order = groups["__id"].to_numpy()
        pairs = sorted(self._pairs, key=lambda lp: lp)
        pair_order = np.array([self._pairs[lp] for lp in pairs], dtype=np.int64)
        dense = self._dense
        if not np.array_equal(group_order, np.arange(len(group_order))):
            dense = dense[group_order]
        if not np.array_equal(pair_order, np.arange(len(pair_order))):
            dense = dense[:, pair_order]
        present = np.flatnonzero(dense)
        counts = dense.reshape(-1)[present]
        experts = self._experts
        present = present.astype(np.int32)  # below MAX_CELLS
        g, rest = np.divmod(present, len(pairs) * experts * experts)
        p, rest = np.divmod(rest, experts * experts)
        a, b = np.divmod(rest, experts)
        pair_layers = np.array(pairs, dtype=np.int64).reshape(-1, 2)
        taken = groups.take(pa.array(g, pa.int64()))
        columns = {d: taken[d].combine_chunks() for d in dims}
        columns |= {
            "layer": pa.array(pair_layers[p, 0], self._schema.field("layer").type),
            "next_layer": pa.array(pair_layers[p, 1], self._schema.field("next_layer").type),
            "expert_a": pa.array(a, self._schema.field("expert_a").type),
            "expert_b": pa.array(b, self._schema.field("expert_b").type),
            "count": pa.array(counts, self._schema.field("count").type),
        }
        return pa.table(columns, schema=self._schema)

"""Rollup rows counted per recorded step, straight from its dense expert ids (SPEC 3.3 `rollup_*`).

Every token of one recorded step shares its step, phase, stack, train_step and labels; only
`modality` varies per token. So the step's `rollup_expert_counts` cells are one `np.bincount`
over (token group, layer, expert) of the [layers, tokens, k] expert ids the step already holds,
and its `rollup_top1_pairs` need only each token's first choice per layer: no join of routing
rows back to tokens, no pandas groupby. `count_step` runs where the step's tables are made (the
writer thread: capture/recording/step.py `HostStep`, batch.py `StepBatch`); `combine` turns the counts of
the steps of one routing part into the part's rollup rows, the same rows, types and order that
`part_rollups` (store/rollups.py) gives on the part's tokens and routing, which stays the path
for `routescope index`, imported runs and any part `combine` declines (it returns None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from routescope import schema
from routescope.store.rollups import EXPERT_COUNTS, PAIR_FREE, TOP1_PAIRS, _count, dimension_columns


@dataclass
class StepCounts:
    """One step's (or batch of steps') rollup counts. `groups[g]` is the dimension values
    (`names` order) of local group g; `cells` the expert-count cells present, as local group,
    layer position (in sorted `layers`) and expert; `paths` each token's slot-0 expert per
    layer position, `token_group` its local group."""

    layers: tuple[int, ...]
    names: tuple[str, ...]
    groups: list[tuple]
    group: np.ndarray
    layer_pos: np.ndarray
    expert: np.ndarray
    tokens: np.ndarray
    first: np.ndarray
    paths: np.ndarray  # [tokens, layers] int16
    token_group: np.ndarray  # [tokens] int32


def count_step(
    layers: list[int],
    experts: np.ndarray | list[np.ndarray],
    names: tuple[str, ...],
    groups: list[tuple],
    token_group: np.ndarray | None = None,
) -> StepCounts:
    """Counts of one step: `experts` is a [layers, tokens, k] array or one [tokens, k_l] array
    per layer (in `layers` order), `groups` the distinct dimension tuples of its tokens and
    `token_group` each token's index into them (None: one group)."""
    per_layer = list(experts) if not isinstance(experts, np.ndarray) else None
    n = (per_layer[0].shape[0] if per_layer else experts.shape[1]) if len(layers) else 0
    order = np.argsort(np.asarray(layers, dtype=np.int64), kind="stable")
    n_layers = len(layers)
    n_groups = max(len(groups), 1)
    if token_group is None or n_groups == 1:
        token_group = np.zeros(n, dtype=np.int32)
    width = 1 + max(
        (int(e.max()) for e in (per_layer if per_layer is not None else [experts]) if e.size), default=0
    )
    cells = n_groups * n_layers * width
    key_type = np.intp  # what np.bincount counts without a converted copy
    group_base = token_group.astype(key_type) * key_type(n_layers * width) if n_groups > 1 else None
    if per_layer is None and n_layers:  # one [layers, tokens, k] array: one pass over it
        offsets = np.empty(n_layers, dtype=key_type)
        offsets[order] = np.arange(n_layers, dtype=key_type) * key_type(width)
        if group_base is None:
            keys3 = np.add(experts, offsets[:, None, None], dtype=key_type)
        else:
            keys3 = np.add(offsets[:, None], group_base[None, :], dtype=key_type)[:, :, None] + experts
        all_keys, first_keys = keys3.reshape(-1), keys3[:, :, 0].reshape(-1)
        paths = np.ascontiguousarray(experts[order, :, 0].T)
    else:
        keys, paths = [], np.empty((n, n_layers), dtype=np.int16)
        for position, i in enumerate(order):
            chosen = per_layer[i] if per_layer is not None else experts[i]  # [tokens, k]
            layer_keys = np.add(chosen, key_type(position * width), dtype=key_type)
            if group_base is not None:
                layer_keys += group_base[:, None]
            keys.append(layer_keys)
            paths[:, position] = chosen[:, 0]
        all_keys = np.concatenate([k.reshape(-1) for k in keys]) if keys else np.zeros(0, key_type)
        first_keys = np.concatenate([k[:, 0] for k in keys]) if keys else all_keys
    sparse = cells > 4 * len(all_keys) + 4096  # e.g. a batch of many one-token decode steps
    present, counts = _count(all_keys, 1 << 62 if sparse else cells)
    at, firsts = _count(first_keys, 1 << 62 if sparse else cells)
    first = np.zeros(len(present), dtype=np.int64)
    first[np.searchsorted(present, at)] = firsts
    present = present.astype(np.int64)
    g, rest = np.divmod(present, n_layers * width)
    return StepCounts(
        layers=tuple(int(layer) for layer in np.asarray(layers)[order]),
        names=tuple(names),
        groups=list(groups) or [()],
        group=g.astype(np.int64),
        layer_pos=(rest // width).astype(np.int64),
        expert=(rest % width).astype(np.int64),
        tokens=counts,
        first=first,
        paths=paths,
        token_group=token_group.astype(np.int32, copy=False),
    )


@dataclass
class StepInput:
    """What `count_step` needs of one step, kept until its part is written: the counting
    then runs on the writer's rollup thread (store/writer.py), beside the routing write."""

    layers: list[int]
    experts: np.ndarray | list[np.ndarray]
    names: tuple[str, ...]
    groups: list[tuple]
    token_group: np.ndarray | None

    def count(self) -> StepCounts:
        return count_step(self.layers, self.experts, self.names, self.groups, self.token_group)


def step_counts(
    tokens: dict[str, np.ndarray], layers: list[int], experts: np.ndarray | list, codes: np.ndarray | None
) -> StepInput:
    """The rollup input of the tokens of `tokens` (columns as the writer gets them), whose
    dimension values are the same for all tokens of equal `codes` (None: for all of them), and
    whose expert ids are `experts` (see `count_step`)."""
    names = tuple(c for c in tokens if c not in schema.ROLLUP_NON_DIMENSIONS)
    n = len(tokens["seq_id"])
    if codes is None or n == 0:
        firsts, token_group = np.zeros(min(n, 1), dtype=np.int64), None
    else:
        _, firsts, token_group = np.unique(codes, return_index=True, return_inverse=True)
    groups = [tuple(_plain(tokens[c][i]) for c in names) for i in firsts]
    return StepInput(list(layers), experts, names, groups, token_group)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _sort_key(values: tuple) -> tuple:
    """Key order of `part_rollups`' groups (pandas groupby, sort=True, dropna=False): each
    column ascending, nulls last."""
    return tuple((v is None, v if v is not None else 0) for v in values)


def _ranked(tuples: list[tuple]) -> tuple[list[tuple], dict[tuple, int]]:
    distinct = sorted(set(tuples), key=_sort_key)
    return distinct, {t: i for i, t in enumerate(distinct)}


def _dims_table(rows: list[tuple], names: list[str], tokens_schema: pa.Schema, ids: np.ndarray) -> dict:
    if not names:
        return {}
    small = pa.table(
        {
            name: pa.array([r[i] for r in rows], type=tokens_schema.field(name).type)
            for i, name in enumerate(names)
        }
    )
    taken = small.take(pa.array(ids, pa.int64()))
    return {name: taken[name].combine_chunks() for name in names}


def combine(
    steps: list[StepInput | StepCounts], tokens_schema: pa.Schema, cells_out: dict | None = None
) -> dict[str, pa.Table] | None:
    """The part's `rollup_expert_counts` and `rollup_top1_pairs` from the counts of its steps,
    as `part_rollups(tokens, routing)` gives them; None where the steps do not describe the
    part alone (different layers or dimension columns, a step without counts): the caller then
    uses `part_rollups`."""
    if not steps:
        return None
    steps = [s.count() if isinstance(s, StepInput) else s for s in steps]
    dims = dimension_columns(tokens_schema.names)
    first = steps[0]
    if any(s.layers != first.layers or s.names != first.names for s in steps) or set(first.names) != set(
        dims
    ):
        return None
    measures = {c for table in schema.ROLLUP_MEASURES.values() for c in table}
    if measures & set(dims) or any(d.startswith(schema.ROLLUP_PREVIOUS) for d in dims):
        return {}  # as part_rollups: a label named like a measure column gives no rollups
    steps = [s for s in steps if len(s.paths)]
    if not steps:
        return None
    reorder = [first.names.index(d) for d in dims]  # the part's column order
    local = [[tuple(g[i] for i in reorder) for g in s.groups] for s in steps]
    groups, rank = _ranked([g for gs in local for g in gs])
    maps = [np.array([rank[g] for g in gs], dtype=np.int64) for gs in local]
    layers = np.array(first.layers, dtype=np.int64)
    n_layers = len(layers)
    width = 1 + max(int(s.expert.max()) if len(s.expert) else 0 for s in steps)
    width = max(width, 1 + max(int(s.paths.max()) for s in steps))

    keys = np.concatenate(
        [(m[s.group] * n_layers + s.layer_pos) * width + s.expert for s, m in zip(steps, maps)]
    )
    tokens = np.concatenate([s.tokens for s in steps])
    firsts = np.concatenate([s.first for s in steps])
    if len(keys) > 1 and not (keys[1:] > keys[:-1]).all():  # a step number seen twice, steps out of order
        keys, inverse = np.unique(keys, return_inverse=True)
        tokens = np.bincount(inverse, weights=tokens, minlength=len(keys)).astype(np.int64)
        firsts = np.bincount(inverse, weights=firsts, minlength=len(keys)).astype(np.int64)
    g, rest = np.divmod(keys, n_layers * width)
    out = {
        EXPERT_COUNTS: pa.table(
            {
                **_dims_table(groups, dims, tokens_schema, g),
                "layer": pa.array(layers.astype(np.int16)[rest // width]),
                "expert": pa.array((rest % width).astype(np.int16)),
                "tokens": pa.array(tokens, pa.int64()),
                "first": pa.array(firsts, pa.int64()),
            }
        )
    }
    if n_layers < 2:
        return out
    pair_dims = [d for d in dims if d not in PAIR_FREE]
    keep = [dims.index(d) for d in pair_dims]
    pair_groups, pair_rank = _ranked([tuple(g[i] for i in keep) for g in groups])
    regroup = np.array([pair_rank[tuple(g[i] for i in keep)] for g in groups], dtype=np.int64)
    pair_cells = len(pair_groups) * (n_layers - 1) * width * width
    kt = np.int32 if pair_cells < 2**31 else np.int64
    path = np.concatenate([s.paths for s in steps])
    tg = np.concatenate([regroup.astype(kt)[m[s.token_group]] for s, m in zip(steps, maps)])
    pair = np.arange(n_layers - 1, dtype=kt)
    # key = ((pair group * (layers - 1) + layer pair) * width + expert a) * width + expert b
    pair_keys = np.add(tg[:, None] * kt(n_layers - 1), pair[None, :], dtype=kt)
    pair_keys *= kt(width)
    pair_keys += path[:, :-1]
    pair_keys *= kt(width)
    pair_keys += path[:, 1:]
    key_pairs, pair_counts = _count(pair_keys.reshape(-1), pair_cells)
    key_pairs = key_pairs.astype(np.int64, copy=False)
    g, rest = np.divmod(key_pairs, (n_layers - 1) * width * width)
    idx, rest = np.divmod(rest, width * width)
    expert_a, expert_b = np.divmod(rest, width)
    out[TOP1_PAIRS] = pa.table(
        {
            **_dims_table(pair_groups, pair_dims, tokens_schema, g),
            "layer": pa.array(layers.astype(np.int16)[idx]),
            "next_layer": pa.array(layers.astype(np.int16)[idx + 1]),
            "expert_a": pa.array(expert_a.astype(np.int16)),
            "expert_b": pa.array(expert_b.astype(np.int16)),
            "count": pa.array(pair_counts, pa.int64()),
        }
    )
    if cells_out is not None:
        frame: Any = pd.DataFrame(pair_groups, columns=pair_dims) if pair_dims else pd.DataFrame(index=[0])
        cells_out.update(
            groups=frame, group=g, pair=idx, layers=layers, a=expert_a, b=expert_b, count=pair_counts
        )
    return out

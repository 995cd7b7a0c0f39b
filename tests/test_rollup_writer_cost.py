"""The cheap paths of the writer's rollups (issue 33 item 5) give what the general paths give:
run-head lookup of routing rows vs any row order, NumPy `sum_rows` vs Arrow group_by, and the
compacted pair part written from the writer's in-memory sums vs summed from its part files."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from routescope import schema
from routescope.store import pair_totals
from routescope.store import rollups as store_rollups
from routescope.store.layout import list_parts
from routescope.store.rollups import _sum_rows_arrow, part_rollups, sum_rows
from routescope.store.writer import PartWriter

LAYERS, K, EXPERTS = 5, 2, 12


class Step:
    def __init__(self, tables: dict) -> None:
        self.tables = tables

    def to_tables(self) -> dict:
        return self.tables


def make_step(rng: np.random.Generator, step: int, tokens: int = 300) -> Step:
    width = LAYERS * K
    seq = np.arange(step * tokens, (step + 1) * tokens, dtype=np.int64) // 64
    pos = (np.arange(step * tokens, (step + 1) * tokens) % 64).astype(np.int32)
    chosen = np.argsort(rng.random((tokens * LAYERS, EXPERTS)), axis=1)[:, :K]
    routing = {
        "seq_id": np.repeat(seq, width),
        "pos": np.repeat(pos, width),
        "layer": np.tile(np.repeat(np.arange(2, 2 + LAYERS, dtype=np.int16), K), tokens),
        "slot": np.tile(np.arange(K, dtype=np.int8), tokens * LAYERS),
        "expert": chosen.reshape(-1).astype(np.int16),
        "weight": rng.random(tokens * width, dtype=np.float32),
    }
    domain = np.array(["code", "math", None, "prose"], dtype=object)[rng.integers(0, 4, tokens)]
    toks = {
        "seq_id": seq,
        "pos": pos,
        "token_id": rng.integers(0, 1000, tokens).astype(np.int32),
        "step": np.full(tokens, step, dtype=np.int32),
        "phase": np.where(pos < 32, "prefill", "decode").astype(object),
        "domain": domain,
    }
    return Step({schema.ROUTING: routing, schema.TOKENS: toks})


def tables(step: Step) -> tuple[pa.Table, pa.Table]:
    tokens = pa.Table.from_pydict(
        step.tables[schema.TOKENS], schema=schema.schema_for(schema.TOKENS, ("domain",))
    )
    routing = pa.Table.from_pydict(step.tables[schema.ROUTING], schema=schema.schema_for(schema.ROUTING))
    return tokens, routing


def normalised(rows: dict[str, pa.Table]) -> dict[str, pa.Table]:
    out = {}
    for name, table in rows.items():
        measures = [m for m in schema.ROLLUP_MEASURES[name] if m in ("tokens", "first", "count")]
        out[name] = _sum_rows_arrow(table, [c for c in table.column_names if c not in measures], measures)
    return out


@pytest.mark.parametrize("drop_tokens", [0, 17])
def test_run_heads_give_the_rollups_of_any_row_order(drop_tokens: int) -> None:
    tokens, routing = tables(make_step(np.random.default_rng(1), 3))
    tokens = tokens.slice(drop_tokens)  # routing rows without their token count under NULL dimensions
    shuffled = routing.take(pa.array(np.random.default_rng(2).permutation(routing.num_rows)))
    ordered = normalised(part_rollups(tokens, routing, coactivation=True))
    anyhow = normalised(part_rollups(tokens, shuffled, coactivation=True))
    assert set(ordered) == {schema.ROLLUP_EXPERT_COUNTS, schema.ROLLUP_TOP1_PAIRS, schema.ROLLUP_COACTIVATION}
    for name in ordered:
        assert ordered[name].equals(anyhow[name]), name
    counts = ordered[schema.ROLLUP_EXPERT_COUNTS]
    assert sum(counts["tokens"].to_pylist()) == routing.num_rows
    assert sum(counts["first"].to_pylist()) == routing.num_rows // K
    assert (counts["phase"].null_count > 0) == (drop_tokens > 0)  # the all-NULL group of tokenless rows


def test_numpy_sum_rows_equals_arrow_group_by() -> None:
    rng = np.random.default_rng(3)

    def chunk(n: int) -> pa.Table:
        return pa.table(
            {
                "phase": pa.array(
                    np.array(["prefill", "decode", None], dtype=object)[rng.integers(0, 3, n)], pa.string()
                ),
                "step": pa.array(rng.integers(-2, 4, n), pa.int32()),
                "layer": pa.array(rng.integers(0, 3, n), pa.int16()),
                "expert": pa.array(rng.integers(0, 6, n), pa.int16()),
                "count": pa.array(rng.integers(0, 50, n), pa.int64()),
            }
        )

    table = pa.concat_tables([chunk(5000), chunk(2500)])
    keys = [c for c in table.column_names if c != "count"]
    fast, arrow = sum_rows(table, ["count"]), _sum_rows_arrow(table, keys, ["count"])
    assert fast.equals(arrow)
    assert fast.num_rows < table.num_rows
    assert sum(fast["count"].to_pylist()) == sum(table["count"].to_pylist())


def write_run(path, steps: list[Step], in_memory: bool) -> tuple[PartWriter, list[pa.Table]]:
    writer = PartWriter(path, labels=("domain",), rows_per_part=4000, flush_seconds=1e9)
    if not in_memory:
        writer._pair_totals.failed = True  # close compacts from the part files
    for step in steps:
        writer.submit(step)
    writer.close()
    assert writer.rollup_errors == 0
    return writer, [pq.read_table(p) for p in list_parts(path, schema.ROLLUP_TOP1_PAIRS)]


def test_pairs_compacted_from_memory_equal_pairs_compacted_from_files(tmp_path) -> None:
    rng = np.random.default_rng(4)
    steps = [make_step(rng, i) for i in range(6)]
    memory, from_memory = write_run(tmp_path / "memory", steps, True)
    _, from_files = write_run(tmp_path / "files", steps, False)
    assert len(memory._pair_totals.parts) >= 3 and not memory._pair_totals.failed
    names = [p.name for p in list_parts(tmp_path / "memory", schema.ROLLUP_TOP1_PAIRS)]
    assert names == [f"part-00000-{len(memory._pair_totals.parts) - 1:05d}.parquet"]
    assert len(from_memory) == len(from_files) == 1
    assert from_memory[0].equals(from_files[0])
    assert from_memory[0]["domain"].null_count > 0


def test_pair_sums_beyond_their_cells_fall_back_to_the_files(tmp_path, monkeypatch) -> None:
    rng = np.random.default_rng(5)
    steps = [make_step(rng, i) for i in range(4)]
    _, expected = write_run(tmp_path / "files", steps, False)
    monkeypatch.setattr(pair_totals, "MAX_CELLS", 16)
    writer, got = write_run(tmp_path / "small", steps, True)
    assert writer._pair_totals.failed
    assert got[0].equals(expected[0])


def test_compaction_summed_a_few_parts_at_a_time_equals_all_at_once(tmp_path, monkeypatch) -> None:
    rng = np.random.default_rng(6)
    steps = [make_step(rng, i) for i in range(6)]
    _, at_once = write_run(tmp_path / "once", steps, False)
    monkeypatch.setattr(store_rollups, "COMPACT_CHUNK", 2)  # parts 0-1, then 2-3 with those sums, ...
    writer, chunked = write_run(tmp_path / "chunked", steps, False)
    assert len(writer._pair_totals.parts) >= 3  # more parts than one chunk holds
    assert len(at_once) == len(chunked) == 1
    assert chunked[0].equals(at_once[0])

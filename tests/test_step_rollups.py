"""Rollups counted per step (store/step_rollups.py, issue 33 item 5): the rows the writer sums
from its steps' counts are the rows `part_rollups` computes from the part's tokens and routing
(same values, types and order), for the shapes a recording makes (one or several modalities,
labels with NULLs, training steps, layers of several k, batches of decode steps, a step number
seen twice, steps out of order); and a part the counts cannot describe alone falls back."""

from __future__ import annotations

import itertools
import shutil
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import routescope as rs
from routescope import schema
from routescope.capture.recording.batch import StepBatch
from routescope.capture.recording.step import HostStep
from routescope.cli import main
from routescope.store.layout import list_parts
from routescope.store.rollups import part_rollups
from routescope.store.step_rollups import combine
from routescope.store.writer import PartWriter

_seq = itertools.count()


def host_step(
    rng: np.random.Generator,
    step: int,
    batch: int,
    seq_len: int,
    layers: list[int],
    k: int,
    experts: int,
    labels: dict,
    modality: bool = True,
    uniform: bool = True,
    phase: str = "prefill",
    train_step: int | None = None,
) -> HostStep:
    """A finished step as the recorder hands it over (CPU tensors: no device to wait on)."""
    chosen = np.stack(
        [np.argsort(rng.random((batch * seq_len, experts)), axis=1)[:, :k] for _ in layers]
    ).astype(np.int16)
    host = {
        "token_ids": torch.from_numpy(rng.integers(0, 100, (batch, seq_len)).astype(np.int32)),
        "positions": torch.arange(seq_len, dtype=torch.int32).repeat(batch, 1),
        "valid": torch.from_numpy(rng.random((batch, seq_len)) < 0.9),
    }
    if modality:
        host["modality"] = torch.from_numpy(rng.integers(0, 3, (batch, seq_len)).astype(np.int8))
    if uniform:
        host["experts"] = torch.from_numpy(chosen)
        host["weights"] = torch.rand(len(layers), batch * seq_len, k)
    else:
        for i in range(len(layers)):
            host[f"experts{i}"] = torch.from_numpy(chosen[i, :, : k - i % 2])  # k differs by layer
            host[f"weights{i}"] = torch.rand(batch * seq_len, k - i % 2)
    first = next(_seq) * 1000  # (seq_id, pos) never reused, as the recorder guarantees
    return HostStep(
        step=step,
        phase=phase,
        seq_ids=np.arange(first, first + batch),
        labels=labels,
        layers=layers,
        num_experts=dict.fromkeys(layers, experts),
        host=host,
        events=[],
        uniform=uniform,
        with_weights=True,
        with_stats=False,
        train_step=train_step,
        rollups=True,
    )


def part_tables(items: list) -> tuple[list, pa.Table, pa.Table]:
    """Each item's rollup counts, and the part's tokens and routing as the writer builds them."""
    tables = [item.to_tables() for item in items]
    tokens = pa.concat_tables(
        [
            pa.Table.from_pydict(
                t[schema.TOKENS],
                schema=schema.schema_for(
                    schema.TOKENS, tuple(c for c in t[schema.TOKENS] if c not in schema.TOKEN_COLUMNS)
                ),
            )
            for t in tables
        ],
        promote_options="default",
    )
    routing = pa.concat_tables(
        [pa.Table.from_pydict(t[schema.ROUTING], schema=schema.schema_for(schema.ROUTING)) for t in tables]
    )
    return [c for item in items for c in item.rollup_counts], tokens, routing


def cases() -> dict[str, list]:
    rng = np.random.default_rng(0)
    return {
        "labels with NULL, modalities, layers not in order": [
            host_step(rng, i, 3, 20, [3, 1, 5, 7], 2, 9, {"domain": d})
            for i, d in enumerate(["a", None, "b", "a"])
        ],
        "several k, two labels, text only": [
            host_step(
                rng, i, 3, 20, [0, 1, 2], 3, 16, {"domain": "x", "lang": None}, modality=False, uniform=False
            )
            for i in range(3)
        ],
        "training steps, a step number twice, out of order": [
            host_step(rng, i % 2, 2, 10, [0, 1], 2, 5, {}, phase=("prefill", "decode")[i % 2], train_step=i)
            for i in range(5)
        ][::-1],
        "a batch of one-token decode steps": [
            StepBatch(
                [
                    host_step(rng, i, 1, 1, [0, 2, 4], 2, 7, {"d": str(i % 3)}, phase="decode")
                    for i in range(40)
                ]
            )
        ],
        "a batch and a step": [
            StepBatch(
                [
                    host_step(
                        rng, i, 1, 1, [0, 2, 4], 2, 7, {"d": str(i % 3)}, phase="decode", modality=False
                    )
                    for i in range(30)
                ]
            ),
            host_step(rng, 3, 2, 5, [0, 2, 4], 2, 7, {"d": None}, modality=False),
        ],
        "one MoE layer": [host_step(rng, i, 2, 8, [1], 2, 4, {}) for i in range(2)],
        "many one-token steps, many experts (sparse counting)": [
            StepBatch([host_step(rng, i, 1, 1, [0, 1, 2, 3], 2, 64, {}, phase="decode") for i in range(150)])
        ],
    }


@pytest.mark.parametrize("case", list(cases()))
def test_summed_step_counts_are_the_rows_part_rollups_computes(case: str) -> None:
    counts, tokens, routing = part_tables(cases()[case])
    cells_want: dict = {}
    cells_got: dict = {}
    want = part_rollups(tokens, routing, cells_out=cells_want)
    got = combine(counts, tokens.schema, cells_out=cells_got)
    assert got is not None and set(got) == set(want) and want
    for name in want:
        assert got[name].equals(want[name]), name  # values, types and row order
    assert got[schema.ROLLUP_EXPERT_COUNTS]["tokens"].to_numpy().sum() == routing.num_rows
    if schema.ROLLUP_TOP1_PAIRS in want:  # the cells the writer's pair sums are fed
        for key in ("group", "pair", "a", "b", "count", "layers"):
            assert np.array_equal(cells_got[key], cells_want[key]), key
        assert cells_got["groups"].astype(object).equals(cells_want["groups"].astype(object))


def test_counts_of_other_layers_or_columns_decline() -> None:
    rng = np.random.default_rng(1)
    encoder = host_step(rng, 0, 2, 6, [0, 2], 2, 6, {})
    decoder = host_step(rng, 0, 2, 6, [1, 3], 2, 6, {})
    counts, tokens, routing = part_tables([encoder, decoder])
    assert combine(counts, tokens.schema) is None  # no token has all four layers: part_rollups says so
    assert schema.ROLLUP_TOP1_PAIRS not in part_rollups(tokens, routing)
    labelled = host_step(rng, 1, 2, 6, [0, 2], 2, 6, {"domain": "x"})
    counts, tokens, _ = part_tables([host_step(rng, 0, 2, 6, [0, 2], 2, 6, {}), labelled])
    assert combine(counts, tokens.schema) is None  # a label only some steps have
    counts, tokens, _ = part_tables([host_step(rng, 0, 2, 6, [0, 2], 2, 6, {"count": "x"})])
    assert combine(counts, tokens.schema) == {}  # a label named like a measure: no rollups, as part_rollups


class Plain:
    """A step that brings no counts (as an importer's): its part falls back to part_rollups."""

    def __init__(self, tables: dict) -> None:
        self.tables = tables

    def to_tables(self) -> dict:
        return self.tables


def test_the_writer_sums_counted_steps_and_falls_back_for_a_part_without(tmp_path) -> None:
    rng = np.random.default_rng(2)
    steps = [host_step(rng, i, 4, 16, [0, 1, 2], 2, 8, {"domain": "code"}) for i in range(6)]
    plain = Plain(host_step(rng, 6, 4, 16, [0, 1, 2], 2, 8, {"domain": "code"}).to_tables())
    writer = PartWriter(tmp_path / "run", labels=("domain",), rows_per_part=700, flush_seconds=1e9)
    for item in steps[:3]:
        writer.submit(item)
    writer.flush()  # the rollup thread's parts are on disk once flush returns
    run = tmp_path / "run"
    assert [p.name for p in list_parts(run, schema.ROLLUP_EXPERT_COUNTS)] == [
        p.name for p in list_parts(run, schema.ROUTING)
    ]
    for item in [*steps[3:], plain]:
        writer.submit(item)
    writer.close()
    assert writer.rollup_errors == 0
    run = tmp_path / "run"
    routing, tokens = list_parts(run, schema.ROUTING), list_parts(run, schema.TOKENS)
    assert writer.rollup_parts_counted == len(routing) - 1  # the last part holds the plain step
    counted = list_parts(run, schema.ROLLUP_EXPERT_COUNTS)
    assert len(routing) >= 3 and [p.name for p in counted] == [p.name for p in routing]
    for r, t, c in zip(routing, tokens, counted):
        want = part_rollups(pq.read_table(t), pq.read_table(r))[schema.ROLLUP_EXPERT_COUNTS]
        assert pq.read_table(c).equals(want), c.name


@pytest.mark.slow
def test_a_recording_writes_the_rollups_that_index_builds(tmp_path) -> None:
    """A tiny Mixtral recorded with a label, prefill and `generate` (decode steps in batches):
    the writer's rollup parts equal the ones `routescope index --force` builds from the parts."""
    from tests.tiny_models import build_tiny_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_tiny_model("mixtral", seed=0).eval()
    run = tmp_path / "run"
    torch.manual_seed(0)
    ids = torch.randint(1, 100, (3, 10))
    with rs.record(model, run, labels={"domain": "code"}, rows_per_part=1) as rec, torch.no_grad():
        model(input_ids=ids)
        rec.set_labels(domain=None)
        model.generate(
            input_ids=ids[:2, :6], attention_mask=torch.ones(2, 6, dtype=torch.long), max_new_tokens=6
        )
    writer = rec.writer
    assert writer.rollup_errors == 0
    parts = len(list_parts(run, schema.ROUTING))
    assert parts >= 3 and writer.rollup_parts_counted == parts  # every part from its steps' counts
    rebuilt = tmp_path / "rebuilt"
    shutil.copytree(run, rebuilt)
    assert main(["index", "--force", "--quiet", str(rebuilt)]) == 0
    for table in (schema.ROLLUP_EXPERT_COUNTS, schema.ROLLUP_TOP1_PAIRS):
        written, built = list_parts(run, table), list_parts(rebuilt, table)
        assert [p.name for p in written] == [p.name for p in built] and written, table
        for a, b in zip(written, built):
            assert pq.read_table(a).equals(pq.read_table(b)), (table, a.name)

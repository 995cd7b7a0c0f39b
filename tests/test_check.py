"""`routescope check RUN` / Run.verify(): runs built with pyarrow, then damaged on purpose
(repeated keys as two writers at once leave them, a manifest that disagrees with the parts,
missing routing rows, a corrupt part). Torch-free."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import routescope as rs
from routescope import schema
from routescope.cli import main
from routescope.store.layout import part_path
from routescope.store.manifest import read_manifest, write_manifest
from routescope.store.rundir import base_manifest

LAYERS, EXPERTS, K = [1, 3], 4, 2


def write_part(run: Path, table: str, columns: dict[str, np.ndarray], index: int = 0, rank: int = 0) -> Path:
    path = part_path(run, table, rank, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pydict(columns, schema=schema.schema_for(table)), path)
    return path


def build_run(run: Path, seqs: int = 3, length: int = 4, first_seq: int = 0, index: int = 0) -> int:
    """A clean run: `seqs` sequences of `length` tokens, K rows per token and MoE layer."""
    seq_id = np.repeat(np.arange(first_seq, first_seq + seqs, dtype=np.int64), length)
    pos = np.tile(np.arange(length, dtype=np.int32), seqs)
    n = len(seq_id)
    write_part(
        run,
        schema.TOKENS,
        {
            "seq_id": seq_id,
            "pos": pos,
            "token_id": np.arange(n, dtype=np.int32),
            "step": np.zeros(n, dtype=np.int32),
            "phase": np.array(["prefill"] * n),
        },
        index,
    )
    rows = [(s, p, layer, slot) for s, p in zip(seq_id, pos) for layer in LAYERS for slot in range(K)]
    s, p, layer, slot = (np.array(c) for c in zip(*rows))
    write_part(
        run,
        schema.ROUTING,
        {
            "seq_id": s.astype(np.int64),
            "pos": p.astype(np.int32),
            "layer": layer.astype(np.int16),
            "slot": slot.astype(np.int8),
            "expert": ((s + p + slot) % EXPERTS).astype(np.int16),
            "weight": np.full(len(s), 0.5, dtype=np.float32),
        },
        index,
    )
    manifest = base_manifest(
        model_type="mixtral",
        num_hidden_layers=4,
        moe_layers=LAYERS,
        num_experts={layer: EXPERTS for layer in LAYERS},
        top_k={layer: K for layer in LAYERS},
    )
    manifest.update(tokens=n, complete=True, next_seq_id=first_seq + seqs, rank=0, world_size=1)
    write_manifest(run, manifest)
    return n


def failed(run: Path) -> set[str]:
    with rs.open_run(run) as opened:
        return {f.check for f in opened.verify().problems}


@pytest.mark.slow
def test_clean_run_passes_and_exits_0(tmp_path, capsys):
    build_run(tmp_path / "run")
    with rs.open_run(tmp_path / "run") as run:
        result = run.verify()
    assert result.ok and not result.problems and len(result.findings) == 9  # + rollups_match
    assert main(["check", str(tmp_path / "run")]) == 0
    assert "every invariant holds" in capsys.readouterr().out


@pytest.mark.slow
def test_two_writers_damage_is_found(tmp_path, capsys):
    """What two appenders at once left: the same seq ids twice, the manifest of the last."""
    run = tmp_path / "run"
    n = build_run(run)
    shutil.copy(part_path(run, schema.TOKENS, 0, 0), part_path(run, schema.TOKENS, 0, 1))
    shutil.copy(part_path(run, schema.ROUTING, 0, 0), part_path(run, schema.ROUTING, 0, 1))
    assert failed(run) == {"unique_token_keys", "unique_routing_keys", "k_rows_per_token", "manifest_counts"}

    assert main(["check", str(run)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL  unique_token_keys: {n} (seq_id, pos) keys appear more than once" in out
    assert f"manifest {n}, parts {2 * n}" in out
    assert main(["check", str(run), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False
    dup = next(f for f in doc["findings"] if f["check"] == "unique_token_keys")
    assert dup["count"] == n and dup["examples"][0] == {"seq_id": 0, "pos": 0, "copies": 2}


@pytest.mark.slow
def test_manifest_that_disagrees_with_the_parts(tmp_path):
    run = tmp_path / "run"
    n = build_run(run)
    manifest = read_manifest(run)
    write_manifest(run, {**manifest, "tokens": n - 3})
    assert failed(run) == {"manifest_counts"}
    write_manifest(run, {**manifest, "next_seq_id": 1})  # an append would reuse seq ids 1 and 2
    assert failed(run) == {"next_seq_id"}


@pytest.mark.slow
def test_rank_fragments_are_counted_per_rank(tmp_path):
    run = tmp_path / "run"
    build_run(run)
    first = 1 << 40
    write_part(
        run,
        schema.TOKENS,
        {
            "seq_id": np.array([first], dtype=np.int64),
            "pos": np.array([0], dtype=np.int32),
            "token_id": np.array([5], dtype=np.int32),
            "step": np.array([0], dtype=np.int32),
            "phase": np.array(["prefill"]),
        },
        rank=1,
    )
    write_manifest(run, {**read_manifest(run), "world_size": 2})
    fragment = {**read_manifest(run), "rank": 1, "tokens": 1, "next_seq_id": first + 1}
    write_manifest(run, fragment, name="manifest.rank=1.json")
    # rank 1's token has no routing rows at all
    assert failed(run) == {"k_rows_per_token"}
    write_manifest(run, {**fragment, "tokens": 2}, name="manifest.rank=1.json")
    assert failed(run) == {"k_rows_per_token", "manifest_counts"}


@pytest.mark.slow
def test_missing_and_orphan_routing_rows_and_a_corrupt_part(tmp_path, capsys):
    run = tmp_path / "run"
    build_run(run)
    routing = pq.read_table(part_path(run, schema.ROUTING, 0, 0))
    keep = pa.compute.not_equal(routing["seq_id"], 2)  # sequence 2 lost its routing
    pq.write_table(routing.filter(keep), part_path(run, schema.ROUTING, 0, 0))
    build_run(run, seqs=1, first_seq=7, index=1)  # a later part ...
    part_path(run, schema.TOKENS, 0, 1).unlink()  # ... whose tokens never landed
    write_manifest(run, {**read_manifest(run), "tokens": 12, "next_seq_id": 8})
    assert failed(run) == {"k_rows_per_token", "routing_has_tokens"}

    part_path(run, schema.ROUTING, 0, 2).parent.mkdir(parents=True, exist_ok=True)
    part_path(run, schema.ROUTING, 0, 2).write_bytes(b"PAR1 truncated")
    assert main(["check", str(run)]) == 1
    assert "FAIL  parts_readable: 1 corrupt or truncated part(s)" in capsys.readouterr().out


def test_bad_input_exits_2(tmp_path, capsys):
    assert main(["check", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["check", str(tmp_path / "empty")]) == 2
    assert "manifest.json" in capsys.readouterr().err


def test_out_of_range_routing(tmp_path):
    run = tmp_path / "run"
    build_run(run)
    routing = pq.read_table(part_path(run, schema.ROUTING, 0, 0)).to_pydict()
    routing["expert"][0] = EXPERTS  # an expert id the layer does not have
    pq.write_table(
        pa.Table.from_pydict(routing, schema=schema.schema_for(schema.ROUTING)),
        part_path(run, schema.ROUTING, 0, 0),
    )
    assert failed(run) == {"routing_in_range"}

"""Multi-process recording: two gloo ranks started by torchrun write one run that reads as one dataset.

The file is also the worker script: torchrun runs it with `worker OUT [--die-rank R]`.
Each rank records every world_size-th batch of a fixed corpus; the merged run must equal a
single-process recording of the same batches, row for row (seq ids differ by rank offset,
so rows are matched by the token content of their sequence, pos, layer and slot).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import routescope as rs
from routescope.capture.recording.recorder import SEQ_ID_RANK_SHIFT

pytestmark = pytest.mark.slow  # README's test command leaves this file out (-m 'not slow')

ROOT = Path(__file__).resolve().parents[1]
NUM_BATCHES = 6


def corpus() -> list[dict[str, torch.Tensor]]:
    """Fixed batches of distinct random sequences with left padding (vocab of the tiny models)."""
    generator = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(NUM_BATCHES):
        ids = torch.randint(1, 128, (3, 12), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        mask[2, :5] = 0
        batches.append({"input_ids": ids * mask, "attention_mask": mask})
    return batches


def record_batches(model, out: Path, batches, **options) -> None:
    # One thread everywhere: matmul results then agree to the bit across processes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with rs.record(model, out, **options), torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        torch.set_num_threads(threads)


def worker(out: Path, die_rank: int | None) -> None:
    import torch.distributed as dist

    from tests.tiny_models import build_tiny_model

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_tiny_model("mixtral", seed=0)
    mine = corpus()[rank::world]
    if rank == die_rank:
        rec = rs.record(model, out, flush_seconds=3600)
        rec.__enter__()
        with torch.no_grad():
            model(**mine[0])
        rec.flush()  # what was flushed must survive the crash
        with torch.no_grad():
            model(**mine[1])  # recorded but never flushed: lost with the process
        dist.barrier()  # let the other ranks finish first, then die without cleanup
        os._exit(17)
    record_batches(model, out, mine)
    dist.barrier()
    dist.destroy_process_group()


def run_torchrun(out: Path, die_rank: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        __file__,
        "worker",
        str(out),
    ]
    if die_rank is not None:
        cmd += ["--die-rank", str(die_rank)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)


def keyed_rows(run: rs.Run) -> pd.DataFrame:
    """Routing rows keyed by (sequence content, pos, layer, slot) instead of seq_id."""
    tokens = run.sql("SELECT seq_id, pos, token_id FROM tokens ORDER BY seq_id, pos")
    content = tokens.groupby("seq_id")["token_id"].apply(lambda s: " ".join(map(str, s)))
    routing = run.sql("SELECT seq_id, pos, layer, slot, expert, weight FROM routing")
    routing["content"] = routing["seq_id"].map(content)
    assert routing["content"].notna().all()
    keys = ["content", "pos", "layer", "slot"]
    return (
        routing.drop(columns="seq_id").sort_values(keys).reset_index(drop=True)[[*keys, "expert", "weight"]]
    )


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    from tests.tiny_models import build_tiny_model

    out = tmp_path_factory.mktemp("single") / "run"
    record_batches(build_tiny_model("mixtral", seed=0), out, corpus())
    return out


def test_two_ranks_equal_single_process(tmp_path, single_run):
    out = tmp_path / "run"
    result = run_torchrun(out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "manifest.json").is_file() and (out / "manifest.rank=1.json").is_file()
    assert sorted(p.name for p in (out / "routing").iterdir()) == ["rank=0", "rank=1"]

    with rs.open_run(out) as run, rs.open_run(single_run) as single:
        assert run.complete
        assert run.manifest["world_size"] == 2
        assert [r["rank"] for r in run.manifest["ranks"]] == [0, 1]
        assert all(r["complete"] for r in run.manifest["ranks"])
        assert run.manifest["tokens"] == single.manifest["tokens"]
        assert run.sql("SELECT count(*) AS n FROM tokens")["n"][0] == single.manifest["tokens"]

        seqs = run.sql("SELECT DISTINCT seq_id, rank FROM tokens")
        assert seqs["seq_id"].is_unique
        assert (seqs[seqs["rank"] == 1]["seq_id"] >= 1 << SEQ_ID_RANK_SHIFT).all()
        assert (seqs[seqs["rank"] == 0]["seq_id"] < 1 << SEQ_ID_RANK_SHIFT).all()

        merged, expected = keyed_rows(run), keyed_rows(single)
        pd.testing.assert_frame_equal(merged, expected)
        if hasattr(run, "expert_load"):  # analysis reads all ranks as one dataset
            pd.testing.assert_frame_equal(run.expert_load(), single.expert_load())


def test_dead_rank_leaves_readable_incomplete_run(tmp_path, single_run):
    out = tmp_path / "run"
    result = run_torchrun(out, die_rank=1)
    assert result.returncode != 0  # torchrun reports the failed rank

    with rs.open_run(out) as run, rs.open_run(single_run) as single:
        assert not run.complete
        ranks = {r["rank"]: r for r in run.manifest["ranks"]}
        assert ranks[0]["complete"] and not ranks[1]["complete"]

        # rank 0 has all of its batches; rank 1 only its flushed first batch
        batches = corpus()
        rank0_tokens = sum(int(b["attention_mask"].sum()) for b in batches[0::2])
        rank1_flushed = int(batches[1]["attention_mask"].sum())
        counts = run.sql("SELECT rank, count(*) AS n FROM tokens GROUP BY rank ORDER BY rank")
        assert counts["n"].tolist() == [rank0_tokens, rank1_flushed]
        assert run.manifest["tokens"] == rank0_tokens + rank1_flushed

        # whatever was written equals the single-process recording of the same sequences
        merged, expected = keyed_rows(run), keyed_rows(single)
        joined = merged.merge(expected, on=["content", "pos", "layer", "slot"], suffixes=("", "_single"))
        assert len(joined) == len(merged)
        assert (joined["expert"] == joined["expert_single"]).all()
        assert (joined["weight"] == joined["weight_single"]).all()


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "worker":
    die = int(sys.argv[sys.argv.index("--die-rank") + 1]) if "--die-rank" in sys.argv else None
    worker(Path(sys.argv[2]), die)


def test_rank_without_fragment_marks_run_incomplete(tiny_model, tmp_path):
    """Rank 0 of a world of 2 recorded, rank 1 never started: the run says so."""
    model = tiny_model("mixtral")
    out = tmp_path / "run"
    record_batches(model, out, corpus()[:1], rank=0, world_size=2)
    with rs.open_run(out) as run:
        assert not run.complete
        assert run.manifest["ranks"][1] == {
            "rank": 1,
            "tokens": 0,
            "steps": 0,
            "complete": False,
            "missing": True,
        }
        assert run.manifest["tokens"] == run.manifest["ranks"][0]["tokens"] > 0

    # rank 1 records later into the same run: now complete, tokens summed, seq ids apart
    record_batches(model, out, corpus()[1:2], rank=1, world_size=2)
    with rs.open_run(out) as run:
        assert run.complete and run.manifest["world_size"] == 2
        assert run.manifest["tokens"] == sum(r["tokens"] for r in run.manifest["ranks"])
        assert run.sql("SELECT count(*) AS n FROM tokens")["n"][0] == run.manifest["tokens"]
        assert run.sql("SELECT min(seq_id) AS s FROM tokens WHERE rank = 1")["s"][0] == 1 << SEQ_ID_RANK_SHIFT

    # a single process overwriting the run replaces every rank's files
    record_batches(model, out, corpus()[:1], mode="overwrite")
    assert not list(out.glob("manifest.rank=*.json"))
    with rs.open_run(out) as run:
        assert run.complete and "ranks" not in run.manifest
        assert run.sql("SELECT DISTINCT rank FROM tokens")["rank"].tolist() == [0]

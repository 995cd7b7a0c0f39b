"""Writer throughput: routescope's PartWriter against a bare pyarrow.parquet.write_table.

Every step holds routing rows and its tokens (step, phase and a `domain` label). The bare
baseline writes the same tokens and routing rows with the same batching into parts and the
same encodings; the writer is timed without rollups and with them (`rollup_expert_counts`,
`rollup_top1_pairs` per part, the pairs compacted at close), the three interleaved round by
round in one process. With rollups every step counts its cells from its dense
[layers, tokens, k] expert ids in `to_tables` (on the writer thread, as the recorder's
HostStep does: store/step_rollups.py), so the timed writer run holds all the rollup work.
A fourth writer run, interleaved with the others, takes the writer's fallback
(`part_rollups` on each part's tables: the path of steps that carry no counts, and the only
path before the counts); its rollup parts are checked equal to the counted ones. The ratio is rows/s of the writer over rows/s of the bare writes, the
medians of the rounds. Peak RSS growth shows that host memory stays bounded.

    python benchmarks/writer_throughput.py [--steps 60 --tokens 2048 --layers 8 --top-k 8 --experts 64 --rounds 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from routescope import schema
from routescope.store.step_rollups import step_counts
from routescope.store.writer import PartWriter

LABELS = ("domain",)
CPU = {"last": 0.0}  # CPU seconds of the process (every thread) in the last timed run
ROWS_PER_PART = 4_000_000


class Step:
    """One synthetic step: its tables, and (with `rollups`) its rollup counts made in
    `to_tables` from the dense expert ids, as capture/recording/step.py HostStep makes them."""

    def __init__(self, tables: dict[str, dict[str, np.ndarray]], experts: np.ndarray | None = None) -> None:
        self.tables = tables
        self.experts = experts  # [layers, tokens, k]
        self.rollups = False
        self.rollup_counts: list | None = None

    def to_tables(self) -> dict[str, dict[str, np.ndarray]]:
        self.rollup_counts = None
        if self.rollups and self.experts is not None:
            toks = self.tables[schema.TOKENS]
            codes = toks["seq_id"] % 4  # the `domain` label's value is seq_id % 4
            layers = list(range(self.experts.shape[0]))
            self.rollup_counts = [step_counts(toks, layers, self.experts, codes)]
        return self.tables


def make_step(rng: np.random.Generator, step: int, tokens: int, layers: int, k: int, experts: int) -> Step:
    width = layers * k
    seq_ids = np.arange(step * tokens, (step + 1) * tokens, dtype=np.int64) // 512
    pos = (np.arange(step * tokens, (step + 1) * tokens) % 512).astype(np.int32)
    chosen = np.argsort(rng.random((tokens * layers, experts), dtype=np.float32), axis=1)[:, :k]
    routing = {
        "seq_id": np.repeat(seq_ids, width),
        "pos": np.repeat(pos, width),
        "layer": np.tile(np.repeat(np.arange(layers, dtype=np.int16), k), tokens),
        "slot": np.tile(np.arange(k, dtype=np.int8), tokens * layers),
        "expert": chosen.reshape(-1).astype(np.int16),
        "weight": rng.random(tokens * width, dtype=np.float32),
    }
    domains = np.array(["code", "math", "prose", "multilingual"], dtype=object)
    toks = {
        "seq_id": seq_ids,
        "pos": pos,
        "token_id": rng.integers(0, 50_000, tokens).astype(np.int32),
        "step": np.full(tokens, step, dtype=np.int32),
        "phase": np.full(tokens, "prefill", dtype=object),
        "domain": domains[seq_ids % 4],
    }
    experts = chosen.reshape(tokens, layers, k).transpose(1, 0, 2).astype(np.int16)
    return Step({schema.ROUTING: routing, schema.TOKENS: toks}, np.ascontiguousarray(experts))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bare(steps: list[Step], out: Path) -> float:
    """The same tokens and routing rows, batched into parts as the writer does, same encodings."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    buffered: dict[str, list[pa.Table]] = {schema.ROUTING: [], schema.TOKENS: []}
    index, pending = 0, 0
    schemas = {
        schema.ROUTING: schema.schema_for(schema.ROUTING),
        schema.TOKENS: schema.schema_for(schema.TOKENS, LABELS),
    }
    for step in steps:
        for name, cols in step.tables.items():
            buffered[name].append(pa.Table.from_pydict(cols, schema=schemas[name]))
            pending += len(cols["seq_id"])
        if pending >= ROWS_PER_PART or step is steps[-1]:
            for name in (schema.ROUTING, schema.TOKENS):
                table = pa.concat_tables(buffered[name])
                split = ["weight"] if "weight" in table.column_names else []
                pq.write_table(
                    table,
                    out / f"{name}-{index}.parquet",
                    compression="zstd",
                    use_dictionary=[c for c in table.column_names if c not in split],
                    use_byte_stream_split=split or False,
                    write_statistics=True,
                )
                buffered[name] = []
            index, pending = index + 1, 0
    CPU["last"] = time.process_time() - cpu_start
    return time.perf_counter() - start


def writer(steps: list[Step], out: Path, rollups: bool, counted: bool = True) -> tuple[float, PartWriter]:
    """`counted`: the steps bring their rollup counts (the recorder's path); else the writer
    computes the rollups from each part's tables (`part_rollups`)."""
    shutil.rmtree(out, ignore_errors=True)
    for step in steps:
        step.rollups = rollups and counted
    start, cpu_start = time.perf_counter(), time.process_time()
    w = PartWriter(out, labels=LABELS, rows_per_part=ROWS_PER_PART, flush_seconds=1e9, rollups=rollups)
    for step in steps:
        w.submit(step)
    w.close()
    CPU["last"] = time.process_time() - cpu_start
    return time.perf_counter() - start, w


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    steps = [make_step(rng, i, args.tokens, args.layers, args.top_k, args.experts) for i in range(args.steps)]
    routing_rows = sum(len(s.tables[schema.ROUTING]["seq_id"]) for s in steps)
    rows = routing_rows + args.steps * args.tokens
    tmp = Path(tempfile.mkdtemp(prefix="rs-writer-"))
    times: dict[str, list[float]] = {"bare": [], "off": [], "on": [], "fallback": []}
    cpu: dict[str, list[float]] = {k: [] for k in times}
    rss_growth = 0.0
    try:
        for _ in range(args.rounds):  # interleaved: bare, writer without rollups, writer with
            times["bare"].append(bare(steps, tmp / "bare"))
            cpu["bare"].append(CPU["last"])
            times["off"].append(writer(steps, tmp / "off", False)[0])
            cpu["off"].append(CPU["last"])
            rss_before = rss_mb()
            took, w = writer(steps, tmp / "on", True)
            times["on"].append(took)
            cpu["on"].append(CPU["last"])
            rss_growth = max(rss_growth, rss_mb() - rss_before)
            written = sum(
                pq.read_metadata(p).num_rows
                for p in w.parts_written
                if p.parent.parent.name in ("routing", "tokens")
            )
            assert written == rows and w.rollup_errors == 0, (written, rows, w.rollup_errors)
            took, w = writer(steps, tmp / "fallback", True, counted=False)
            times["fallback"].append(took)
            cpu["fallback"].append(CPU["last"])
            for table in (schema.ROLLUP_EXPERT_COUNTS, schema.ROLLUP_TOP1_PAIRS):
                counted, fallback = (pq.read_table(tmp / run / table) for run in ("on", "fallback"))
                assert counted.equals(fallback), table  # the same rows, types and order
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{routing_rows:,} routing rows + {args.steps * args.tokens:,} tokens in {args.steps} steps "
        f"({args.layers} layers x {args.experts} experts, top-{args.top_k}); median of {args.rounds} interleaved rounds"
    )
    print(
        f"bare pyarrow write_table (tokens + routing): {med['bare']:.2f} s  ({rows / med['bare'] / 1e6:.1f} M rows/s)"
    )
    for key, what in (
        ("off", "without rollups"),
        ("on", "with rollups   "),
        ("fallback", "with rollups from part_rollups (fallback, the path before)"),
    ):
        print(
            f"routescope PartWriter {what}: {med[key]:.2f} s  ({rows / med[key] / 1e6:.1f} M rows/s)  "
            f"ratio (writer / bare): {med['bare'] / med[key]:.2f}"
        )
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    print(
        "CPU seconds, every thread (what the wall time becomes when no core is free): "
        + ", ".join(f"{k} {v:.2f}" for k, v in cpu_med.items())
        + f"; with rollups / bare: {cpu_med['on'] / cpu_med['bare']:.2f}x"
    )
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(
        f"rollup cost (with / without): {med['on'] / med['off']:.2f}x   peak RSS growth during writer: {rss_growth:.0f} MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

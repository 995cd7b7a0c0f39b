"""Writer throughput: routescope's PartWriter against a bare pyarrow.parquet.write_table.

Both write the same routing rows with the same compression; the ratio is rows/s of the
writer over rows/s of the bare call. Peak RSS growth shows that host memory stays bounded.

    python benchmarks/writer_throughput.py [--steps 60 --tokens 2048 --layers 8 --top-k 8]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from routescope import schema
from routescope.store.writer import PartWriter


class Step:
    def __init__(self, columns: dict[str, np.ndarray]) -> None:
        self.columns = columns

    def to_tables(self) -> dict[str, dict[str, np.ndarray]]:
        return {schema.ROUTING: self.columns}


def make_step(rng: np.random.Generator, step: int, tokens: int, layers: int, k: int, experts: int) -> dict:
    width = layers * k
    seq = np.repeat(np.arange(step * tokens, (step + 1) * tokens, dtype=np.int64), width)
    return {
        "seq_id": seq,
        "pos": np.repeat(np.arange(tokens, dtype=np.int32), width),
        "layer": np.tile(np.repeat(np.arange(layers, dtype=np.int16), k), tokens),
        "slot": np.tile(np.arange(k, dtype=np.int8), tokens * layers),
        "expert": rng.integers(0, experts, tokens * width).astype(np.int16),
        "weight": rng.random(tokens * width, dtype=np.float32),
    }


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    steps = [make_step(rng, i, args.tokens, args.layers, args.top_k, args.experts) for i in range(args.steps)]
    rows = sum(len(s["seq_id"]) for s in steps)
    tmp = Path(tempfile.mkdtemp(prefix="rs-writer-"))
    rows_per_part = 4_000_000

    start = time.perf_counter()
    buffered, index, pending = [], 0, 0
    for cols in steps:  # the bare baseline: same batching into parts, same encodings
        buffered.append(pa.Table.from_pydict(cols, schema=schema.schema_for(schema.ROUTING)))
        pending += len(cols["seq_id"])
        if pending >= rows_per_part or cols is steps[-1]:
            pq.write_table(
                pa.concat_tables(buffered),
                tmp / f"bare-{index}.parquet",
                compression="zstd",
                use_dictionary=["seq_id", "pos", "layer", "slot", "expert"],
                use_byte_stream_split=["weight"],
            )
            buffered, index, pending = [], index + 1, 0
    bare = time.perf_counter() - start

    rss_before = rss_mb()
    start = time.perf_counter()
    writer = PartWriter(tmp / "run", rows_per_part=rows_per_part, flush_seconds=1e9)
    for cols in steps:
        writer.submit(Step(cols))
    writer.close()
    ours = time.perf_counter() - start
    rss_growth = rss_mb() - rss_before
    written = sum(pq.read_metadata(p).num_rows for p in writer.parts_written)
    assert written == rows, (written, rows)
    print(f"{rows:,} routing rows in {args.steps} steps")
    print(f"bare pyarrow write_table: {bare:.2f} s  ({rows / bare / 1e6:.1f} M rows/s)")
    print(f"routescope PartWriter:    {ours:.2f} s  ({rows / ours / 1e6:.1f} M rows/s)")
    print(
        f"throughput ratio (writer / bare): {bare / ours:.2f}   peak RSS growth during writer: {rss_growth:.0f} MB"
    )
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

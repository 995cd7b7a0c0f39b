"""The writer's queue is bounded in host bytes, not only in steps: a slow disk (here, a slow
observer on the writer thread) makes the caller wait instead of piling up host memory."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from routescope import schema
from routescope.store.writer import PartWriter


class Step:
    """A finished step as the recorder submits it: `nbytes` of host memory until converted."""

    def __init__(self, seq: int, rows: int = 1000) -> None:
        self.nbytes = rows * 64
        self.seq = seq
        self.rows = rows

    def to_tables(self):
        seq = np.full(self.rows, self.seq, dtype=np.int64)
        pos = np.arange(self.rows, dtype=np.int32)
        return {
            schema.TOKENS: {
                "seq_id": seq,
                "pos": pos,
                "token_id": pos,
                "step": np.full(self.rows, self.seq, dtype=np.int32),
                "phase": np.full(self.rows, "prefill", dtype=object),
            }
        }


@pytest.mark.slow
def test_pending_bytes_never_pass_the_bound(tmp_path):
    peak = []
    gate = threading.Event()

    def slow(tables) -> None:
        gate.wait(0.02)

    writer = PartWriter(tmp_path, max_pending=1000, max_pending_bytes=3 * 64_000, observers=[slow])
    sampler_stop = threading.Event()

    def sample() -> None:
        while not sampler_stop.is_set():
            peak.append(writer._pending_bytes)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    for i in range(30):
        writer.submit(Step(i))
    writer.close()
    sampler_stop.set()
    sampler.join()
    assert max(peak) <= 3 * 64_000  # never more than the bound, though 1000 steps could queue
    assert writer._pending_bytes == 0
    assert writer.tokens_written == 30 * 1000


def test_a_step_larger_than_the_bound_still_goes_through(tmp_path):
    writer = PartWriter(tmp_path, max_pending_bytes=10)
    writer.submit(Step(0))
    writer.submit(Step(1))
    writer.close()
    assert writer.tokens_written == 2000

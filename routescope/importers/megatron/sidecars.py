"""Megatron router-trace sidecars: the bf16 logits file and the router-state dump.

`logits_rank{r}.bin` is raw bfloat16 (Megatron writes `tensor.view(torch.int16).numpy().tobytes()`),
read here with NumPy alone: the uint16 bit patterns shifted into the high half of a float32
are exactly the bf16 values. `router_state_rank{r}.pt` (torch.save of a dict keyed by
(block, mtp_idx, layer), or by the bare layer in the pre-merge tracer) is the one file that
needs torch, imported lazily through `load_torch_file`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from routescope.importers.core.errors import ImportFormatError
from routescope.importers.core.files import load_torch_file
from routescope.importers.megatron.trace import Skips, TraceRecord


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 values (exact)."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


class LogitsFile:
    """One rank's `logits_rank{r}.bin`, memory-mapped; `read(record)` gives its [tokens, E] float32 logits."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = path.stat().st_size if path.exists() else -1
        self._data = np.memmap(path, dtype=np.uint8, mode="r") if self.size > 0 else None

    def read(self, record: TraceRecord, skips: Skips) -> np.ndarray | None:
        """The record's logits, or None (after `skips.bad`) when the sidecar does not hold them."""
        assert record.logits_at is not None
        offset, nbytes, shape = record.logits_at
        n = record.top.shape[0]
        if self.size < 0:
            skips.bad(record.where, "bad_logits", f"the record points into {self.path}, which does not exist")
            return None
        if len(shape) != 2 or shape[0] != n or shape[1] < 1 or nbytes != shape[0] * shape[1] * 2:
            skips.bad(
                record.where,
                "bad_logits",
                f"logit_shape {shape} and logit_bytes {nbytes} do not fit num_tokens {n} bfloat16 rows",
            )
            return None
        if offset < 0 or offset + nbytes > self.size:
            skips.bad(
                record.where,
                "bad_logits",
                f"logits at bytes {offset}..{offset + nbytes} lie past the end of {self.path} ({self.size} bytes)",
            )
            return None
        if self._data is None:  # zero tokens, empty sidecar
            return np.zeros((0, shape[1]), dtype=np.float32)
        raw = np.frombuffer(self._data[offset : offset + nbytes].tobytes(), dtype="<u2")
        return bf16_to_float32(raw).reshape(shape)


def rank_by_logits(top: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, int]:
    """`top`'s columns reordered by descending logit (slot 0 = first choice) and the rows where two
    chosen experts have equal bf16 logits (their order stays as written)."""
    chosen = np.take_along_axis(logits, top, axis=1)
    order = np.argsort(-chosen, axis=1, kind="stable")
    ranked = np.take_along_axis(top, order, axis=1)
    chosen_sorted = np.take_along_axis(chosen, order, axis=1)
    ties = int((np.diff(chosen_sorted, axis=1) == 0).any(axis=1).sum()) if top.shape[1] > 1 else 0
    return ranked, ties


def logit_statistics(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """As the recorder computes them from router logits (capture/recording/router_stats.py,
    `router_statistics`): per-expert sum of the softmax (accumulated in float64), and per
    token the entropy normalised by log E and the top-1 minus top-2 probability margin."""
    num_experts = logits.shape[1]
    if not len(logits):
        empty = np.zeros(0, dtype=np.float32)
        return np.zeros(num_experts), empty, empty
    probs = np.exp(logits - logits.max(axis=1, keepdims=True), dtype=np.float32)
    probs /= probs.sum(axis=1, keepdims=True)
    prob_sum = probs.sum(axis=0, dtype=np.float64)
    entropy = -(probs * np.log(np.maximum(probs, 1e-30))).sum(axis=1) / max(np.log(num_experts), 1e-30)
    if num_experts > 1:
        top2 = np.partition(probs, num_experts - 2, axis=1)[:, -2:]  # [second, first]
        margin = top2[:, 1] - top2[:, 0]
    else:
        margin = probs[:, 0]
    return prob_sum, entropy.astype(np.float32), margin.astype(np.float32)


def router_state_experts(path: Path) -> dict[str, int]:
    """Experts per router in a `router_state_rank{r}.pt`: {description: rows of its weight}."""
    state: Any = load_torch_file(path, "a Megatron router-state dump")
    if not isinstance(state, dict):
        raise ImportFormatError(f"{path}: expected a dict of router states, got {type(state).__name__}")
    found = {}
    for key, value in state.items():
        weight = value.get("weight") if isinstance(value, dict) else None
        shape = getattr(weight, "shape", None)
        if shape is None or len(shape) != 2:
            raise ImportFormatError(f"{path}: router {key!r} has no 2-D 'weight' [experts, hidden]")
        found[str(key)] = int(shape[0])
    if not found:
        raise ImportFormatError(f"{path}: holds no router state")
    return found

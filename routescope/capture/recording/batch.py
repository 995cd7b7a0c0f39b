"""Finished steps handed to the writer together (a `StepBatch`), and turned into tables there.

Decode steps are small: turning each into tables on its own would take the writer thread (and
the GIL) once per step. Steps of one shape are converted in one vectorised pass; a step that
fails is lost alone. Runs on the writer thread (capture/recording/step.py's `HostStep`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from routescope import schema
from routescope.capture.recording.modality import MODALITIES, modality_names
from routescope.capture.recording.rows import KeptRows
from routescope.capture.recording.step import HostStep, host_arrays, host_numpy
from routescope.store.step_rollups import StepInput, step_counts


@dataclass
class StepBatch:
    """Finished steps handed to the writer together: decode steps are small, and turning each
    into tables on its own would take the writer thread (and the GIL) once per step. Steps of
    one shape are converted in one vectorised pass; a step that fails is lost alone."""

    steps: list[HostStep]
    rollup_counts: list[StepInput] | None = field(default=None, repr=False)  # as HostStep's

    @property
    def nbytes(self) -> int:
        size = 0
        for step in self.steps:  # a loop, not sum(...): once per decode step
            size += step.nbytes
        return size

    def to_tables(self) -> dict[str, dict[str, np.ndarray]]:
        steps = self.steps
        self.rollup_counts = None
        if len(steps) > 1 and _mergeable(steps):
            try:
                tables, counts = _merged_tables(steps)
                self.rollup_counts = counts
                return tables
            except Exception:
                pass  # one of them fails: convert them one by one, so only that one is lost
        parts = [step.to_tables() for step in steps]
        if all(step.rollup_counts is not None for step, part in zip(steps, parts) if part):
            self.rollup_counts = [c for step, part in zip(steps, parts) if part for c in step.rollup_counts]
        return _concat(parts)


def _mergeable(steps: list[HostStep]) -> bool:
    first = steps[0]
    shape = (
        tuple(first.layers),
        first.with_weights,
        tuple(first.labels),
        first.train_step is None,
        "modality" in first.host,
    )
    return all(
        step.uniform
        and not step.with_stats
        and (
            tuple(step.layers),
            step.with_weights,
            tuple(step.labels),
            step.train_step is None,
            "modality" in step.host,
        )
        == shape
        for step in steps
    )


def _merged_tables(steps: list[HostStep]) -> tuple[dict[str, dict[str, np.ndarray]], list[StepInput] | None]:
    """HostStep.to_tables of several steps at once (same layers, options and label names), and
    their rollup counts when the steps ask for them."""
    for step in steps:
        for event in step.events:
            event.synchronize()
    kept = {key: _stacked_together(steps, key) for key in ("experts", "weights")}
    hosts = [
        host_arrays(step.host, {k: v[i] for k, v in kept.items() if v is not None})
        for i, step in enumerate(steps)
    ]
    sizes = [h["valid"].size for h in hosts]
    valid = np.concatenate([h["valid"].reshape(-1) for h in hosts])
    keep = np.flatnonzero(valid)
    n = len(keep)

    def flat(key: str) -> np.ndarray:
        return np.concatenate([h[key].reshape(-1) for h in hosts])[keep]

    def each(values: list, dtype: Any) -> np.ndarray:
        return np.repeat(np.asarray(values, dtype=dtype), sizes)[keep]

    seq = np.concatenate(
        [np.repeat(s.seq_ids.astype(np.int64), h["valid"].shape[1]) for s, h in zip(steps, hosts)]
    )[keep]
    pos = flat("positions").astype(np.int32)
    first = steps[0]
    tokens = {
        "seq_id": seq,
        "pos": pos,
        "token_id": flat("token_ids").astype(np.int32),
        "step": each([s.step for s in steps], np.int32),
        "phase": each([s.phase for s in steps], object),
        "modality": (
            modality_names(flat("modality"))
            if "modality" in hosts[0]
            else np.full(n, schema.TOKEN_EXTRA_DEFAULTS["modality"], dtype=object)
        ),
        "stack": each([s.stack for s in steps], object),
    }
    if first.train_step is not None:
        tokens[schema.TRAIN_STEP] = each([s.train_step for s in steps], np.int32)
    for label in first.labels:
        tokens[label] = each([s.labels[label] for s in steps], object)
    experts = np.concatenate(
        [h["experts"].reshape(h["experts"].shape[0], -1, h["experts"].shape[-1]) for h in hosts], axis=1
    )[:, keep]
    weights = (
        np.concatenate(
            [h["weights"].reshape(h["weights"].shape[0], -1, h["weights"].shape[-1]) for h in hosts], axis=1
        )[:, keep]
        if first.with_weights
        else None
    )
    per_layer = [(experts[i], weights[i] if weights is not None else None) for i in range(len(first.layers))]
    tables = {schema.TOKENS: tokens, schema.ROUTING: first._routing(per_layer, seq, pos)}
    if not all(step.rollups for step in steps):
        return tables, None
    codes = each(list(range(len(steps))), np.int64) * len(MODALITIES)  # one group per step and modality
    if "modality" in hosts[0]:
        codes += flat("modality")
    return tables, [step_counts(tokens, first.layers, experts, codes)]


def _stacked_together(steps: list[HostStep], key: str) -> list[np.ndarray] | None:
    """The kept router tensors (rows.KeptRows) of steps of one shape, stacked in one call, as
    each step's [layers, tokens, k] array; None where they are not all kept alike (then
    each step stacks its own, and names a layer of the wrong shape)."""
    rows = [step.host.get(key) for step in steps]
    first = rows[0]
    if not isinstance(first, KeptRows):
        return None
    shape = (len(first.tensors), first.tokens, first.k)
    if not all(isinstance(r, KeptRows) and (len(r.tensors), r.tokens, r.k) == shape for r in rows):
        return None
    with torch.no_grad():
        try:
            stacked = torch.stack([t for r in rows for t in r.tensors])
        except RuntimeError:  # shapes or devices differ
            return None
    if stacked.numel() != len(rows) * shape[0] * shape[1] * shape[2]:
        return None
    return list(host_numpy(stacked.view(len(rows), *shape)))


def _concat(parts: list[dict[str, dict[str, np.ndarray]]]) -> dict[str, dict[str, np.ndarray]]:
    """Tables of several steps as one (a column a step lacks, e.g. a label set later, is None)."""
    parts = [p for p in parts if p]
    if len(parts) <= 1:
        return parts[0] if parts else {}
    out: dict[str, dict[str, np.ndarray]] = {}
    for name in dict.fromkeys(name for part in parts for name in part):
        tables = [part[name] for part in parts if name in part]
        columns = list(dict.fromkeys(c for t in tables for c in t))
        rows = [len(next(iter(t.values()))) for t in tables]
        out[name] = {
            c: np.concatenate(
                [t[c] if c in t else np.full(r, None, dtype=object) for t, r in zip(tables, rows)]
            )
            for c in columns
        }
    return out

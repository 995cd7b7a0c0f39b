"""One cache's sequences across decode steps, and the one-token steps whose validity waits.

A one-token decode step's identity is three numbers per row: the token fed, its position,
and whether it is a real token (its attention mask's own slot). Which of those tokens count
also depends on the earlier steps: a row that fed an end-of-text id is finished, and the
pad tokens `generate` keeps feeding it are not recorded. The model's thread copies the
three columns in one op (the step's `snap`, capture/recording/identity.py) and adds them to
the cache's `DecodeRun`. On a CPU, where each tensor op costs as much as the rest of the
step's bookkeeping, the steps' valid masks and the rows' next positions are made later,
many steps in one vectorised pass: on the writer thread as it turns the steps into rows
(`StepValid`), or on the model's thread when a forward that is not a one-token decode step
needs the cache's state (`CacheState.settle`). A run holds at most MAX_RUN steps; the next
run starts where it ends, made after it. On an accelerator each step's mask is made when
it is added (a few launches, as before): the writer reads host copies only.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from routescope.capture.recording.rows import DeferredRows

MAX_RUN = 64  # one-token decode steps per run (a run's steps are freed together)


def made_at_once(device: torch.device) -> bool:
    """Whether a step's valid mask is made when it is added: on an accelerator, where the
    writer reads host copies only and the ops are launches the device runs later."""
    return device.type != "cpu"


class DecodeRun:
    """One-token decode steps of one cache, in order: each step's snap [B, 3] int64 (token id,
    position, own slot allowed), and each step's valid mask [B, 1] once made (`make`). `alive`
    and `next_pos` are the rows' state after the steps made so far; a run that follows another
    (`prev`) learns its starting state when the one before is made."""

    def __init__(self, state: CacheState | DecodeRun, eos: torch.Tensor | None, lock: Any) -> None:
        self.prev = state if isinstance(state, DecodeRun) else None
        self.alive = state.alive  # [B, 1] bool (a run that follows another: set when it is made)
        self.next_pos = state.next_pos  # [B, 1] int64
        self.eos = eos  # end-of-text ids (inside generate), or None
        self.at_once = made_at_once(state.alive.device)
        self.snaps: list[torch.Tensor] = []
        self.valid: list[torch.Tensor] = []  # [B, 1] bool, the steps made so far
        self._lock = lock  # one per cache: the writer thread and the model's may both make steps

    def make(self) -> None:
        """Make every step added so far, of this run and the runs before it, oldest first."""
        with self._lock, torch.no_grad():
            chain, run = [], self
            while run is not None:
                chain.append(run)
                run = run.prev
            for run in reversed(chain):
                if run.prev is not None:  # its start is the end of the run before
                    run.alive, run.next_pos, run.prev = run.prev.alive, run.prev.next_pos, None
                run._make()

    def _make(self) -> None:
        """A row's token counts where its own slot is allowed and it had not fed an end-of-text
        id at an earlier counted step; its next position follows its last counted token."""
        done, upto = len(self.valid), len(self.snaps)
        if upto == done:
            return
        alive, eos = self.alive, self.eos
        if upto - done == 1:  # one step (an accelerator's, each in turn): the fewest ops
            snap = self.snaps[done]
            valid = (snap[:, 2:3] != 0) & alive
            if eos is not None:
                self.alive = alive > (torch.isin(snap[:, :1], eos) & valid)  # alive & ~fed
            self.next_pos = torch.where(valid, snap[:, 1:2] + 1, self.next_pos)
            self.valid.append(valid)
            return
        snaps = torch.stack(self.snaps[done:upto], dim=1)  # [B, T, 3]
        own = snaps[..., 2] != 0
        valid = own & alive
        if eos is not None:
            ends = torch.isin(snaps[..., 0], eos) & own  # [B, T]: fed an end-of-text id there
            valid &= ~(ends.cumsum(1) > ends)  # ... not at an earlier step
            self.alive = alive & ~ends.any(1, keepdim=True)
        steps = torch.arange(1, upto - done + 1, device=valid.device)
        last = (valid * steps).amax(1, keepdim=True)  # each row's last counted step, 1-based; 0: none
        latest = snaps[..., 1].gather(1, (last - 1).clamp_min(0)) + 1
        self.next_pos = torch.where(last > 0, latest, self.next_pos)
        self.valid.extend(valid.split(1, dim=1))


class StepValid(DeferredRows):
    """A CPU decode step's valid mask [B, 1], made when read (`stack`, on the writer thread)."""

    def __init__(self, run: DecodeRun, index: int, snap: torch.Tensor) -> None:
        self.run, self.index = run, index
        self.shape = (snap.shape[0], 1)
        self.device = snap.device
        self.nbytes = snap.shape[0]

    def numel(self) -> int:
        return self.shape[0]

    def stack(self) -> torch.Tensor:
        run = self.run
        if self.index >= len(run.valid):
            run.make()
        return run.valid[self.index]


@dataclass
class CacheState:
    """One cache object's sequences: ids, next positions, rows still recorded, labels."""

    seq_ids: np.ndarray
    next_pos: torch.Tensor  # [B, 1] int64, device (read it with `next_positions()`)
    alive: torch.Tensor  # [B, 1] bool, device: not finished, not left out by sample= (`live()`)
    labels: dict[str, str | None]
    slots: int  # cache length after the last recorded forward
    held: Any = None  # a multi-token step on a non-empty cache, waiting for the cache length
    ref: Any = None  # weak reference to the cache object
    run: DecodeRun | None = None  # the latest one-token decode steps, not settled into the state yet
    _ones: torch.Tensor | None = None  # [B, 1] int64 ones: the own-slot column of a step without a mask
    _lock: Any = field(default_factory=threading.Lock)  # the runs' (`DecodeRun.make`)

    def settle(self) -> None:
        """Fold the waiting steps (made now if the writer has not made them) into the state."""
        run, self.run = self.run, None
        if run is not None:
            run.make()
            self.alive, self.next_pos = run.alive, run.next_pos

    def live(self) -> torch.Tensor:
        self.settle()
        return self.alive

    def next_positions(self) -> torch.Tensor:
        self.settle()
        return self.next_pos

    def advance(self, next_pos: torch.Tensor) -> None:
        self.settle()
        self.next_pos = next_pos

    def ones(self) -> torch.Tensor:
        ones = self._ones
        if ones is None or ones.shape[0] != self.alive.shape[0] or ones.device != self.alive.device:
            ones = self._ones = torch.ones_like(self.alive, dtype=torch.long)
        return ones

    def add(self, snap: torch.Tensor, eos: torch.Tensor | None) -> StepValid | torch.Tensor:
        """A one-token decode step (its snap): its valid mask, or one made when read."""
        run = self.run
        if run is None or run.eos is not eos:
            self.settle()
            run = self.run = DecodeRun(self, eos, self._lock)
        elif len(run.snaps) >= MAX_RUN:  # the next run starts where this one ends
            run = self.run = DecodeRun(run, eos, self._lock)
        run.snaps.append(snap)
        if run.at_once:
            run.make()
            return run.valid[-1]
        return StepValid(run, len(run.snaps) - 1, snap)

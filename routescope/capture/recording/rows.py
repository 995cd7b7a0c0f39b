"""A CPU step's router rows, handed to the writer thread before they are made.

The model thread ends a decode step without a tensor op where it can (capture/recording/sink.py):
the writer thread makes the rows, off the model's thread.

- `KeptRows`: an eager step's router tensors, as the routers returned them; the writer stacks them.
- `RingRows`: a compiled step's rows in a `RingSet`, one of a ring of buffer sets the graph
  writes into (ids + 1 over zeroed rows). The writer takes the step's rows out (`RingStep`:
  ids - 1, weights copied), zeroes the set's ids and gives it back to the ring, so the model
  thread neither zeroes rows at a step's start nor copies them at its end. A set is in one
  step's hands from the step's start until the writer has taken its rows out; a set dropped
  with its step (a forward that raised) is no longer counted, and the ring makes another.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

import torch

from routescope.errors import RouteScopeError


class DeferredRows:
    """Host data made on the writer thread (`stack`): a step's [layers, tokens, k] router rows,
    or a CPU decode step's valid mask (capture/recording/decoded.py); `nbytes`: their size."""

    layers: list[int]
    nbytes: int

    def stack(self) -> torch.Tensor:
        raise NotImplementedError


class KeptRows(DeferredRows):
    """One group's kept router tensors of a CPU step (each layer's [tokens, k], or another view
    of as many values), stacked only when its rows are made: on the writer thread, which then
    frees them too. `stack()` names a layer that routed another number of tokens."""

    def __init__(
        self, layers: list[int], tensors: list[torch.Tensor], tokens: int, k: int, device: Any
    ) -> None:
        self.layers, self.tensors, self.tokens, self.k, self.device = layers, tensors, tokens, k, device

    @property
    def nbytes(self) -> int:
        """The bytes of its stacked rows (each layer's tensor holds tokens x k values)."""
        first = self.tensors[0] if self.tensors else None
        return len(self.tensors) * self.tokens * self.k * first.element_size() if first is not None else 0

    def stack(self) -> torch.Tensor:
        """[layers, tokens, k], in the routers' dtype (joins no autograd graph)."""
        tensors, tokens, k = self.tensors, self.tokens, self.k
        with torch.no_grad():
            try:
                stacked = torch.stack(tensors)
            except RuntimeError:  # layers gave other shapes ([batch, seq, k] and [tokens, k]) or devices
                stacked = None
            if stacked is not None and stacked.numel() == len(tensors) * tokens * k:
                return stacked.view(len(tensors), tokens, k)
            for layer, tensor in zip(self.layers, tensors):
                if tensor.numel() != tokens * k:
                    raise RouteScopeError(
                        f"layer {layer} routed expert ids of shape {tuple(tensor.shape)}, but the forward "
                        f"had {tokens} tokens (batch x sequence); this router layout is not supported yet"
                    )
            return torch.stack([tensor.reshape(tokens, k).to(self.device) for tensor in tensors])


class Ring:
    """Buffer sets of one shape for compiled CPU steps: `get` one for a step (None when `limit`
    sets are out: the step then uses the sink's own buffers and copies), `put` it back."""

    def __init__(self, make: Any, limit: int) -> None:
        self._make, self.limit = make, limit
        self._free: collections.deque[RingSet] = collections.deque()  # append/popleft: thread-safe
        self._lock = threading.Lock()
        self.made = 0  # sets alive: free, or in a step's hands

    def get(self) -> RingSet | None:
        try:
            return self._free.popleft()
        except IndexError:
            pass
        with self._lock:
            if self.made >= self.limit:
                return None
            self.made += 1
        return RingSet(self, *self._make())

    def put(self, rows: RingSet) -> None:
        self._free.append(rows)

    def lost(self) -> None:
        """A set was dropped with its step (a forward that raised, a step the writer lost)."""
        with self._lock:
            self.made -= 1


class RingSet:
    """One ids and one weights buffer per group ([layers, capacity, k]) and the group views of
    each step size (made once per size)."""

    def __init__(self, ring: Ring, ids: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
        self.ring, self.buffers = ring, (ids, weights)
        self.views: dict[int, Any] = {}

    def __del__(self) -> None:  # dropped in a step's hands: the ring may make another
        try:
            self.ring.lost()
        except Exception:  # interpreter shutdown
            pass

    def give_back(self) -> None:
        """Zero every ids row and give the set back to its ring."""
        with torch.no_grad():
            for ids in self.buffers[0]:
                ids.zero_()
        self.ring.put(self)


class RingStep:
    """A compiled step's rows in a `RingSet`, until `take` takes them out."""

    def __init__(self, rows: RingSet, tokens: int) -> None:
        self.rows: RingSet | None = rows
        self.tokens = tokens
        self.taken: list[tuple[torch.Tensor, torch.Tensor]] = []

    def take(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each group's (ids [layers, tokens, k] (-1: not written), weights), in fresh tensors;
        the first call zeroes the set's ids rows and gives it back to its ring."""
        rows, self.rows = self.rows, None
        if rows is not None:
            tokens = self.tokens
            with torch.no_grad():
                self.taken = [
                    (ids[:, :tokens] - 1, weights[:, :tokens].clone(memory_format=torch.contiguous_format))
                    for ids, weights in zip(*rows.buffers)
                ]
                for ids in rows.buffers[0]:
                    ids[:, :tokens].zero_()
            rows.ring.put(rows)
        return self.taken


class RingRows(DeferredRows):
    """One group's ids (`column` 0) or weights (1) of a compiled CPU step (`RingStep`)."""

    def __init__(self, layers: list[int], step: RingStep, group: int, column: int, nbytes: int) -> None:
        self.layers, self.step, self.group, self.column, self.nbytes = layers, step, group, column, nbytes

    def stack(self) -> torch.Tensor:
        return self.step.take()[self.group][self.column]


def as_tensor(rows: torch.Tensor | DeferredRows) -> torch.Tensor:
    """A group's ids or weights as one tensor (`DeferredRows` made)."""
    return rows.stack() if isinstance(rows, DeferredRows) else rows

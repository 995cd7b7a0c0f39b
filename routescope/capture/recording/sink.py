"""The one recording path: each MoE layer writes its choice into the step's preallocated buffers.

Eager and compiled forwards share it. A recording allocates, per device and top-k, one ids buffer
and one weights buffer for all the MoE layers there ([layers, capacity, k], grown to the
largest step seen, so a decode loop always writes the same addresses; CUDA graphs need that):
a compiled graph has two buffers to write whatever the depth, and a step's rows of every layer
are one slice. A step:

- `begin(tokens, zero)` (once per step, eager, outside any graph): for a compiled step, zeroes
  the step's id rows, one op per device and top-k (0: not written by a graph); an eager step
  counts its writes instead, so its rows are not touched. A compiled step on a CPU of at most
  RING_TOKENS tokens takes a set of a ring of buffer sets instead (capture/recording/rows.py),
  zeroed already: no op.
- per MoE layer, the router's write: traced into a compiled graph, two `copy_` as graph ops
  into the layer's rows (capture/recording/compiled.py). Eagerly, `put`: a decode-sized step
  (at most KEEP_TOKENS tokens) only keeps a reference to the layer's ids and weights (two
  list slots and an int: which layers ran); a larger step (a prefill, where the copies are
  lost in the compute) copies them into the layer's rows at once, so no router tensor is held
  across the forward. Nothing syncs with the host per layer.
- `end()` (once per step): the step's rows of every layer, one group per device and top-k
  whatever the depth: copied out of the buffers into fresh tensors (one op per group), or, on
  a CPU, handed to the writer thread without an op on the model's thread: an eager step's
  kept references as `KeptRows` (the writer stacks them, a batch of steps in one call, casts
  them and frees them), a compiled step's ring set as `RingRows` (the writer copies the rows
  out, zeroes the set and gives it back). On an accelerator the kept references are stacked
  (one op per group and tensor), as the host copy wants one tensor. A layer the graph did not
  write (it writes ids + 1 over the zeroed rows, and the rows are read minus 1) reads -1
  (refused on the writer thread: that step is lost, counted, the run goes on).

Keeping references is exact only if the model does not change the router's tensors in place
after the write (a later `mul_` on the weights, say), nor after the step (eager code
allocates a router's outputs anew each call; a graph that reuses output buffers records
compiled, through the buffers). The first kept step of a recording is
therefore watched: it is copied too, and the kept tensors must equal the copies at the end
(one host sync, once). If they differ, the recording copies every step from then on; the
step itself is recorded from its copies, so nothing is lost.

Eager writes are counted per layer (a Python int), so a layer that did not run in an eager
forward is left out of the step, and a layer that ran twice fails the step, as before.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import torch
from torch import nn

from routescope.capture.recording.compiled import hold_hook_guards
from routescope.capture.recording.rows import KeptRows, Ring, RingRows, RingSet, RingStep, as_tensor
from routescope.capture.recording.wraps import ForwardWrap, is_wrapped
from routescope.errors import RouteScopeError

# buffers hold at least this many tokens; they grow to the largest step seen (a power of two)
MIN_TOKENS = 64
MAX_VIEW_SIZES = 64  # step sizes whose row views are kept (a decode loop uses one)
KEEP_TOKENS = 1024  # eager steps up to this many tokens keep the routers' tensors, stacked at the end
# compiled CPU steps up to this many tokens write into a ring of buffer sets (capture/recording/
# rows.py), one ring per capacity (a power of two); the sets out at once of one ring hold at
# most RING_BYTES (past that, steps copy out of the sink's own buffers)
RING_TOKENS = MIN_TOKENS
RING_BYTES = 16 << 20

# open sinks by key: a compiled graph reaches its recording's buffers through this one global
# (dynamo guards the path once per graph), not through each router's closure (the same guards
# again for every layer, checked at every call)
_OPEN: dict[int, RoutingSink] = {}
_keys = itertools.count()


class RoutingSink:
    """The buffers router hooks write into; `current` is None outside a recorded step."""

    def __init__(self, sites: list[Any]) -> None:
        self.layers = [site.layer for site in sites]
        self.top_k = [site.top_k for site in sites]
        self.stacks = [site.stack for site in sites]
        self.devices = [_device_of(site.module) for site in sites]
        self._one_stack = len(set(self.stacks)) == 1
        # int16 ids when every layer's expert ids fit, as the step's host copy wants them
        small = all(site.num_experts <= (1 << 15) for site in sites)
        self.ids_dtype = torch.int16 if small else torch.int32
        self.current: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self.capacity = 0
        self.outside = 0  # eager router calls outside a recorded step
        self.skipping = False  # in a forward the recorder skips on purpose: its calls are not 'outside'
        self.counts: list[int] = [0] * len(sites)  # eager writes per layer, this step
        self.shapes: dict[int, tuple[int, ...]] = {}  # layers that routed another number of tokens
        self._buffers: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._views: dict[int, tuple[list, list, list, list]] = {}  # rows [:n], by n
        self._groups: list[list[int]] = []  # slots that share buffers (same device and k)
        self._one_group = False  # one group, every slot in order (`_allocate`)
        self._where: list[tuple[int, int]] = []  # slot -> (group, row of its buffers)
        self._tokens = 0
        self.graphs_dropped = False  # graphs compiled before record, dropped once (capture.compiled)
        # kept references (see the module docstring): None until the first kept step is
        # checked, then True (keep) or False (the model changes them in place: copy)
        self.keep_ok: bool | None = None
        self._keeping = self._watching = self.keeping = False
        self.kept_ids: list[Any] = []
        self.kept_weights: list[Any] = []
        self._guards = False  # holding dynamo's guards on hooks (compiled.py)
        # rings of buffer sets for compiled CPU steps (rows.py), by capacity; None: not on a CPU
        self._rings: dict[int, Ring] | None = None
        self._set: RingSet | None = None  # the step's set, if it has one
        self.key = next(_keys)
        _OPEN[self.key] = self

    def hold_guards(self) -> None:
        """Graphs compiled from now on guard on module hooks, until `close` (compiled.py)."""
        if not self._guards:
            self._guards = True
            hold_hook_guards(True)

    def close(self) -> None:
        """The recording ended: graphs compiled from now on may skip hook guards again."""
        if self._guards:
            self._guards = False
            hold_hook_guards(False)
        _OPEN.pop(self.key, None)
        self._buffers, self.current, self._views = None, None, {}
        self._rings = self._set = None
        self.kept_ids, self.kept_weights = [], []

    # -- once per step -------------------------------------------------------------------
    def begin(self, tokens: int, device: torch.device, zero: bool = True) -> None:
        """Make the buffers hold a step of `tokens` tokens; `zero`: mark those rows unwritten
        (a compiled step's graph writes ids + 1; an eager step's writes are counted instead)."""
        if self._buffers is None or tokens > self.capacity:
            # a new size: a compiled call recompiles (as it would for the new shape)
            self.capacity = max(MIN_TOKENS, 1 << (tokens - 1).bit_length())
            self._buffers = self._allocate(self.capacity, device)
            self._views = {}
        rows = None
        if zero and self._rings is not None and tokens <= RING_TOKENS:  # a compiled CPU step (rows.py)
            rows = (self._rings.get(1 << (tokens - 1).bit_length()) or self._ring(tokens)).get()
        if rows is not None:  # a compiled CPU step: a set of the ring, zeroed already (rows.py)
            buffers, views = rows.buffers, rows.views.get(tokens)
            if views is None:  # made once per set and size
                views = rows.views[tokens] = _views(rows.buffers, tokens, self._where)
        else:
            buffers, views = self._buffers, self._views.get(tokens)
            if views is None:  # the rows [:tokens] of every layer and of every group, made once per size
                if len(self._views) >= MAX_VIEW_SIZES:  # many prompt lengths: keep the cache small
                    self._views = {}
                views = self._views[tokens] = _views(self._buffers, tokens, self._where)
            if zero:
                for ids in views[2]:
                    ids.zero_()
        self._set = rows
        self._tokens = tokens
        self._step_views = views
        self.counts = [0] * len(self.layers)
        self._keeping = not zero and tokens <= KEEP_TOKENS and self.keep_ok is not False
        self._watching = self._keeping and self.keep_ok is None
        self.keeping = self._keeping and not self._watching  # the router writes' short path
        if self._keeping:
            self.kept_ids, self.kept_weights = [None] * len(self.layers), [None] * len(self.layers)
        if self.shapes:
            self.shapes = {}
        self.current = buffers

    def end(self, stack: str, compiled: bool) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """The step's decisions: (layers, ids [L, tokens, k] (-1: not written), weights), one
        group per device and k, in fresh tensors (the buffers are reused next step); empty
        when no layer ran. An eager step has the layers that ran; a `compiled` one (no eager
        write) every layer of `stack` (an encoder-decoder's encoder and decoder apart)."""
        if self.current is None:
            return []
        self.current = None
        rows, self._set = self._set, None
        if rows is None:
            return self._end(stack, compiled)
        if compiled and not any(self.counts) and not self.shapes:
            # the usual compiled CPU step: its set goes to the writer thread, which takes the
            # rows out and gives it back to the ring; no op on the model's thread (rows.py)
            step, groups = RingStep(rows, self._tokens), []
            for g, layers in enumerate(self._group_layers):
                ids = rows.buffers[0][g]
                size = len(layers) * self._tokens * ids.shape[2]
                groups.append(
                    (
                        layers,
                        RingRows(layers, step, g, 0, size * ids.element_size()),
                        RingRows(layers, step, g, 1, size * 4),
                    )
                )
            return groups
        try:  # eager writes in a compiled step: copied out of the set, as from the sink's buffers
            return self._end(stack, compiled)
        finally:
            rows.give_back()

    def _end(self, stack: str, compiled: bool) -> list[tuple[list[int], Any, Any]]:
        ids_views, weight_views, ids_groups, weight_groups = self._step_views
        eager = any(self.counts)
        if not eager and not compiled and not self.shapes:
            return []
        if self.shapes:
            layer, shape = next(iter(self.shapes.items()))
            raise RouteScopeError(
                f"layer {layer} routed expert ids of shape {shape}, but the forward had {self._tokens} "
                "tokens (batch x sequence); this router layout is not supported yet"
            )
        if eager and max(self.counts) > 1:
            twice = [self.layers[s] for s, c in enumerate(self.counts) if c > 1]
            if twice:
                raise RouteScopeError(
                    f"MoE layers {twice} ran more than once in one forward; cannot record them"
                )
        every = self.counts.count(1) == len(self.layers) if eager else self._one_stack
        if eager and self._keeping:
            kept = self._stack_kept(every)
            if not self._watching:
                return kept
        groups = []
        for g, slots in enumerate(self._groups):
            if every:  # the usual step: every layer, one copy per group, no Python per layer
                layers = self._group_layers[g]
                ids = (
                    ids_groups[g].clone(memory_format=torch.contiguous_format) if eager else ids_groups[g] - 1
                )
                weights = weight_groups[g].clone(memory_format=torch.contiguous_format)
            else:
                keep = [s for s in slots if (self.counts[s] if eager else self.stacks[s] == stack)]
                if not keep:
                    continue
                layers = [self.layers[s] for s in keep]
                ids = torch.stack([ids_views[s] for s in keep])
                ids = ids if eager else ids - 1
                weights = torch.stack([weight_views[s] for s in keep])
            groups.append((layers, ids, weights))
        if eager and self._watching:  # the first kept step: were the kept tensors changed since?
            self.keep_ok = all(
                torch.equal(a[1], as_tensor(b[1]).to(a[1].dtype))
                and torch.equal(a[2], as_tensor(b[2]).to(a[2].dtype))
                for a, b in zip(groups, kept)
            )
        return groups

    def _stack_kept(self, every: bool) -> list[tuple[list[int], Any, Any]]:
        """An eager step's groups from the kept references, in the routers' own dtypes (the
        host side casts them). On a CPU they stay `KeptRows` (the writer thread stacks them,
        and frees them: nothing per layer at the step's end); on an accelerator, one stack per
        group and tensor (the host copy needs one tensor)."""
        ids_kept, weights_kept = self.kept_ids, self.kept_weights
        self.kept_ids, self.kept_weights = [], []  # the step's tensors are not held past it
        groups = []
        for g, slots in enumerate(self._groups):
            if not every:
                slots = [s for s in slots if self.counts[s]]
                if not slots:
                    continue
            k, device = self.top_k[slots[0]], self._buffers[0][g].device
            layers = self._group_layers[g] if every else [self.layers[s] for s in slots]
            if every and self._one_group:  # the usual step: the kept lists as they are
                ids = KeptRows(layers, ids_kept, self._tokens, k, device)
                weights = KeptRows(layers, weights_kept, self._tokens, k, device)
            else:
                ids = KeptRows(layers, [ids_kept[s] for s in slots], self._tokens, k, device)
                weights = KeptRows(layers, [weights_kept[s] for s in slots], self._tokens, k, device)
            if device.type != "cpu":
                ids, weights = ids.stack(), weights.stack()
            groups.append((layers, ids, weights))
        return groups

    # -- once per MoE layer --------------------------------------------------------------
    def put(self, slot: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """An eager router's write: a decode-sized step keeps the layer's ids and weights (stacked
        at the end); a larger one copies them into its rows. The kept step's short path is the
        router write's own (`router_hook`); here a kept step (the watched one) is copied too."""
        if weights.requires_grad:  # a training forward: neither copy nor reference joins its graph
            weights = weights.detach()
        if self._keeping:
            self.kept_ids[slot], self.kept_weights[slot] = ids, weights
        ids_out = self._step_views[0][slot]
        shape = ids_out.shape
        if ids.shape != shape:  # e.g. [batch, seq, k]: the same ids, another view
            if ids.numel() != ids_out.numel():
                self.shapes[self.layers[slot]] = tuple(ids.shape)
                return
            ids = ids.reshape(shape)
        if weights.shape != shape:
            weights = weights.reshape(shape)
        ids_out.copy_(ids)
        self._step_views[1][slot].copy_(weights)
        self.counts[slot] += 1

    def write(self, slot: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Traced into the graph by the router hooks' compiled branch."""
        buffers = self.current
        if buffers is None:
            # no step is being recorded (an input without ids, a skipped forward) or the model
            # was compiled some other way: this graph variant writes nothing
            return
        # graph ops on graph inputs (two per device and k, whatever the depth): inductor writes
        # the layer's rows of the buffers in place (ids + 1: 0 = unwritten)
        g, i = self._where[slot]
        ids_out, weights_out = buffers[0][g][i], buffers[1][g][i]
        k = ids_out.shape[1]
        if ids.shape[-1] != k or weights.shape[-1] != k:
            raise RouteScopeError(
                f"a router gave {tuple(ids.shape)} expert ids, but routescope's compiled buffer holds "
                f"top-{k} choices; this router layout cannot be recorded compiled"
            )
        ids, weights = ids.detach().reshape(-1, k), weights.detach().reshape(-1, k)
        ids_out[: ids.shape[0]].copy_(ids + 1)
        weights_out[: weights.shape[0]].copy_(weights)

    # -- buffers -------------------------------------------------------------------------
    def _allocate(self, capacity: int, device: torch.device) -> Any:
        """One ids and one weights buffer [layers, capacity, k] per device and k."""
        devices = [torch.device(d or device) for d in self.devices]
        by_key: dict[tuple, list[int]] = {}
        for slot, (k, d) in enumerate(zip(self.top_k, devices)):
            by_key.setdefault((k, d), []).append(slot)
        self._groups = list(by_key.values())
        self._group_layers = [[self.layers[s] for s in g] for g in self._groups]
        self._one_group = self._groups == [list(range(len(self.layers)))]  # slots in order, one group
        self._where = [(0, 0)] * len(self.layers)  # slot -> (group, row of the group's buffers)
        for g, slots in enumerate(self._groups):
            for i, slot in enumerate(slots):
                self._where[slot] = (g, i)
        keys = list(by_key)
        if self._rings is None and all(d.type == "cpu" for _, d in keys) and self._one_stack:
            self._rings, self._ring_keys = {}, keys
        ids, weights = self._zeros(keys, capacity)
        for tensor in (*ids, *weights):
            torch._dynamo.mark_static_address(tensor)  # CUDA graphs write only to static addresses
        return ids, weights

    def _ring(self, tokens: int) -> Ring:
        """A new ring of sets for steps of `tokens` tokens, of capacity the next power of two:
        inductor turns the graph's write of one layer's rows into a rewrite of the group's
        whole buffer (every layer, every row), so a decode step's sets hold no row more than
        it needs. The capacity is marked dynamic (`maybe_mark_dynamic`): a compiled forward of
        a new length (another capacity) reuses the dynamic graph, as it does unrecorded."""
        capacity = 1 << (tokens - 1).bit_length()
        keys = self._ring_keys
        size = sum(
            len(s) * capacity * k * (self.ids_dtype.itemsize + 4) for s, (k, _) in zip(self._groups, keys)
        )

        def make() -> Any:
            buffers = self._zeros(keys, capacity)
            for tensor in (*buffers[0], *buffers[1]):
                torch._dynamo.maybe_mark_dynamic(tensor, 1)
            return buffers

        ring = self._rings[capacity] = Ring(make, max(2, RING_BYTES // size))
        return ring

    def _zeros(self, keys: list[tuple[int, torch.device]], capacity: int) -> Any:
        """Zeroed ids and weights buffers [layers, capacity, k], one pair per (k, device)."""
        sizes = [len(slots) for slots in self._groups]
        ids = [torch.zeros(n, capacity, k, dtype=self.ids_dtype, device=d) for n, (k, d) in zip(sizes, keys)]
        weights = [
            torch.zeros(n, capacity, k, dtype=torch.float32, device=d) for n, (k, d) in zip(sizes, keys)
        ]
        return ids, weights


def _views(buffers: Any, tokens: int, where: list[tuple[int, int]]) -> tuple[list, list, list, list]:
    """The rows [:tokens] of every layer (by slot) and of every group, of ids and weights."""
    ids_groups = [ids[:, :tokens] for ids in buffers[0]]
    weight_groups = [weights[:, :tokens] for weights in buffers[1]]
    ids_rows = [ids_groups[g][i] for g, i in where]
    weight_rows = [weight_groups[g][i] for g, i in where]
    return ids_rows, weight_rows, ids_groups, weight_groups


def router_hook(sink: RoutingSink, site: Any, slot: int) -> Any:
    """The write of one MoE layer's router: its adapter's extractor, then one write into `sink`
    (traced into the graph under torch.compile, eager otherwise)."""
    extract, is_compiling, key = site.adapter.extract, torch.compiler.is_compiling, sink.key

    def write(module: nn.Module, args: tuple, kwargs: dict, output: Any = None) -> None:
        if is_compiling():  # a constant while tracing: the graph writes the buffers
            _OPEN[key].write(slot, *extract(module, args, kwargs, output))
        elif sink.current is not None:
            ids, weights = extract(module, args, kwargs, output)
            if sink.keeping:  # a kept decode step (not the watched one): `put`'s short path, inline
                if weights.requires_grad:  # training: the writer thread holds no autograd graph
                    weights = weights.detach()
                sink.kept_ids[slot], sink.kept_weights[slot] = ids, weights
                sink.counts[slot] += 1
            else:
                sink.put(slot, ids, weights)
        elif not sink.skipping:
            sink.outside += 1

    return write  # a pre-hook (site.adapter.hook == "pre") is called without `output`


def router_forward(sink: RoutingSink, site: Any, slot: int) -> Any:
    """`router_hook`'s write (a pre-hook adapter's) and the class's forward, as one instance
    `forward`: one call per layer in an eager step, and, traced, a closure dynamo guards with
    a few checks per layer (its code, the constants it reads), the class's forward captured
    (`type(self)` would make dynamo check that every router has the same type)."""
    extract, is_compiling, key = site.adapter.extract, torch.compiler.is_compiling, sink.key
    class_forward = type(site.module).forward

    @functools.wraps(class_forward)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if is_compiling():  # a constant while tracing: the graph writes the buffers
            _OPEN[key].write(slot, *extract(self, args, kwargs, None))
        elif sink.current is not None:
            ids, weights = extract(self, args, kwargs, None)
            if sink.keeping:  # as router_hook's kept short path, inline: the hot path of a decode step
                if weights.requires_grad:
                    weights = weights.detach()
                sink.kept_ids[slot], sink.kept_weights[slot] = ids, weights
                sink.counts[slot] += 1
            else:
                sink.put(slot, ids, weights)
        elif not sink.skipping:
            sink.outside += 1
        return class_forward(self, *args, **kwargs)

    return forward


def attach_router(sink: RoutingSink, site: Any, slot: int, compiled: bool) -> Any:
    """Put `router_hook` on the site's module; returns a handle with `.remove()`.

    A pre-hook adapter's write runs as part of the module's forward: the module gets an
    instance `forward` that writes, then calls its class's forward. The forward pre-hooks of
    other code run before it, as they do before a hook registered after them; and the
    module's call stays on `nn.Module`'s path without hooks, where a registered hook costs
    about as much as the rest of a recorded layer in an eager decode step. A post-hook
    adapter's write is a forward hook (forward hooks of other code, which may change the
    output, run first); in a `compiled` recording the module also gets a pass-through instance
    `forward`, the mark dynamo's guards tell a recorded router from a copy's by
    (capture/recording/compiled.py). A module whose `forward` something else replaced
    already (accelerate's device hooks) gets hooks only."""
    module = site.module
    replaced = "forward" in vars(module)
    if site.adapter.hook == "pre" and not replaced:
        return ForwardWrap(module, router_forward(sink, site, slot))
    hook = router_hook(sink, site, slot)
    if site.adapter.hook == "pre":
        return module.register_forward_pre_hook(hook, with_kwargs=True)
    handle = module.register_forward_hook(hook, with_kwargs=True)
    return Handles([handle, ForwardWrap(module)]) if compiled and not replaced else handle


class Handles:
    """Several handles removed as one."""

    def __init__(self, handles: list[Any]) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in reversed(self.handles):
            handle.remove()


class RouterWrites:
    """The writes on a recording's routers (`attach_router`)."""

    def __init__(self, sink: RoutingSink, sites: list[Any]) -> None:
        self.sink, self.sites = sink, sites
        self.handles: list[Any] = []
        self.compiled = False

    def attach(self, compiled: bool) -> None:
        """(Re)attach every router's write, `compiled`: marked for dynamo's guards (a compiled
        recording, or one whose model is compiled inside the block from now on). A router
        that cannot be marked (its `forward` replaced already) makes the recording hold
        dynamo's guards on hooks instead (`hold_hook_guards`)."""
        self.remove()
        self.handles = [
            attach_router(self.sink, site, slot, compiled) for slot, site in enumerate(self.sites)
        ]
        self.compiled = compiled
        if compiled and any(not is_wrapped(site.module) for site in self.sites):
            self.sink.hold_guards()

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()


def _device_of(module: nn.Module) -> torch.device | None:
    """Where a router module runs (a device_map spreads layers over devices); None: unknown, or
    offloaded (accelerate leaves its weights on the meta device and runs it on the step's)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return None if tensor.device.type == "meta" else tensor.device
    return None

"""Instance `forward`s routescope puts on modules while recording, instead of hooks.

A module with hooks leaves `nn.Module`'s fast call path, and in an eager decode step a
registered hook costs several microseconds: an instance `forward` that does routescope's
work and calls the class's `forward` keeps the call on the fast path. `ForwardWrap` runs a
router's write first (capture/recording/sink.py); `StepWrap` brackets a stack's forward
(the model, or an encoder) with the recorder's step begin and end. Both are removed by
`remove()` (only while still the module's `forward`: something that replaced it later, around
ours, stays) and are found by `is_wrapped`. Routers get them in eager and compiled
recordings (dynamo traces them into the graph, and guards on them: capture/recording/
compiled.py); `StepWrap` is for eager recordings only (a compiled one brackets steps with
hooks, run outside the graph). A module whose `forward` something else replaced already
(accelerate's device hooks) gets hooks.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class _InstanceForward:
    """An instance `forward` routescope put on a module (`is_wrapped` finds it)."""

    module: nn.Module
    bound: Any

    def _install(self, module: nn.Module, forward: Callable[..., Any]) -> None:
        forward.routescope_wrap = True  # type: ignore[attr-defined]  # tests and benchmarks find it
        self.module, self.bound = module, types.MethodType(forward, module)
        module.forward = self.bound

    def remove(self) -> None:
        if vars(self.module).get("forward") is self.bound:
            del self.module.forward
        # else something replaced it after us, around our forward: it stays (it does nothing once
        # the recording has ended: its sink is closed, its recorder's writer too)


class ForwardWrap(_InstanceForward):
    """An instance `forward` on one module: `forward(module, *args, **kwargs)`, which calls the
    class's forward itself (a router's write, capture/recording/sink.py); with none, only the
    class's forward: the mark a compiled recording puts on a router whose write is a hook
    (dynamo guards on an instance `forward`, capture/recording/compiled.py)."""

    def __init__(self, module: nn.Module, forward: Callable[..., Any] | None = None) -> None:
        if forward is None:
            class_forward = type(module).forward

            @functools.wraps(class_forward)
            def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
                return class_forward(self, *args, **kwargs)

        self._install(module, forward)


class StepWrap(_InstanceForward):
    """An instance `forward` on a stack module: `begin(module, args, kwargs)` before the class's
    forward and `end(module, args, output)` after it, also when it raises (output None), as a
    forward pre-hook and an `always_call` forward hook do. Where dynamo traces the call (a
    `torch.compile(model)` made inside the block and not given to `record`, whose graph the
    recording cannot bracket), the forward runs unrecorded and is counted in `compiled`."""

    def __init__(
        self, module: nn.Module, begin: Callable[..., None], end: Callable[..., None], compiled: list[int]
    ) -> None:
        is_compiling = torch.compiler.is_compiling

        @functools.wraps(type(module).forward)
        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if is_compiling():  # traced: the count is a side effect dynamo replays on each call
                compiled[0] += 1
                return type(self).forward(self, *args, **kwargs)
            begin(self, args, kwargs)
            output = None
            try:
                output = type(self).forward(self, *args, **kwargs)
            finally:
                end(self, args, output)
            return output

        self._install(module, forward)


class StepBrackets:
    """The recorder's step begin and end on each stack module: a `StepWrap` in an eager
    recording, a forward pre-hook and an `always_call` forward hook (in `torch.compiler.
    disable`: transformers' compiled calls run them as frames of their own) where the model
    is or will be compiled, or its `forward` was replaced already."""

    def __init__(
        self, modules: list[nn.Module], begin: Callable[..., None], end: Callable[..., None]
    ) -> None:
        self.modules, self.begin, self.end = modules, begin, end
        self.handles: list[Any] = []
        self.wrapped = False
        self.compiled = [0]  # forwards a graph compiled in the block ran, unrecorded (StepWrap)

    def attach(self, wrap: bool) -> None:
        """(Re)attach on every stack module; `wrap=False`: hooks only (a compiled recording)."""
        self.remove()
        for module in self.modules:
            if wrap and "forward" not in vars(module):
                self.handles.append(StepWrap(module, self.begin, self.end, self.compiled))
                self.wrapped = True
                continue
            begin, end = torch.compiler.disable(self.begin), torch.compiler.disable(self.end)
            self.handles.append(module.register_forward_pre_hook(begin, with_kwargs=True))
            self.handles.append(module.register_forward_hook(end, always_call=True))

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()
        self.wrapped = False


def is_wrapped(module: nn.Module) -> bool:
    """Whether a routescope forward wrap (`ForwardWrap`, `StepWrap`) is on `module` now."""
    forward = vars(module).get("forward")
    return getattr(getattr(forward, "__func__", None), "routescope_wrap", False)

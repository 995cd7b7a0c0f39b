"""Recording the compiled fast path: torch.compile, model.compile(), compiled `generate`.

The eager recorder keeps each layer's decision from a Python hook. Under torch.compile the
router hooks are traced into the graph (dynamo inlines every submodule call, hooks
included), so from there on no Python runs per call: a decision has to be written by the
graph itself. This module is that write, and the bookkeeping around it.

- **Inside the graph.** Each router hook has a compiled branch (`torch.compiler.
  is_compiling()`, a constant while tracing): it runs the adapter's extractor (pure tensor
  code, traced like the model) and copies the layer's expert ids (+1) and combine weights
  into rows of preallocated buffers with plain in-place `copy_`, traced like the model: the
  buffers become graph inputs that the graph mutates, which AOTAutograd keeps and inductor
  writes in place inside its own kernels, as it does for transformers' StaticCache, whose
  K/V updates are the same kind of write. No Python runs per layer (an earlier opaque custom
  op called back into Python for every layer of every step). Writing in place into fixed
  buffers is what CUDA graphs allow (`mode="reduce-overhead"`): the buffers are marked
  static addresses (`torch._dynamo.mark_static_address`), as StaticCache marks its K/V. No
  graph break, also under `fullgraph=True`.
- **Outside the graph, once per step.** A compiled recording's hooks on the model itself
  (token identity, the step's start and end) are wrapped in `torch.compiler.disable`:
  transformers' compiled calls (`model.compile()`, `generate`'s `get_compiled_call`) run them
  as frames of their own, eagerly, and `torch.compile(model)` runs them outside dynamo
  anyway. (An eager recording brackets steps with an instance `forward` instead, swapped for
  these hooks before `model.compile()` or a compile_config generate: capture/recording/wraps.py.) The
  buffers and the step's start and end are the one recording path eager forwards use too
  (capture/recording/sink.py): the graph writes ids + 1 over rows zeroed at the step's
  start, so a layer the graph did not write reads -1 (that step is dropped alone).
- **Graphs compiled before `record`.** Dynamo does not guard on hooks
  (`skip_nnmodule_hook_guards`, pytorch #117758), so a graph compiled without routescope's
  hooks could keep running without them. `drop_compiled_graphs` therefore drops, at `record`
  entry (and at the first compiled step of a later `compile_config` generate), every code
  object dynamo compiled whose file is one of the model's code: not only `forward`, but
  the frames a graph break leaves (inner forwards, resume functions, transformers'
  wrappers). Other compiled models of the same code recompile once too.
- **Recorded model or copy.** Dynamo shares a graph between instances of one class. It
  guards, on every module call it inlines, that the module has no instance `forward` (or,
  if it has one, on that function: `guard_to_detect_forward_monkeypatching`). A compiled
  recording gives every router one (capture/recording/sink.py: the write, or a
  pass-through beside a post hook), so a graph compiled for an unrecorded copy fails on the
  recorded routers and the reverse, with no guard added. Only where a router's `forward`
  was replaced already (accelerate) does the recording turn dynamo's guards on hooks on for
  every module (`hold_hook_guards`), which costs each call about 0.01 ms per MoE layer.

The weights are those the compiled model itself passed on: inductor may fuse the router's
softmax differently from eager, so they can differ from an eager recording by float
rounding (3e-8 at most for the tiny Qwen3-MoE with inductor on CPU); expert ids are the same.
"""

from __future__ import annotations

import inspect
import threading

import torch
from torch import nn

from routescope.errors import RouteScopeError


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a `torch.compile(model)` wrapper (its hooks run outside dynamo)."""
    return model._orig_mod if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) else model


def is_compiled(model: nn.Module) -> bool:
    """Whether calls of `model` may run a compiled graph: `model.compile()`, or a compiled
    forward kept by an earlier or running `generate(compile_config=...)`."""
    return getattr(model, "_compiled_call_impl", None) is not None or "_compiled_call" in vars(model)


def model_source_files(model: nn.Module) -> set[str]:
    """The source files of `model`'s code: every module class (and its bases) and every
    function its forwards are wrapped around (transformers' `can_return_tuple`, ...)."""
    files: set[str] = set()
    seen: set[type] = set()
    for module in model.modules():
        for cls in type(module).__mro__:
            if cls in seen or cls in (nn.Module, object):
                continue
            seen.add(cls)
            forward = vars(cls).get("forward")
            while forward is not None:
                code = getattr(forward, "__code__", None)
                if code is not None:
                    files.add(code.co_filename)
                forward = getattr(forward, "__wrapped__", None)
            try:
                files.add(inspect.getsourcefile(cls) or "")
            except TypeError:
                pass
    files.discard("")
    return files


def drop_compiled_graphs(model: nn.Module) -> int:
    """Drop every graph dynamo compiled for `model`'s code, not only its forward: a graph break
    leaves frames of their own (the inner forwards, resume functions) whose graphs, compiled
    before `record`, have no capture in them and no guard on hooks, and would keep running.
    Other models of the same code recompile once too. Returns how many code objects had some.
    Raises RouteScopeError (the cause and the fix) when this torch keeps no list of them."""
    try:
        tracked = torch._dynamo.convert_frame.input_codes.seen
        lock = torch._dynamo.convert_frame.compile_lock
        entries = torch._dynamo.eval_frame._debug_get_cache_entry_list
    except AttributeError:
        raise RouteScopeError(
            "this model is compiled, and this torch version does not say which frames dynamo compiled "
            "before record(); graphs compiled without routescope's hooks could run instead of the "
            "recording. Call torch._dynamo.reset() before record(), or record the uncompiled model"
        ) from None
    files = model_source_files(model)
    dropped = 0
    with lock:
        for ref in list(tracked):
            code = ref()
            if code is None or code.co_filename not in files or not entries(code):
                continue
            torch._dynamo.reset_code(code)
            dropped += 1
    return dropped


def check_compilable(model: nn.Module, stacks: int, router_stats: bool = False) -> None:
    """Compiled recordings routescope cannot do exactly: refused before the first forward."""
    if router_stats:
        raise RouteScopeError(
            "router_stats=True is recorded eagerly only (its statistics are reduced over the step's "
            "valid tokens, known outside the graph); record this compiled model without router_stats, "
            "or record the uncompiled model with them"
        )
    if stacks > 1:
        raise RouteScopeError(
            "this encoder-decoder model is compiled; routescope records a compiled model's steps "
            "around the model's own forward, and an encoder or decoder called inside the graph "
            "cannot be bracketed without a graph break: record the uncompiled model"
        )


_guards_lock = threading.Lock()
_guards_held = 0  # open sinks
_guards_saved = True


def hold_hook_guards(hold: bool) -> None:
    """While a recording that could not mark its routers runs (their `forward` replaced
    already), graphs compiled guard on module hooks. Dynamo skips those guards by default,
    and it shares graphs between instances of one class: a graph compiled for an unrecorded
    copy of the model would then also run for the recorded one, without the capture (and
    the reverse)."""
    global _guards_held, _guards_saved
    config = torch._dynamo.config
    with _guards_lock:
        if hold:
            if _guards_held == 0:
                _guards_saved = config.skip_nnmodule_hook_guards
                config.skip_nnmodule_hook_guards = False
            _guards_held += 1
        elif _guards_held > 0:
            _guards_held -= 1
            if _guards_held == 0:
                config.skip_nnmodule_hook_guards = _guards_saved

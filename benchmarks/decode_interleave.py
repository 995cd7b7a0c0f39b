"""Decode overhead timed forward by forward (`decode_overhead.py --interleave`).

This 2-core machine's speed drifts by tens of percent from one half second to the next, so
rounds of whole `generate` calls compare a recorded and a plain step run seconds apart.
Here three greedy decodes from the same prompt advance together, one forward each per
iteration in a shuffled order, so each recorded step has a plain one beside it, under the
same drift: a recorded decode (inside one record block), a plain one and a plain one again
(the A/A control). Returned: medians over the steps of the per-iteration differences
(recorded - plain; control - plain), model-thread CPU ms, and the plain median.
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import routescope as rs
from routescope.capture.recording.wraps import is_wrapped


def interleave(
    shape: dict, batch: int, args: argparse.Namespace, tmp: Path, build: Callable[..., torch.nn.Module]
) -> dict[str, float]:
    """What recording adds to a decode step: one model, each decode with its own KV cache; for
    the plain ones routescope's hooks and forward wraps are taken off the model for that
    forward and put back after. `args.compiled`: each decode steps through a compiled call of
    its own of the model's `__call__`, as transformers' `generate` makes from a `compile_config`
    (`fullgraph=True`; the recorded one is the model's `_compiled_call`, as generate leaves it),
    into a static cache, given what generate gives a decode step (`cache_position`,
    `position_ids`); the prefill runs uncompiled, as in generate. Each call has a backend object
    of its own: dynamo passes over a graph compiled with another backend before running its
    guards, so no decode pays for checking the others' graphs (a model decoding alone would not)."""
    from transformers import DynamicCache, StaticCache

    compiled, cuda = bool(getattr(args, "compiled", False)), args.device == "cuda"
    clock = time.perf_counter if cuda else time.thread_time
    model = build(device=args.device, **shape)
    prompt = torch.randint(1, 4000, (batch, 16), device=args.device)
    length = prompt.shape[1] + args.new_tokens + 1
    hooked = [m for m in model.modules() if m._forward_pre_hooks or m._forward_hooks]
    assert not hooked, "the model has hooks of its own before recording"
    names = ("recorded", "plain", "control")
    calls = {name: model for name in names}
    if compiled:
        for name in names:
            backend = functools.partial(torch._dynamo.lookup_backend(args.backend))
            if args.backend == "inductor" and cuda:  # transformers' default mode="reduce-overhead"
                patches = torch._inductor.list_mode_options("reduce-overhead")
                backend = functools.partial(backend, config_patches=patches)
            calls[name] = torch.compile(model.__call__, fullgraph=True, backend=backend)
        model._compiled_call = calls["recorded"]  # what generate leaves: the recording is compiled

    def forward(name: str, state: dict, prefill: bool = False) -> float:
        saved, wraps = [], []
        if name != "recorded":  # take routescope's hooks and forward wraps off for this forward
            for module in model.modules():
                for table_name in ("_forward_pre_hooks", "_forward_hooks"):
                    table = getattr(module, table_name)
                    if table:
                        saved.append((table, dict(table)))
                        table.clear()
                if is_wrapped(module):
                    wraps.append((module, vars(module).pop("forward")))
        try:
            seen = state["seen"]
            extra = {}
            if compiled or getattr(args, "position_ids", False):  # as generate gives them
                positions = torch.arange(seen, seen + state["next"].shape[1], device=args.device)
                extra["position_ids"] = positions.expand(batch, -1)
                if compiled:
                    extra["cache_position"] = positions
            call = model if prefill else calls[name]
            began = clock()
            out = call(input_ids=state["next"], past_key_values=state["cache"], use_cache=True, **extra)
            if cuda:
                torch.cuda.synchronize()
            spent = clock() - began
        finally:
            for table, hooks_back in saved:
                table.update(hooks_back)
            for module, wrap in wraps:
                module.forward = wrap
        state["next"], state["seen"] = out.logits[:, -1:].argmax(-1), seen + state["next"].shape[1]
        return 1000 * spent

    caches = {name: StaticCache(config=model.config, max_cache_len=length) for name in names}

    def start(name: str) -> dict:
        if compiled:
            caches[name].reset()
        cache = caches[name] if compiled else DynamicCache(config=model.config)
        state = {"cache": cache, "next": prompt, "seen": 0}
        forward(name, state, prefill=True)  # not timed
        return state

    added: list[float] = []
    same: list[float] = []
    plain_ms: list[float] = []
    rng = random.Random(0)
    out = tmp / f"pairs-{shape['layers']}-{batch}-{compiled}"
    with torch.no_grad(), rs.record(model, out, flush_seconds=1e9):
        for round_ in range(args.rounds + compiled):  # compiled: round 0 compiles, not counted
            tracks = {name: start(name) for name in names}
            for _ in range(args.new_tokens):
                order = list(tracks)
                rng.shuffle(order)
                ms = {name: forward(name, tracks[name]) for name in order}
                if round_ or not compiled:
                    added.append(ms["recorded"] - ms["plain"])
                    same.append(ms["control"] - ms["plain"])
                    plain_ms.append(ms["plain"])
    if compiled:
        del model._compiled_call
    manifest = rs.open_run(out).manifest
    assert not manifest["skipped"], f"the recording lost steps: {manifest['skipped']}"
    return {
        "layers": shape["layers"],
        "batch": batch,
        "plain": statistics.median(plain_ms),
        "added": statistics.median(added),
        "control": statistics.median(same),
        "pairs": len(added),
    }

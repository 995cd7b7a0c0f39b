"""Decode overhead: what recording adds to one `generate` decode step, per step and per MoE layer.

SPEC 7: recording adds a fixed cost per forward step; measured on `generate` as ms per step
recorded - ms per step plain, at several depths, batch 1 and 8, eager and compiled; the fit
`added = a + b x MoE layers` gives the cost per step (a) and per MoE layer (b). Goal on the
2-core CPU machine: a <= 0.1 ms and b <= 0.01 ms; on a GPU, recorded / plain <= 1.02.

Each `generate` is timed step by step (a streamer reads the clocks as each new token comes
out; the prefill is left out) and gives the median of its decode steps. Eager: one model, run
recorded (a record block around that `generate`) and plain in turn, plus a second plain run,
the A/A control, in a shuffled order each round. Compiled: three copies with the same weights
(recording drops a compiled model's graphs when it starts, so the recorded copy stays inside
one record block). `added` is the median over rounds of each round's paired difference
(recorded - plain), `added IQR` their interquartile range, `A/A` the control's median paired
difference from plain: what the method reads as cost when there is none. A fitted cost
smaller than the A/A and IQR figures is within the method's noise. Compiled: transformers'
static-cache `generate` with a `compile_config` (`fullgraph=True`, CUDA graphs on a GPU with
transformers' default `reduce-overhead`).

`--interleave` (eager, CPU): this 2-core machine's speed drifts by tens of percent between
consecutive half seconds, so whole `generate` calls seconds apart compare unequal moments.
This mode advances a recorded, a plain and a control decode together, one forward each per
iteration in a shuffled order (routescope's hooks and forward wraps taken off the model for
the plain ones), and takes the median of the per-iteration differences: the steadiest figure
this machine gives. `--count` counts aten ops and routescope Python calls instead of timing.

    python benchmarks/decode_overhead.py [--device cuda] [--layers 2 16] [--batches 1 8]
        [--new-tokens 32] [--rounds 7] [--compiled] [--real-shape] [--interleave [--position-ids]] [--count]
        [--depth auto|random|N]

`--depth` (default `auto`): the Python stack depth the timed calls run at. On CPython 3.11 a
thread's frame stack grows in 16 KB chunks, mapped when a call crosses into one and unmapped
as soon as that call returns (python/cpython#142183, fixed by caching a chunk in 3.13 and 3.14
only): a decode loop whose hot calls straddle a chunk boundary maps and unmaps pages on every
call. One unrecorded compiled 16-layer model read 3.5-4.4 ms per step from some caller depths
and 4.7-6.4 ms from others (32 to 112 minor page faults per step against 3;
`benchmarks/caller_depth.py`). Recording adds a frame or two between the caller and the
model, so at an unlucky depth a comparison measures the chunks, not the recording. `auto`
runs a few short plain calls at each of 0-23 extra caller frames, counts the thread's minor
page faults, and times everything from the middle of the longest run of depths without
chunk churn; `random`: a depth drawn per round (per iteration with `--interleave`), the same
for its recorded, plain and control calls (what a caller at an unknown depth sees on
average); a number: that many extra frames.

Three clocks are read around every call, and each is fitted: `thread`, the model thread's
CPU time (what a decode step waits for, as the writer thread has a core of its own; the
table's default on a CPU, since on a shared, loaded machine elapsed time mostly measures
waiting for a core); `cpu`, the process's CPU time, all threads (the writer's work per step
counts); `wall`, elapsed time (the table's default on a GPU).

`--real-shape`: also one model of Qwen3-30B-A3B's layer shape (hidden 2048, 128 experts,
top-8, expert width 768; 2 MoE layers on a CPU, 8 on a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import routescope as rs
from routescope.capture.recording.wraps import is_wrapped

# thread: the model thread's CPU time (what a decode step waits for when the writer has a core
# of its own); cpu: the process's CPU time, all threads (the writer's work counts); wall: elapsed
CLOCKS = {"thread": time.thread_time, "cpu": time.process_time, "wall": time.perf_counter}


def build(layers: int, hidden: int, experts: int, top_k: int, moe_width: int, device: str) -> torch.nn.Module:
    config = AutoConfig.for_model(
        "qwen3_moe",
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        moe_intermediate_size=moe_width,
        num_hidden_layers=layers,
        num_attention_heads=max(4, hidden // 128),
        num_key_value_heads=max(2, hidden // 512),
        head_dim=128 if hidden >= 1024 else hidden // 4,
        vocab_size=4096,
        num_experts=experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return AutoModelForCausalLM.from_config(config).to(device, dtype).eval()


def at_depth(depth: int, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` called under `depth` extra Python frames (see `--depth`)."""
    if depth <= 0:
        return fn(*args, **kwargs)
    return at_depth(depth - 1, fn, *args, **kwargs)


DEPTH_SPAN = 24  # caller depths `--depth auto` and `random` choose from


def clean_depth(call: Any, span: int = DEPTH_SPAN) -> int:
    """A caller depth whose calls map no new frame-stack chunk (see `--depth`): the middle of
    the longest run of depths where `call(depth)` takes few minor page faults."""
    faults = []
    for depth in range(span):
        call(depth)  # warm (a compiled call may compile here)
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        call(depth)
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
    clean = [n <= 2 * min(faults) + 16 for n in faults]
    best, run = (0, 0), 0  # (length, end) of the longest clean run
    for depth, ok in enumerate(clean):
        run = run + 1 if ok else 0
        best = max(best, (run, depth))
    length, end = best
    return end - length // 2


def depth_arg(value: str) -> str:
    """`--depth`: auto, random, or a number of extra caller frames."""
    if value not in ("auto", "random") and not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected auto, random or a number of frames, got {value!r}")
    return value


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class StepClock:
    """A `generate` streamer that reads every clock when each new token comes out (on the model
    thread, between two decode steps): per-step times inside one real `generate`."""

    def __init__(self) -> None:
        self.marks: list[dict[str, float]] = []

    def put(self, value: torch.Tensor) -> None:
        self.marks.append({name: clock() for name, clock in CLOCKS.items()})

    def end(self) -> None:
        pass


def measure(shape: dict, batch: int, compiled: bool, args: argparse.Namespace, tmp: Path) -> dict:
    """Median ms per decode step, plain and recorded, for one model shape, batch and path."""
    from transformers import CompileConfig

    model = build(device=args.device, **shape)
    prompt = torch.randint(1, 4000, (batch, 16), device=args.device)
    kwargs = {
        "input_ids": prompt,
        "attention_mask": torch.ones_like(prompt),
        "do_sample": False,
        "pad_token_id": 0,
        "eos_token_id": 2,  # as a real model's generation config has: the end-of-text check runs
        "max_new_tokens": args.new_tokens + 2,
        "min_new_tokens": args.new_tokens + 2,
    }
    if compiled:
        config = CompileConfig(fullgraph=True, backend=args.backend)
        config._compile_all_devices = True  # transformers compiles on CUDA only by default
        kwargs.update(cache_implementation="static", compile_config=config)

    depth = [0]  # the round's caller depth (`--depth`)

    def decode_ms(model: torch.nn.Module) -> dict[str, float]:
        """One generate: the median of its decode steps, per clock (the prefill left out)."""
        steps = StepClock()
        at_depth(depth[0], model.generate, **kwargs, streamer=steps)
        sync(args.device)
        marks = steps.marks[1:]  # put 0 is the prompt, put 1 the prefill's token
        return {
            name: 1000 * statistics.median(b[name] - a[name] for a, b in itertools.pairwise(marks))
            for name in CLOCKS
        }

    out = tmp / f"run-{shape['layers']}-{batch}-{compiled}"
    if compiled:
        # a compiled model's graphs are dropped when recording starts (capture.compiled), so the
        # recorded model stays inside one record block: three copies with the same weights
        recorded, plain, control = model, deepcopy(model), deepcopy(model)
        plain_model = plain
        stack = contextlib.ExitStack()
        rec = stack.enter_context(rs.record(recorded, out, flush_seconds=1e9))
        run = {"plain": lambda: decode_ms(plain), "recorded": lambda: decode_ms(recorded)}
        run["control"] = lambda: decode_ms(control)
    else:
        # eager: one model, recorded or not in turn (a record block around each recorded
        # generate), so no difference between copies in memory reads as a cost
        stack, rec = contextlib.ExitStack(), None
        plain_model = model  # outside a record block between the recorded calls

        def recorded_ms() -> dict[str, float]:
            nonlocal rec
            with rs.record(model, out, mode="append", flush_seconds=1e9) as rec:
                return decode_ms(model)

        run = {
            "plain": lambda: decode_ms(model),
            "recorded": recorded_ms,
            "control": lambda: decode_ms(model),
        }
    results: dict[str, list[dict[str, float]]] = {name: [] for name in run}
    with torch.no_grad(), stack:
        for _ in range(2):  # warm up (and compile)
            for measure_once in run.values():
                measure_once()
        if args.depth == "auto":  # short plain generates at each depth (the same call path)
            short = {**kwargs, "max_new_tokens": 4, "min_new_tokens": 4}
            depth[0] = clean_depth(lambda d: at_depth(d, plain_model.generate, **short))
        elif args.depth != "random":
            depth[0] = int(args.depth)
        order = list(run)
        rng = random.Random(0)
        for _ in range(args.rounds):
            rng.shuffle(order)
            if args.depth == "random":
                depth[0] = rng.randrange(DEPTH_SPAN)
            for name in order:
                results[name].append(run[name]())
    steps = rec.steps if rec is not None else 0
    shutil.rmtree(out, ignore_errors=True)
    row = {
        "layers": shape["layers"],
        "batch": batch,
        "path": "compiled" if compiled else "eager",
        "steps": steps,
        "depth": "random" if args.depth == "random" else depth[0],
    }
    for name in CLOCKS:  # per clock: medians, and the median of each round's paired difference
        plain_ms = statistics.median(r[name] for r in results["plain"])
        recorded_ms = statistics.median(r[name] for r in results["recorded"])
        added = [r[name] - p[name] for r, p in zip(results["recorded"], results["plain"])]
        same = [c[name] - p[name] for c, p in zip(results["control"], results["plain"])]
        quartiles = statistics.quantiles(added, n=4) if len(added) >= 2 else [added[0]] * 3
        row[name] = {
            "plain": plain_ms,
            "recorded": recorded_ms,
            "added": statistics.median(added),
            "spread": quartiles[2] - quartiles[0],
            "control": statistics.median(same),
        }
    return row


def interleave(shape: dict, batch: int, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    """What recording adds to an eager decode step, timed forward by forward.

    This machine's speed drifts by tens of percent from one half second to the next, so
    rounds of whole `generate` calls compare a recorded and a plain step run seconds apart.
    Here three greedy decodes from the same prompt advance together, each with its own KV
    cache: one recorded (inside one record block), one plain (routescope's hooks and forward
    wraps taken off the model for that forward, put back after), one plain again (the A/A
    control). Each iteration runs one step of each in a shuffled order, so each recorded step
    has a plain one beside it, under the same drift. Returned: medians over the steps of the per-iteration
    differences (recorded - plain; control - plain), model-thread CPU ms, and the plain median."""
    from transformers import DynamicCache

    model = build(device="cpu", **shape)
    prompt = torch.randint(1, 4000, (batch, 16))
    hooked = [m for m in model.modules() if m._forward_pre_hooks or m._forward_hooks]
    assert not hooked, "the model has hooks of its own before recording"

    def forward(state: dict, hooks: bool, depth: int = 0) -> float:
        saved, wraps = [], []
        if not hooks:  # take routescope's hooks and forward wraps off for this forward
            for module in model.modules():
                for name in ("_forward_pre_hooks", "_forward_hooks"):
                    table = getattr(module, name)
                    if table:
                        saved.append((table, dict(table)))
                        table.clear()
                if is_wrapped(module):
                    wraps.append((module, vars(module).pop("forward")))
        try:
            extra = {}
            if getattr(args, "position_ids", False):  # as generate passes them: the new token's position
                seen = state["cache"].get_seq_length()
                extra["position_ids"] = torch.arange(seen, seen + state["next"].shape[1]).expand(batch, -1)
            start = time.thread_time()
            out = at_depth(
                depth, model, input_ids=state["next"], past_key_values=state["cache"], use_cache=True, **extra
            )
            spent = time.thread_time() - start
        finally:
            for table, hooks_back in saved:
                table.update(hooks_back)
            for module, wrap in wraps:
                module.forward = wrap
        state["next"] = out.logits[:, -1:].argmax(-1)
        return 1000 * spent

    def start(hooks: bool) -> dict:
        state = {"cache": DynamicCache(config=model.config), "next": prompt}
        forward(state, hooks)  # the prefill, not timed
        return state

    added: list[float] = []
    same: list[float] = []
    plain_ms: list[float] = []
    rng = random.Random(0)
    with torch.no_grad(), rs.record(model, tmp / f"pairs-{shape['layers']}-{batch}", flush_seconds=1e9):
        fixed = None if args.depth == "random" else 0
        if args.depth == "auto":  # plain forwards at each depth, from a track of their own
            probe = start(False)
            fixed = clean_depth(lambda d: forward(probe, False, d))
        elif args.depth != "random":
            fixed = int(args.depth)
        for _ in range(args.rounds):
            tracks = {"recorded": start(True), "plain": start(False), "control": start(False)}
            for _ in range(args.new_tokens):
                order = list(tracks)
                rng.shuffle(order)
                depth = rng.randrange(DEPTH_SPAN) if fixed is None else fixed
                ms = {name: forward(tracks[name], name == "recorded", depth) for name in order}
                added.append(ms["recorded"] - ms["plain"])
                same.append(ms["control"] - ms["plain"])
                plain_ms.append(ms["plain"])
    return {
        "layers": shape["layers"],
        "batch": batch,
        "plain": statistics.median(plain_ms),
        "added": statistics.median(added),
        "control": statistics.median(same),
        "pairs": len(added),
        "depth": "random" if fixed is None else fixed,
    }


def count_work(layers: int, batch: int, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    """What recording adds to one eager decode step, counted instead of timed (the count does
    not depend on the machine's load): aten ops dispatched (a TorchDispatchMode over the whole
    `generate`) and Python calls into routescope code (a profile function), per decode step."""
    import collections
    import os

    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: collections.Counter = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func)] += 1
            return func(*args, **(kwargs or {}))

    package = os.path.dirname(rs.__file__)
    model = build(
        layers=layers, hidden=args.hidden, experts=8, top_k=2, moe_width=args.hidden // 2, device="cpu"
    )
    prompt = torch.randint(1, 4000, (batch, 16))
    kwargs = {
        "input_ids": prompt,
        "attention_mask": torch.ones_like(prompt),
        "do_sample": False,
        "pad_token_id": 0,
        "eos_token_id": 2,  # min_new_tokens keeps it from ending any row early
    }

    def counted(new_tokens: int) -> tuple[int, int]:
        calls = [0]

        def profile(frame, event, arg):
            if event == "call" and frame.f_code.co_filename.startswith(package):
                calls[0] += 1

        with Ops() as mode:
            sys.setprofile(profile)
            try:
                model.generate(**kwargs, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
            finally:
                sys.setprofile(None)
        return sum(mode.ops.values()), calls[0]

    def per_step() -> tuple[float, float]:
        (ops_long, calls_long), (ops_short, calls_short) = counted(args.new_tokens + 1), counted(1)
        return (ops_long - ops_short) / args.new_tokens, (calls_long - calls_short) / args.new_tokens

    with torch.no_grad():
        plain_ops, _ = per_step()
        with rs.record(model, tmp / f"count-{layers}-{batch}", flush_seconds=1e9):
            per_step()  # warm
            ops, calls = per_step()
    return {"layers": layers, "batch": batch, "ops": ops - plain_ops, "calls": calls}


def fit(rows: list[dict], clock: str, key: str = "added") -> tuple[float, float]:
    """Least squares added = a + b * layers (`key="control"`: the A/A control's)."""
    xs = [r["layers"] for r in rows]
    ys = [r[clock][key] if clock else r[key] for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 16])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--compiled", action="store_true", help="also the compiled static-cache generate")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of --compiled")
    parser.add_argument("--real-shape", action="store_true", help="also Qwen3-30B-A3B's layer shape")
    parser.add_argument(
        "--real-layers", type=int, help="MoE layers of --real-shape (default 2 on a CPU, 8 on a GPU)"
    )
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the depth sweep")
    parser.add_argument(
        "--depth",
        default="auto",
        type=depth_arg,
        help="extra caller frames of the timed calls: auto (a depth without frame-stack chunk "
        "churn, CPython 3.11: see the module docstring), random (per round), or a number",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads on a CPU (default 1: the writer thread keeps the other core of a "
        "2-core machine, and intra-op pools do not add their own noise)",
    )
    parser.add_argument(
        "--clock",
        choices=list(CLOCKS),
        help="the clock of the table (all three are fitted): thread = the model thread's CPU time "
        "(default on a CPU: on a shared machine elapsed time mostly measures waiting for a core), "
        "cpu = the process's CPU time with the writer thread's, wall = elapsed (default on a GPU)",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="only the eager cost timed forward by forward: a recorded, a plain and a control "
        "decode advancing together, one step each per iteration (robust to the machine's drift)",
    )
    parser.add_argument(
        "--position-ids",
        action="store_true",
        help="--interleave: pass each forward its position_ids, as generate does (the recorder's "
        "identity then takes generate's path)",
    )
    parser.add_argument(
        "--count",
        action="store_true",
        help="only count what recording adds to an eager decode step (aten ops, Python calls "
        "into routescope), per step and per MoE layer: independent of the machine's load",
    )
    args = parser.parse_args(argv)
    args.clock = args.clock or ("wall" if args.device == "cuda" else "thread")
    if args.device == "cpu":
        torch.set_num_threads(max(1, args.threads))
    tmp = Path(tempfile.mkdtemp(prefix="rs-decode-"))
    small = {"hidden": args.hidden, "experts": 8, "top_k": 2, "moe_width": args.hidden // 2}
    real = {"hidden": 2048, "experts": 128, "top_k": 8, "moe_width": 768}
    real_layers = args.real_layers or (8 if args.device == "cuda" else 2)
    paths = [False, True] if args.compiled else [False]
    if args.count:
        print(f"eager decode step, {args.new_tokens} new tokens: what recording adds, counted")
        print("| batch | MoE layers | aten ops per step | routescope Python calls per step |")
        print("|---|---|---|---|")
        for batch in args.batches:
            counts = [count_work(n, batch, args, tmp) for n in args.layers]
            for c in counts:
                print(f"| {batch} | {c['layers']} | {c['ops']:.1f} | {c['calls']:.1f} |")
            if len(counts) >= 2:
                for key in ("ops", "calls"):
                    a, b = fit(counts, "", key)
                    print(f"  batch {batch} {key}: {a:.1f} per step + {b:.2f} per MoE layer")
        shutil.rmtree(tmp, ignore_errors=True)
        return 0
    if args.interleave:
        print(
            f"eager decode, forward by forward: {args.rounds} decodes x {args.new_tokens} steps, "
            f"threads {torch.get_num_threads()}, caller depth {args.depth}, model-thread CPU ms, "
            "medians of per-step differences"
        )
        print("| batch | MoE layers | plain ms/step | added ms/step | A/A ms/step | pairs | depth |")
        print("|---|---|---|---|---|---|---|")
        for batch in args.batches:
            rows = [interleave({"layers": n, **small}, batch, args, tmp) for n in args.layers]
            for r in rows:
                print(
                    f"| {batch} | {r['layers']} | {r['plain']:.3f} | {r['added']:+.4f} | "
                    f"{r['control']:+.4f} | {r['pairs']} | {r['depth']} |",
                    flush=True,
                )
            if len(rows) >= 2:
                a, b = fit(rows, "", "added")
                a0, b0 = fit(rows, "", "control")
                print(
                    f"  batch {batch}: a = {a:.4f} ms/step, b = {b:.4f} ms/MoE layer "
                    f"(A/A control: a = {a0:+.4f}, b = {b0:+.4f}; goal a <= 0.1, b <= 0.01)"
                )
        shutil.rmtree(tmp, ignore_errors=True)
        return 0
    print(
        f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{args.new_tokens} new tokens, {args.rounds} rounds, caller depth {args.depth}, medians, "
        f"table: {args.clock} clock"
    )
    print(
        "| path | batch | MoE layers | shape | plain ms/step | recorded ms/step | added ms/step "
        "| added IQR | A/A ms/step | ratio | depth |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows: list[dict] = []
    try:
        for compiled in paths:
            for batch in args.batches:
                configs = [({"layers": n, **small}, "tiny") for n in args.layers]
                if args.real_shape:
                    configs.append(({"layers": real_layers, **real}, "Qwen3-30B-A3B layer"))
                for shape, name in configs:
                    row = measure(shape, batch, compiled, args, tmp)
                    row["shape"] = name
                    rows.append(row)
                    c = row[args.clock]
                    print(
                        f"| {row['path']} | {batch} | {row['layers']} | {name} | {c['plain']:.3f} | "
                        f"{c['recorded']:.3f} | {c['added']:+.3f} | {c['spread']:.3f} | {c['control']:+.3f} | "
                        f"{(c['plain'] + c['added']) / c['plain']:.3f} | {row['depth']} |",
                        flush=True,
                    )
        print()
        print(
            "fit over the depth sweep: added ms/step = a + b x MoE layers (goal a <= 0.1, b <= 0.01 on CPU)"
        )
        for compiled in paths:
            for batch in args.batches:
                sweep = [
                    r
                    for r in rows
                    if r["shape"] == "tiny"
                    and r["batch"] == batch
                    and r["path"] == ("compiled" if compiled else "eager")
                ]
                if len(sweep) >= 2:
                    for clock in CLOCKS:
                        a, b = fit(sweep, clock)
                        a0, b0 = fit(sweep, clock, "control")
                        print(
                            f"  {sweep[0]['path']:8s} batch {batch} {clock:6s}: a = {a:.3f} ms/step, "
                            f"b = {b:.4f} ms/MoE layer   (A/A control: a = {a0:+.3f}, b = {b0:+.4f})"
                        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

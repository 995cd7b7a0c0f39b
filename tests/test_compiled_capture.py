"""Compiled models record what the eager recording of the same inputs records (capture/recording/compiled.py):
torch.compile(fullgraph=True), a model compiled and warmed up before `record`, and
transformers' compiled static-cache generate, with inductor on CPU, no graph break and no
recompile in steady state. Inductor compiles take about 30 s each here: the heavy tests
are marked slow, and each compiles as few graphs as it can."""

from __future__ import annotations

import cProfile
import functools
import pstats
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import routescope as rs
from routescope.errors import RouteScopeError
from tests.test_capture import padded_batch
from tests.test_generation_paths import assert_same_rows, generate, rows
from tests.tiny_models import build_tiny_seq2seq_model

pytestmark = pytest.mark.slow  # README's test command leaves this file out (-m 'not slow')

# inductor's fused router softmax may round differently from eager's
WEIGHT_ATOL = 1e-6


@pytest.fixture
def model(tiny_model):
    return tiny_model("qwen3_moe")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def sequences(df, first: int, count: int):
    """Rows of sequences first .. first+count-1, renumbered from 0."""
    part = df[(df.seq_id >= first) & (df.seq_id < first + count)].copy()
    part["seq_id"] -= first
    return part.reset_index(drop=True)


def forward(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.slow
def test_torch_compile_fullgraph_records_the_eager_rows(model, tmp_path, device):
    ids, mask = padded_batch(device, "left", lengths=(6, 3))
    with rs.record(model, tmp_path / "eager"):
        eager_logits = forward(model, ids, mask)
    compiled = torch.compile(model, fullgraph=True)
    with rs.record(compiled, tmp_path / "compiled"):
        logits = forward(compiled, ids, mask)
        assert graphs() == 1
        profile = cProfile.Profile()
        with torch._dynamo.config.patch(error_on_recompile=True):
            profile.enable()
            forward(compiled, ids, mask)  # steady state: the same graph, recorded again
            profile.disable()
    assert not counters["graph_break"]
    # the graph writes every layer's choice itself: no routescope Python runs per layer
    calls = {
        (Path(path).name, name): stats[1]
        for (path, _, name), stats in pstats.Stats(profile).stats.items()
        if "routescope" in path
    }
    assert calls[("sink.py", "begin")] == calls[("sink.py", "end")] == 1  # once per step, eagerly
    per_layer = {key for key in calls if key[0] in ("adapters.py", "compiled.py")}
    per_layer |= {key for key in calls if key[0] == "sink.py" and key[1] not in ("begin", "end")}
    assert not per_layer, per_layer
    torch.testing.assert_close(logits, eager_logits, atol=1e-5, rtol=1e-5)
    got, want = rows(tmp_path / "compiled"), rows(tmp_path / "eager")
    assert len(got) == 2 * len(want)
    assert_same_rows(sequences(got, 0, 2), want, atol=WEIGHT_ATOL)
    assert_same_rows(sequences(got, 2, 2), want, atol=WEIGHT_ATOL)
    # after the block, the compiled model runs as before (dynamo recompiles without the hooks)
    torch.testing.assert_close(forward(compiled, ids, mask), logits)


@pytest.mark.slow
def test_model_compiled_and_warmed_before_record(model, tmp_path, device):
    ids, mask = padded_batch(device, "right", lengths=(4, 6))
    with rs.record(model, tmp_path / "eager"):
        forward(model, ids, mask)
    model.compile(fullgraph=True)
    try:
        forward(model, ids, mask)  # compiled and run before any recording
        warm = graphs()
        with rs.record(model, tmp_path / "compiled"):
            forward(model, ids, mask)
            assert graphs() == warm + 1  # one guarded recompile picks the capture up
            with torch._dynamo.config.patch(error_on_recompile=True):
                forward(model, ids, mask)
        assert not counters["graph_break"]
    finally:
        model._compiled_call_impl = None
    got, want = rows(tmp_path / "compiled"), rows(tmp_path / "eager")
    assert_same_rows(sequences(got, 0, 2), want, atol=WEIGHT_ATOL)
    assert len(got) == 2 * len(want)


@pytest.mark.slow
def test_model_compiled_inside_the_block_records_and_torch_compile_there_is_counted(model, tmp_path, device):
    """An eager recording brackets each step with one instance `forward` on the model (no
    hooks); `model.compile()` inside the block swaps that for hooks first, so the compiled
    graph (fullgraph) records the eager rows. A `torch.compile(model)` made inside the block
    and not given to `record` runs unrecorded: counted, never an error in the graph."""
    from routescope.capture.recording.wraps import is_wrapped

    ids, mask = padded_batch(device, "right", lengths=(4, 6))
    with rs.record(model, tmp_path / "eager"):
        forward(model, ids, mask)
    try:
        with rs.record(model, tmp_path / "compiled") as rec:
            assert is_wrapped(model) and not model._forward_pre_hooks
            model.compile(fullgraph=True)
            assert not is_wrapped(model) and model._forward_pre_hooks and model._forward_hooks
            forward(model, ids, mask)
        assert rec.skipped.counts == {}
    finally:
        model._compiled_call_impl = None
    assert_same_rows(rows(tmp_path / "compiled"), rows(tmp_path / "eager"), atol=WEIGHT_ATOL)
    torch._dynamo.reset()
    with pytest.warns(RuntimeWarning, match="compiled_in_block_forwards=2"):
        with rs.record(model, tmp_path / "outside"):
            compiled = torch.compile(model, fullgraph=True)
            forward(compiled, ids, mask)
            forward(compiled, ids, mask)
    manifest = rs.open_run(tmp_path / "outside").manifest
    assert manifest["skipped"] == {"compiled_in_block_forwards": 2} and manifest["steps"] == 0


@pytest.mark.slow
def test_compiled_static_cache_generate_records_its_decode_steps(model, tmp_path, device):
    from transformers import CompileConfig

    ids, mask = padded_batch(device, "left", lengths=(6, 3))
    config = CompileConfig(fullgraph=True, mode="default")  # reduce-overhead: the CUDA test below
    config._compile_all_devices = True  # transformers compiles on CUDA only by default
    with rs.record(model, tmp_path / "dynamic"):
        want_out = generate(model, ids, mask, min_new_tokens=5, max_new_tokens=5)
    with rs.record(model, tmp_path / "compiled"):
        out = generate(
            model,
            ids,
            mask,
            min_new_tokens=5,
            max_new_tokens=5,
            cache_implementation="static",
            compile_config=config,
        )
        assert "_compiled_call" in vars(model) and graphs() >= 1  # the decode steps ran compiled
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = generate(
                model,
                ids,
                mask,
                min_new_tokens=5,
                max_new_tokens=5,
                cache_implementation="static",
                compile_config=config,
            )
    del model._compiled_call
    assert not counters["graph_break"]
    assert torch.equal(out, want_out) and torch.equal(again, want_out)
    got, want = rows(tmp_path / "compiled"), rows(tmp_path / "dynamic")
    assert set(got.phase) == {"prefill", "decode"}
    assert_same_rows(sequences(got, 0, 2), want, atol=WEIGHT_ATOL)
    assert_same_rows(sequences(got, 2, 2), want, atol=WEIGHT_ATOL)


def test_compiled_decode_steps_reuse_ring_sets_and_record_the_eager_rows(model, tmp_path, monkeypatch):
    """A long compiled decode on a CPU: each step's graph writes a set of a ring that the writer
    thread empties and gives back while the decode goes on (capture/recording/rows.py). With
    at most two sets out and every step sent to the writer at once, the steps reuse given-back
    sets or, while both are out, copy out of the sink's buffers: either way the rows are the
    eager ones. aot_eager: dynamo's graph without inductor's 30 s compile."""
    from transformers import CompileConfig

    from routescope.capture.recording import recorder, sink

    monkeypatch.setattr(sink, "RING_BYTES", 1)  # at least two sets: `max(2, ...)`
    monkeypatch.setattr(recorder, "BATCH_STEPS", 1)
    ids, mask = padded_batch(torch.device("cpu"), "left", lengths=(6, 3))
    config = CompileConfig(fullgraph=True, backend="aot_eager")
    config._compile_all_devices = True  # transformers compiles on CUDA only by default
    with rs.record(model, tmp_path / "eager"):
        want_out = generate(model, ids, mask, min_new_tokens=24, max_new_tokens=24)
    with rs.record(model, tmp_path / "compiled") as rec:
        out = generate(
            model,
            ids,
            mask,
            min_new_tokens=24,
            max_new_tokens=24,
            cache_implementation="static",
            compile_config=config,
        )
        rings = dict(rec._sink._rings)
    del model._compiled_call
    assert not counters["graph_break"] and torch.equal(out, want_out)
    assert rings[2].made <= 2 and rec.steps >= 24  # 23 two-token decode steps through two sets
    assert_same_rows(rows(tmp_path / "compiled"), rows(tmp_path / "eager"), atol=WEIGHT_ATOL)


@pytest.mark.parametrize("model_type", ["flint", "jetmoe"])
def test_post_hook_routers_record_compiled(tiny_model, tmp_path, model_type):
    """Routers read from a hook on their output (not the experts' call): the extractor is traced
    too. aot_eager: the same dynamo graph as inductor, without its 30 s compile."""
    model = tiny_model(model_type)
    ids, mask = padded_batch(torch.device("cpu"), "left", lengths=(5, 3))
    with rs.record(model, tmp_path / "eager"):
        forward(model, ids, mask)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with rs.record(compiled, tmp_path / "compiled"):
        forward(compiled, ids, mask)
    assert not counters["graph_break"]
    assert_same_rows(rows(tmp_path / "compiled"), rows(tmp_path / "eager"), atol=WEIGHT_ATOL)


def test_reduce_overhead_cuda_graphs_record_the_eager_rows(model, tmp_path, device):
    """CUDA graphs replay without Python: the buffers written inside the captured graph are all
    that records a step (benchmarks/gpu_checks.sh runs this with --device cuda)."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    from transformers import CompileConfig

    ids, mask = padded_batch(device, "left", lengths=(6, 3))
    with rs.record(model, tmp_path / "eager"):
        forward(model, ids, mask)
        want_out = generate(model, ids, mask, min_new_tokens=6, max_new_tokens=6)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with rs.record(compiled, tmp_path / "graphs"):
        for _ in range(3):  # warm-up run, capture, replay
            forward(compiled, ids, mask)
    assert not counters["graph_break"]
    got, want = rows(tmp_path / "graphs"), rows(tmp_path / "eager")
    for run in range(3):
        assert_same_rows(sequences(got, 2 * run, 2), sequences(want, 0, 2), atol=1e-5)
    config = CompileConfig(fullgraph=True)  # mode="reduce-overhead", transformers' default
    with rs.record(model, tmp_path / "generate"):
        out = generate(
            model,
            ids,
            mask,
            min_new_tokens=6,
            max_new_tokens=6,
            cache_implementation="static",
            compile_config=config,
        )
    del model._compiled_call
    assert torch.equal(out, want_out)
    assert_same_rows(
        rows(tmp_path / "generate"),
        sequences(want, 2, 2),
        atol=1e-5,
    )


def test_compiled_encoder_decoder_is_refused(tmp_path):
    model = build_tiny_seq2seq_model("switch_transformers")
    with pytest.raises(RouteScopeError, match="encoder-decoder"):
        with rs.record(torch.compile(model, backend="eager"), tmp_path / "run"):
            pass


def empty_hook_guards() -> list[int]:
    """Per graph dynamo holds: how many of its guards check that a module's hook dict is empty."""
    counts = []
    for ref in list(torch._dynamo.convert_frame.input_codes.seen):
        code = ref()
        for entry in torch._dynamo.eval_frame._debug_get_cache_entry_list(code) if code else []:
            lines = str(entry.guard_manager).splitlines()
            counts.append(sum("DICT_LENGTH: not" in line and "hooks" in line for line in lines))
    return counts


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_an_unrecorded_copy_compiled_first_never_runs_for_the_recorded_model(
    tiny_model, tmp_path, model_type
):
    """Dynamo shares graphs between instances of one class. A compiled recording puts an
    instance `forward` on each router (its write, or a pass-through beside a post hook), and
    dynamo guards on every inlined module's `forward` (absent from the instance, or this
    function): the copy's graph (no capture) fails on the recorded routers, the recorded graph
    on the copy's, and no graph guards on every module's empty hook dicts, which costs each call
    about 0.01 ms per MoE layer (mixtral, whose routers have no hooks of transformers': before
    any guard, its recorded steps ran the copy's graph and were lost)."""
    plain, recorded = tiny_model(model_type), tiny_model(model_type)
    ids, mask = padded_batch(torch.device("cpu"), "left", lengths=(5, 3))
    with rs.record(recorded, tmp_path / "eager"):
        forward(recorded, ids, mask)
    plain_compiled = torch.compile(plain, fullgraph=True, backend="aot_eager")
    recorded_compiled = torch.compile(recorded, fullgraph=True, backend="aot_eager")
    forward(plain_compiled, ids, mask)  # compiled before record: dropped at the first step
    with rs.record(recorded_compiled, tmp_path / "compiled"):
        forward(recorded_compiled, ids, mask)
        forward(plain_compiled, ids, mask)  # the copy compiles its own graph inside the block
        assert empty_hook_guards() == [0, 0]  # the recorded model's graph and the copy's
        assert torch._dynamo.config.skip_nnmodule_hook_guards  # dynamo's default, left alone
        with torch._dynamo.config.patch(error_on_recompile=True):
            forward(recorded_compiled, ids, mask)  # the copy's graph, tried first, fails on the marks
            forward(plain_compiled, ids, mask)
    manifest = rs.open_run(tmp_path / "compiled").manifest
    assert manifest["complete"] is True and manifest["skipped"] == {}
    got, want = rows(tmp_path / "compiled"), rows(tmp_path / "eager")
    assert len(got) == 2 * len(want)
    assert_same_rows(sequences(got, 0, 2), want, atol=WEIGHT_ATOL)
    assert_same_rows(sequences(got, 2, 2), want, atol=WEIGHT_ATOL)


def test_a_router_whose_forward_was_replaced_turns_hook_guards_on_while_recording(model, tmp_path):
    """A router whose `forward` something else replaced already (accelerate's device hooks)
    cannot be marked: a compiled recording turns dynamo's hook guards on for its block (and
    only then), restores them when it ends, and records that router through its hook."""
    ids, mask = padded_batch(torch.device("cpu"), "left", lengths=(5, 3))
    with rs.record(model, tmp_path / "eager"):
        forward(model, ids, mask)
    assert torch._dynamo.config.skip_nnmodule_hook_guards
    with rs.record(torch.compile(model, backend="eager"), tmp_path / "marked"):
        assert torch._dynamo.config.skip_nnmodule_hook_guards  # every router marked: no hook guard
    experts = model.model.layers[1].mlp.experts
    experts.forward = functools.partial(type(experts).forward, experts)
    try:
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        with rs.record(compiled, tmp_path / "replaced"):
            assert not torch._dynamo.config.skip_nnmodule_hook_guards
            forward(compiled, ids, mask)
        assert torch._dynamo.config.skip_nnmodule_hook_guards  # restored
        assert rs.open_run(tmp_path / "replaced").manifest["skipped"] == {}
        assert_same_rows(rows(tmp_path / "replaced"), rows(tmp_path / "eager"), atol=WEIGHT_ATOL)
        assert vars(experts)["forward"].func is type(experts).forward  # theirs, left in place
    finally:
        del experts.forward


def test_compiled_router_stats_are_refused_and_compiled_generate_runs_eagerly(model, tmp_path):
    from transformers import CompileConfig

    with pytest.raises(RouteScopeError, match="router_stats"):
        with rs.record(torch.compile(model, backend="eager"), tmp_path / "a", router_stats=True):
            pass
    config = CompileConfig(backend="eager")
    config._compile_all_devices = True
    ids, mask = padded_batch(torch.device("cpu"), "left", lengths=(4, 2))
    with rs.record(model, tmp_path / "b", router_stats=True):
        generate(model, ids, mask, cache_implementation="static", compile_config=config)
    assert "_compiled_call" not in vars(model)  # statistics need the eager hooks
    assert len(rs.open_run(tmp_path / "b").sql("SELECT * FROM router_stats")) > 0


def test_new_lengths_do_not_recompile_once_dynamic(model, tmp_path):
    """The buffers are one set per recording, grown to the largest step: a new length reuses the
    dynamic graph dynamo made at the second shape, as it does unrecorded."""
    batches = [padded_batch(torch.device("cpu"), "left", lengths=(n, n - 2), seed=n) for n in (5, 7, 9)]
    with rs.record(model, tmp_path / "eager"):
        for ids, mask in batches:
            forward(model, ids, mask)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with rs.record(compiled, tmp_path / "compiled"):
        forward(compiled, *batches[0])
        forward(compiled, *batches[1])  # a second shape: dynamo marks the length dynamic
        with torch._dynamo.config.patch(error_on_recompile=True):
            forward(compiled, *batches[2])
    assert_same_rows(rows(tmp_path / "compiled"), rows(tmp_path / "eager"), atol=WEIGHT_ATOL)

"""The one recording path (capture/recording/sink.py), its options (capture/recording/options.py),
a failed step that loses only itself, and graphs compiled before `record` for a model whose
forward has a graph break (issue 35)."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import pandas as pd
import pytest
import torch
from torch._dynamo.utils import counters

import routescope as rs
from routescope.capture.discovery import find_routers
from routescope.capture.recording import sink as sink_module
from routescope.capture.recording.options import RecordOptions
from routescope.capture.recording.rows import RingRows
from routescope.capture.recording.sink import RoutingSink, as_tensor, router_hook
from routescope.capture.recording.step import StepBuffers
from routescope.capture.recording.wraps import is_wrapped
from tests.test_capture import padded_batch
from tests.test_generation_paths import assert_same_rows, generate, rows


@pytest.fixture
def model(tiny_model):
    return tiny_model("qwen3_moe")


def forward(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs).logits


# -- options ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"mode": "replace"}, "mode='replace' is not allowed; use one of"),
        ({"sample": 0.0}, "sample=0.0 is not allowed"),
        ({"rows_per_part": 0}, "rows_per_part=0 is not allowed: give a whole number >= 1"),
        ({"flush_seconds": -1}, "flush_seconds=-1 is not allowed"),
        ({"layers": []}, "layers=[] is not allowed"),
        ({"observers": [1]}, "every observer must be callable"),
        ({"weight": False}, "unknown recording option 'weight'; allowed: "),
    ],
)
def test_bad_options_are_refused_naming_the_option(model, tmp_path, options, named):
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")):
        rs.record(model, tmp_path / "run", **options)
    assert not (tmp_path / "run").exists()  # refused before anything is opened


def test_options_are_frozen_and_shown_in_the_manifest(model, tmp_path):
    ids, mask = padded_batch(torch.device("cpu"), "left")
    secret = {"key": "AKIA-not-shown", "secret": "not shown either"}
    opts = RecordOptions.from_kwargs(weights=False, layers=[1, 0, 1], sample=1.0, observers=[print])
    with pytest.raises(AttributeError):
        opts.weights = True  # frozen
    assert opts.layers == (0, 1) and opts.sample is None  # normalised: sorted, and 1.0 is everything
    with rs.record(model, tmp_path / "run", weights=False, layers=[1, 0], observers=[print], seed=3) as rec:
        forward(model, ids, mask)
    shown = json.loads((tmp_path / "run" / "manifest.json").read_text())["options"]
    assert shown == rec.options.manifest()
    assert shown["weights"] is False and shown["layers"] == [0, 1] and shown["seed"] == 3
    assert shown["observers"] == ["print"] and shown["mode"] == "create" and shown["train_step"] is None
    assert RecordOptions(storage_options=secret).manifest()["storage_options"] == ["key", "secret"]


def test_rollups_false_leaves_them_to_index(model, tmp_path):
    """rollups=False: the writer writes no rollup_* part (the fastest writer); `routescope index`
    builds them later and the metrics then equal the ones read from routing."""
    from routescope.cli import main

    ids, mask = padded_batch(torch.device("cpu"), "left")
    with rs.record(model, tmp_path / "run", rollups=False) as rec:
        forward(model, ids, mask)
    assert rec.options.manifest()["rollups"] is False
    assert not list((tmp_path / "run").glob("rollup_*/rank=*/*.parquet"))
    with rs.open_run(tmp_path / "run") as run:
        assert run.rollups == []
        from_routing = run.balance()
    assert main(["index", "--quiet", str(tmp_path / "run")]) == 0
    with rs.open_run(tmp_path / "run") as run:
        assert "rollup_expert_counts" in run.rollups
        pd.testing.assert_frame_equal(run.balance(), from_routing)
    with pytest.raises(ValueError, match="rollups"):
        rs.record(model, tmp_path / "bad", rollups="no")


def test_sink_keeps_one_buffer_per_device_and_k_and_gives_each_layer_its_rows(model):
    """Layers of another top-k share a second pair of buffers; a step's rows come out per group,
    in layer order, whichever order the layers wrote them, and are copies (the next step
    reuses the buffers)."""
    sites = find_routers(model)
    sites = [dataclasses.replace(site, top_k=3 if i % 2 else site.top_k) for i, site in enumerate(sites)]
    sink = RoutingSink(sites)
    try:
        k = sites[0].top_k
        assert [tuple(t.shape) for t in sink._allocate(64, torch.device("cpu"))[0]] == [
            (len(sites[0::2]), 64, k),
            (len(sites[1::2]), 64, 3),
        ]
        sink.begin(5, torch.device("cpu"), zero=False)
        written = {}
        for slot in reversed(range(len(sites))):  # not in layer order
            width = sites[slot].top_k
            ids = torch.arange(5 * width).reshape(5, width) + 100 * slot
            weights = ids.float() / 1000
            sink.put(slot, ids, weights)
            written[slot] = ids
        groups = [
            (layers, as_tensor(ids), as_tensor(w)) for layers, ids, w in sink.end("decoder", compiled=False)
        ]
        assert [layers for layers, _, _ in groups] == [
            [s.layer for s in sites[0::2]],
            [s.layer for s in sites[1::2]],
        ]
        for (_, ids, weights), slots in zip(groups, (range(0, len(sites), 2), range(1, len(sites), 2))):
            expected = torch.stack([written[s] for s in slots])
            assert torch.equal(ids.long(), expected)
            assert torch.allclose(weights, expected.float() / 1000)
        first = groups[0][1].clone()
        sink.begin(5, torch.device("cpu"), zero=True)  # the next step zeroes the same buffers
        assert torch.equal(groups[0][1], first)
        # a compiled step: the graph's writes (ids + 1) into the zeroed rows, one layer left out
        for slot in range(1, len(sites)):
            width = sites[slot].top_k
            sink.write(slot, torch.full((5, width), 7), torch.ones(5, width))
        groups = [(layers, as_tensor(ids), w) for layers, ids, w in sink.end("decoder", compiled=True)]
        assert (groups[0][1][0] == -1).all() and (groups[0][1][1:] == 7).all()
        assert (groups[1][1] == 7).all()
    finally:
        sink.close()


def write_compiled_step(sink, sites, value, skip=()):
    """A compiled CPU step of 5 tokens: the graph's writes (`sink.write`), `skip` slots left out."""
    sink.begin(5, torch.device("cpu"), zero=True)
    for slot, site in enumerate(sites):
        if slot not in skip:
            sink.write(slot, torch.full((5, site.top_k), value), torch.full((5, site.top_k), value / 10))
    return sink.end("decoder", compiled=True)


def test_compiled_cpu_steps_write_a_ring_of_buffer_sets_that_the_writer_gives_back(model):
    """A compiled CPU step writes into a set of its own: its rows are taken out later (on the
    writer thread) and are not those of the steps after it; taking them out zeroes the set and
    gives it back, so a later step that leaves a layer unwritten reads -1 there. With `limit`
    sets out, a step copies out of the sink's own buffers instead; a step larger than
    RING_TOKENS does too. A set holds the step's token count rounded up to a power of two."""
    sites = find_routers(model)
    sink = RoutingSink(sites)
    try:
        first = write_compiled_step(sink, sites, 7)
        ring = sink._rings[8]  # 5 tokens: sets of 8 rows
        ring.limit = 2
        second = write_compiled_step(sink, sites, 9, skip={0})  # while the first step's set is out
        assert [type(rows) for _, rows, _ in first] == [RingRows]
        assert ring.made == 2 and first[0][1].step.rows is not second[0][1].step.rows
        ids = as_tensor(second[0][1])
        assert (ids[0] == -1).all() and (ids[1:] == 9).all()
        assert (as_tensor(first[0][1]) == 7).all() and torch.allclose(
            as_tensor(first[0][2]), torch.tensor(0.7)
        )
        assert ring.made == 2 and len(ring._free) == 2  # both given back
        third = write_compiled_step(sink, sites, 5, skip={1})  # a given-back set: zeroed
        ids = as_tensor(third[0][1])
        assert (ids[1] == -1).all() and (ids[0] == 5).all() and (ids[2:] == 5).all()
        assert ring.made == 2
        # a step's weights read after its ids gave the set back, and a later step wrote that set
        step = write_compiled_step(sink, sites, 6)
        rows = step[0][1].step.rows
        as_tensor(step[0][1])
        ring._free.remove(rows)
        ring._free.appendleft(rows)  # the next step gets that set
        later = write_compiled_step(sink, sites, 8)
        assert later[0][1].step.rows is rows
        assert torch.allclose(as_tensor(step[0][2]), torch.tensor(0.6))
        assert (as_tensor(later[0][1]) == 8).all()

        held = [write_compiled_step(sink, sites, 3), write_compiled_step(sink, sites, 3)]  # both sets out
        copied = write_compiled_step(sink, sites, 4, skip={0})  # none free, `limit` made: a copy
        assert isinstance(copied[0][1], torch.Tensor)
        assert (copied[0][1][0] == -1).all() and (copied[0][1][1:] == 4).all()
        assert all((as_tensor(step[0][1]) == 3).all() for step in held)

        sink.begin(1, torch.device("cpu"), zero=True)  # a decode step of one token: sets of one row
        assert [ids.shape[1] for ids in sink.current[0]] == [1]
        sink.end("decoder", compiled=True)
        sink.begin(sink_module.RING_TOKENS + 1, torch.device("cpu"), zero=True)
        assert sink.current is sink._buffers
        sink.end("decoder", compiled=True)
        dropped = write_compiled_step(sink, sites, 1)  # e.g. the forward raised: never taken out
        assert ring.made == 2 and len(ring._free) == 1
        del first, second, third, step, later, held, dropped
        assert ring.made == 1  # a set dropped with its step (never taken out) is not counted
    finally:
        sink.close()


@pytest.mark.parametrize("tokens", [5, sink_module.KEEP_TOKENS + 1])
def test_a_router_with_the_wrong_number_of_ids_is_named_kept_or_copied(model, tokens):
    """A decode-sized step keeps the routers' tensors and checks them at the end; a larger
    one copies at once and checks there: either way the layer and its shape are named."""
    sites = find_routers(model)
    sink = RoutingSink(sites)
    try:
        sink.begin(tokens, torch.device("cpu"), zero=False)
        for slot, site in enumerate(sites):
            n = tokens - 1 if slot == 1 else tokens
            sink.put(slot, torch.zeros(n, site.top_k, dtype=torch.long), torch.ones(n, site.top_k))
        with pytest.raises(rs.RouteScopeError, match=rf"layer {sites[1].layer} routed expert ids of shape"):
            for _, ids, _ in sink.end("decoder", compiled=False):  # kept (CPU): checked where stacked
                as_tensor(ids)
    finally:
        sink.close()


def test_kept_router_weights_hold_no_autograd_graph(model):
    """A kept decode step in a training forward (grad on): the references the writer thread
    will hold are detached, on the router write's short path and in `put` alike."""
    sites = find_routers(model)
    sink = RoutingSink(sites)
    try:
        for keep_ok in (None, True):  # the watched first kept step (`put`), then the short path
            sink.keep_ok = keep_ok
            sink.begin(3, torch.device("cpu"), zero=False)
            for slot, site in enumerate(sites):
                k = site.top_k
                weights = torch.ones(3, k, requires_grad=True) * 0.5  # has a grad_fn
                args = (torch.zeros(3, 8), torch.zeros(3, k, dtype=torch.long), weights)
                router_hook(sink, site, slot)(site.module, args, {})
            assert sink.keeping is (keep_ok is True)
            assert all(not w.requires_grad and w.grad_fn is None for w in sink.kept_weights)
            sink.end("decoder", compiled=False)
    finally:
        sink.close()


# -- where the eager write runs, and kept references ------------------------------------------
def test_eager_routers_write_inside_their_forward_and_are_unwrapped_after(model, tmp_path):
    """A pre-hook adapter's write runs inside the router's forward (no hook on it while
    recording), after every forward pre-hook, also one added inside the block: what the experts
    are called with is what is recorded. Nothing is left on the modules after the block."""
    sites = find_routers(model)
    ids, mask = padded_batch(torch.device("cpu"), "left", lengths=(5, 3))

    def force(module, args, kwargs):  # every token to experts 0 and 1, weights 0.5 each
        chosen = torch.zeros_like(args[1])
        chosen[..., 1] = 1
        return (args[0], chosen, torch.full_like(args[2], 0.5), *args[3:]), kwargs

    with rs.record(model, tmp_path / "run"):
        assert all(is_wrapped(site.module) and not site.module._forward_pre_hooks for site in sites)
        handle = sites[0].module.register_forward_pre_hook(force, with_kwargs=True)
        try:
            forward(model, ids, mask)
        finally:
            handle.remove()
    assert not any(is_wrapped(site.module) or "forward" in vars(site.module) for site in sites)
    routing = rs.open_run(tmp_path / "run").sql("SELECT layer, slot, expert, weight FROM routing")
    forced = routing[routing.layer == sites[0].layer]
    assert len(forced) and (forced.expert == forced.slot).all() and (forced.weight == 0.5).all()
    other = routing[routing.layer == sites[1].layer]
    assert not ((other.expert == other.slot).all() and (other.weight == 0.5).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_decode_steps_equal_copied_ones(model, tmp_path, monkeypatch, dtype):
    """Decode steps keep the routers' tensors (in the router's dtypes: int64 ids, bfloat16
    weights), and the writer thread stacks and casts them; the rows equal a recording that
    copies every layer's choice into the int16 / float32 buffers at once (KEEP_TOKENS = 0)."""
    model = copy.deepcopy(model).to(dtype)
    ids, mask = padded_batch(torch.device("cpu"), "left", lengths=(5, 3))
    with rs.record(model, tmp_path / "kept") as kept:
        generate(model, ids, mask, max_new_tokens=6, min_new_tokens=6)
    assert kept._sink.keep_ok is True
    monkeypatch.setattr(sink_module, "KEEP_TOKENS", 0)
    with rs.record(model, tmp_path / "copied") as copied:
        generate(model, ids, mask, max_new_tokens=6, min_new_tokens=6)
    assert copied._sink.keep_ok is None  # no step was kept
    got, want = rows(tmp_path / "kept"), rows(tmp_path / "copied")
    assert (got.phase == "decode").sum() > 0
    assert_same_rows(got, want)


def test_router_tensors_changed_in_place_after_the_write_are_recorded_as_used(model, tmp_path):
    """A forward hook that scales the experts' weights in place after they were used: kept
    references would read the changed values. The first kept step is watched (copied too and
    compared at the end), so the recording switches to copies and records what the experts
    used, for every step, that one included."""
    ids, mask = padded_batch(torch.device("cpu"), "left", lengths=(5, 3))
    with rs.record(model, tmp_path / "want"):
        generate(model, ids, mask, max_new_tokens=6, min_new_tokens=6)

    def halve(module, args, kwargs, output):
        args[2].mul_(0.5)

    handles = [site.module.register_forward_hook(halve, with_kwargs=True) for site in find_routers(model)]
    try:
        with rs.record(model, tmp_path / "got") as rec:
            generate(model, ids, mask, max_new_tokens=6, min_new_tokens=6)
    finally:
        for handle in handles:
            handle.remove()
    assert rec._sink.keep_ok is False
    manifest = rs.open_run(tmp_path / "got").manifest
    assert manifest["complete"] is True and manifest["skipped"] == {}
    assert_same_rows(rows(tmp_path / "got"), rows(tmp_path / "want"))


# -- a failed step ---------------------------------------------------------------------------
@pytest.mark.slow
def test_a_step_failing_on_the_writer_thread_loses_only_itself(model, tmp_path, monkeypatch):
    batches = [padded_batch(torch.device("cpu"), "left", lengths=(5, 3), seed=s) for s in range(4)]
    with rs.record(model, tmp_path / "want"):
        for ids, mask in batches:
            forward(model, ids, mask)
    real = StepBuffers.finish

    def planted(self, *args):
        """Step 1 reads as if its graph had written no layer (ids -1), found on the writer thread."""
        host = real(self, *args)
        if self.step == 1:
            host.host["experts"] = torch.full_like(as_tensor(host.host["experts"]), -1)
        return host

    monkeypatch.setattr(StepBuffers, "finish", planted)
    with pytest.warns(RuntimeWarning, match="did not write every recorded MoE layer's choice"):
        with rs.record(model, tmp_path / "got") as rec:
            for ids, mask in batches:
                forward(model, ids, mask)
    run = rs.open_run(tmp_path / "got")
    assert run.manifest["complete"] is True and run.manifest["skipped"] == {"steps_failed": 1}
    (error,) = run.manifest["step_errors"]
    assert error.startswith("step 1: RouteScopeError: a compiled forward did not write every recorded MoE")
    assert rec.steps == 4 and run.manifest["steps"] == 4
    steps = sorted(run.sql("SELECT DISTINCT step FROM tokens").step)
    assert steps == [0, 2, 3]
    got = run.sql(
        "SELECT * FROM routing r JOIN tokens t USING (seq_id, pos) ORDER BY step, seq_id, pos, layer, slot"
    )
    want = rs.open_run(tmp_path / "want").sql(
        "SELECT * FROM routing r JOIN tokens t USING (seq_id, pos) WHERE step <> 1 "
        "ORDER BY step, seq_id, pos, layer, slot"
    )
    assert got[["step", "pos", "layer", "slot", "expert", "weight"]].equals(
        want[["step", "pos", "layer", "slot", "expert", "weight"]]
    )


@pytest.mark.slow
def test_a_layer_running_twice_in_one_step_loses_only_that_step(model, tmp_path):
    """A real failure on the model's thread: in the second forward one MoE layer's router runs twice."""
    batches = [padded_batch(torch.device("cpu"), "left", lengths=(5, 3), seed=s) for s in range(3)]
    site = find_routers(model)[0]
    calls = {"n": 0, "inside": False}

    def again(module, args, kwargs, output):
        calls["n"] += 1
        if calls["n"] == 2 and not calls["inside"]:
            calls["inside"] = True
            module(*args, **kwargs)
            calls["inside"] = False

    handle = site.module.register_forward_hook(again, with_kwargs=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with rs.record(model, tmp_path / "run"):
                for ids, mask in batches:
                    forward(model, ids, mask)
    finally:
        handle.remove()
    run = rs.open_run(tmp_path / "run")
    assert run.manifest["skipped"] == {"steps_failed": 1} and run.manifest["complete"] is True
    assert "ran more than once in one forward" in run.manifest["step_errors"][0]
    assert any("ran more than once" in str(w.message) for w in caught)
    assert sorted(run.sql("SELECT DISTINCT step FROM tokens").step) == [0, 2]
    layers = run.sql(
        "SELECT step, count(DISTINCT layer) AS n FROM routing JOIN tokens USING (seq_id, pos) GROUP BY step"
    )
    assert set(layers.n) == {len(run.moe_layers)}


# -- graphs compiled before record, with a graph break --------------------------------------
@pytest.mark.slow
def test_a_copy_compiled_first_with_a_graph_break_leaves_no_stale_graph(tiny_model, tmp_path):
    """Issue 35: an unrecorded copy of the same class compiled and run first, its forward broken
    by transformers' output-capturing hooks (output_router_logits=True), then the recorded copy:
    frames compiled for the model's code other than `forward` (inner forwards, resume functions)
    would run without the capture (before: every step failed, 'did not write every recorded MoE
    layer's choice'). Every one is dropped, and the rows equal eager's."""
    torch._dynamo.reset()
    counters.clear()
    try:
        plain, recorded = tiny_model("qwen3_moe"), tiny_model("qwen3_moe")
        ids, mask = padded_batch(torch.device("cpu"), "left", lengths=(5, 3))
        with rs.record(recorded, tmp_path / "eager"):
            forward(recorded, ids, mask, output_router_logits=True)
        plain.compile(backend="aot_eager")  # the instance's _call_impl is compiled
        plain_compiled = plain
        forward(plain_compiled, ids, mask, output_router_logits=True)
        assert counters["graph_break"]  # the scenario needs a break
        recorded.compile(backend="aot_eager")
        recorded_compiled = recorded
        with rs.record(recorded_compiled, tmp_path / "compiled"):
            forward(recorded_compiled, ids, mask, output_router_logits=True)
            forward(plain_compiled, ids, mask, output_router_logits=True)
            forward(recorded_compiled, ids, mask, output_router_logits=True)
        manifest = rs.open_run(tmp_path / "compiled").manifest
        assert manifest["complete"] is True and manifest["skipped"] == {}
        got, want = rows(tmp_path / "compiled"), rows(tmp_path / "eager")
        assert len(got) == 2 * len(want)
        assert_same_rows(got[got.seq_id < 2].reset_index(drop=True), want, atol=1e-6)
    finally:
        plain._compiled_call_impl = recorded._compiled_call_impl = None
        torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_a_caller_that_reuses_its_ids_buffer_records_the_ids_it_fed(model, tmp_path, dtype):
    """A serving loop writes each next token into one ids tensor (as a CUDA-graph loop must); the
    recording copies a step's ids at its start, also ids given as int32 (no cast to copy them)."""
    from transformers import DynamicCache

    fed = [[3, 5, 7, 9], [11], [13], [17]]
    buffer = torch.zeros(1, 1, dtype=dtype)
    cache = DynamicCache()
    with torch.no_grad(), rs.record(model, tmp_path / "run"):
        model(input_ids=torch.tensor([fed[0]], dtype=dtype), past_key_values=cache)
        for (token,) in fed[1:]:
            buffer[0, 0] = token  # the step before was given this same tensor
            model(input_ids=buffer, past_key_values=cache)
    tokens = rs.open_run(tmp_path / "run").sql("SELECT pos, token_id FROM tokens ORDER BY pos")
    assert tokens.token_id.tolist() == [t for step in fed for t in step]
    assert tokens.pos.tolist() == list(range(7))

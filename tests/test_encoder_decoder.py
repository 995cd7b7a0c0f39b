"""Encoder-decoder MoE models (Switch Transformers, NLLB-MoE): both stacks are found, with
distinct layer numbers, and the adapters read the routers' decisions exactly.

The test's own reading of each decision comes from another place than the adapter's: for
Switch Transformers the arguments its experts module is called with; for NLLB-MoE the
top-2 of the router's softmax, with the combine gates at those experts.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from routescope.capture.adapters import match_adapter
from routescope.capture.discovery import find_routers
from tests.conftest import _LIVE_MODELS
from tests.tiny_models import SEQ2SEQ, build_tiny_seq2seq_model

SEQ2SEQ_TYPES = sorted(SEQ2SEQ)


@pytest.fixture
def seq2seq_model(device):
    def make(model_type: str, **overrides) -> torch.nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_tiny_seq2seq_model(model_type, **overrides).to(device)
        _LIVE_MODELS.append(model)  # the hook-leak guard of conftest checks it after the test
        return model

    return make


def source_batch(device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two source sentences, the second right-padded (as seq2seq tokenizers pad)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 120, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return ids.to(device), mask.to(device)


class StackCapture:
    """The test's own record of each MoE layer's decision, per call: (module path, ids, weights)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self.handles = []
        for name, module in model.named_modules():
            kind = type(module).__name__
            if kind == "SwitchTransformersExperts":
                self.handles.append(module.register_forward_pre_hook(self._switch(name)))
            elif kind == "NllbMoeTop2Router":
                self.handles.append(module.register_forward_hook(self._nllb(name)))

    def _switch(self, name: str):
        def hook(module, args):
            _, dispatch, weights = args  # [N, 1, E] one-hot, [N, 1]
            ids = dispatch[:, 0].float().argmax(-1, keepdim=True)
            kept = dispatch[:, 0].sum(-1, keepdim=True) > 0
            self.calls.append((name, ids, torch.where(kept, weights, torch.zeros_like(weights))))

        return hook

    def _nllb(self, name: str):
        def hook(module, args, output):
            _, gates, logits = output
            ids = torch.topk(torch.softmax(logits.float(), dim=-1), 2, dim=-1).indices
            self.calls.append((name, ids, gates.gather(-1, ids)))

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("model_type", SEQ2SEQ_TYPES)
def test_both_stacks_are_found_with_distinct_layer_numbers(model_type, seq2seq_model):
    model = seq2seq_model(model_type)
    sites = find_routers(model)
    encoder_blocks = 2  # tests/tiny_models.py: two blocks per stack, MoE in block 1
    assert [(site.stack, site.layer) for site in sites] == [("encoder", 1), ("decoder", encoder_blocks + 1)]
    assert [site.top_k for site in sites] == [1 if model_type == "switch_transformers" else 2] * 2
    assert all(site.num_experts == 4 for site in sites)
    assert ".encoder." in "." + sites[0].name and ".decoder." in "." + sites[1].name


@pytest.mark.parametrize("model_type", SEQ2SEQ_TYPES)
def test_adapter_reads_the_router_decision_exactly(model_type, seq2seq_model, device):
    model = seq2seq_model(model_type)
    sites = {site.name: site for site in find_routers(model)}
    got: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    handles = [
        site.module.register_forward_hook(
            lambda module, args, output, name=name: got.append(
                (name, *match_adapter(module).extract(module, args, {}, output))
            )
        )
        for name, site in sites.items()
    ]
    capture = StackCapture(model)
    ids, mask = source_batch(device)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :4])
    finally:
        capture.remove()
        for handle in handles:
            handle.remove()
    assert [name for name, _, _ in got] == list(sites)  # encoder then decoder, once each
    assert len(capture.calls) == len(got)
    for (_, want_ids, want_weights), (name, ids_, weights) in zip(capture.calls, got, strict=True):
        tokens = ids.shape[0] * (7 if ".encoder." in "." + name else 4)
        assert ids_.shape == want_ids.shape == (tokens, sites[name].top_k)
        assert torch.equal(ids_.cpu(), want_ids.long().cpu())
        assert torch.equal(weights.cpu(), want_weights.to(weights.dtype).cpu())


def test_switch_capacity_drops_are_recorded_with_weight_zero(seq2seq_model, device):
    # capacity 1: each expert takes the first token of each sequence that picks it
    model = seq2seq_model("switch_transformers", expert_capacity=1)
    site = find_routers(model)[0]
    got = []
    handle = site.module.register_forward_hook(
        lambda module, args, output: got.append(site.adapter.extract(module, args, {}, output))
    )
    capture = StackCapture(model)
    ids, mask = source_batch(device)
    try:
        with torch.no_grad():
            model.get_encoder()(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
        capture.remove()
    (experts, weights), (_, want_ids, want_weights) = got[0], capture.calls[0]
    dropped = (weights == 0).flatten()
    assert 0 < int(dropped.sum()) < len(dropped)  # 7 tokens per row, 4 experts, capacity 1
    assert torch.equal(weights.cpu(), want_weights.cpu())
    kept = ~dropped
    assert torch.equal(experts[kept].cpu(), want_ids[kept].cpu())


@pytest.mark.parametrize("model_type", SEQ2SEQ_TYPES)
def test_forward_and_generate_record_both_stacks_exactly(model_type, seq2seq_model, tmp_path, device):
    import numpy as np

    import routescope as rs

    model = seq2seq_model(model_type)
    ids, mask = source_batch(device)
    capture = StackCapture(model)
    try:
        with rs.record(model, tmp_path / "run"), torch.no_grad():
            model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :4])
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    finally:
        capture.remove()
    run = rs.open_run(tmp_path / "run")
    manifest = run.manifest
    assert manifest["moe_layers"] == [1, 3] and manifest["num_hidden_layers"] == 4
    assert manifest["stacks"] == {"encoder": [0, 2], "decoder": [2, 4]}

    # the forward: encoder then decoder; generate: the encoder once, then one decoder step
    # per generated token but the last (which is never fed back)
    decoder_steps = out.shape[1] - 1
    steps = run.sql(
        "SELECT step, any_value(stack) AS stack, any_value(phase) AS phase FROM tokens GROUP BY step"
    )
    steps = steps.sort_values("step")
    assert list(steps["stack"]) == ["encoder", "decoder", "encoder"] + ["decoder"] * decoder_steps
    assert list(steps.phase) == ["prefill"] * 4 + ["decode"] * (decoder_steps - 1)
    assert len(capture.calls) == len(steps)

    # each stack's tokens are routed only by its own layers, every token k times
    per_stack = run.sql(
        "SELECT t.stack, r.layer, count(DISTINCT (r.seq_id, r.pos)) AS tokens, count(*) AS rows "
        "FROM routing r JOIN tokens t USING (seq_id, pos) GROUP BY ALL ORDER BY r.layer"
    )
    real = int(mask.sum())
    top_k = manifest["top_k"]["1"]
    assert per_stack["stack"].tolist() == ["encoder", "decoder"]
    assert per_stack.tokens.tolist() == [2 * real, 2 * 4 + 2 * decoder_steps]
    assert (per_stack.rows == per_stack.tokens * top_k).all()

    # a generate's decoder sequences keep their ids from the first decoder step on
    gen = run.sql("SELECT step, seq_id, pos FROM tokens WHERE step >= 3 ORDER BY step, seq_id")
    assert gen.groupby("step").seq_id.apply(list).map(tuple).nunique() == 1
    assert gen.groupby("step").pos.max().tolist() == list(range(decoder_steps))

    # exactness, step by step: recorded rows in (seq_id, pos) order equal the capture's
    # decisions for the real tokens, in batch-row order
    valid_by_step = [mask, torch.ones(2, 4), mask] + [torch.ones(2, 1)] * decoder_steps
    for step, ((_, want_ids, want_weights), valid) in enumerate(
        zip(capture.calls, valid_by_step, strict=True)
    ):
        got = run.sql(
            "SELECT r.expert, r.weight, t.pos FROM routing r JOIN tokens t USING (seq_id, pos) "
            "WHERE t.step = ? ORDER BY r.seq_id, r.pos, r.slot",
            [step],
        )
        keep = valid.reshape(-1).bool().cpu()
        assert got.expert.to_numpy().tolist() == want_ids[keep].reshape(-1).cpu().tolist()
        np.testing.assert_array_equal(
            got.weight.to_numpy(np.float32), want_weights[keep].reshape(-1).float().cpu().numpy()
        )
        if steps["stack"].iloc[step] == "encoder":  # positions count real tokens only
            want_pos = (valid.long().cumsum(1) - 1)[valid.bool()].cpu().repeat_interleave(top_k)
            assert got.pos.tolist() == want_pos.tolist()


@pytest.mark.parametrize("model_type", SEQ2SEQ_TYPES)
def test_router_stats_come_from_each_stacks_declared_logits(model_type, seq2seq_model, tmp_path, device):
    import numpy as np

    import routescope as rs

    model = seq2seq_model(model_type)
    ids, mask = source_batch(device)
    logits: dict[str, list[torch.Tensor]] = {}
    handles = [
        module.register_forward_hook(lambda m, a, out, n=name: logits.setdefault(n, []).append(out[2]))
        for name, module in model.named_modules()
        if type(module).__name__.endswith(("Top1Router", "Top2Router"))
    ]
    try:
        with rs.record(model, tmp_path / "run", router_stats=True), torch.no_grad():
            model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :4])
    finally:
        for handle in handles:
            handle.remove()
    run = rs.open_run(tmp_path / "run")
    stats = run.sql("SELECT layer, expert, prob_sum FROM router_stats ORDER BY layer, expert")
    valid = {1: mask.reshape(-1).bool().cpu(), 3: torch.ones(8, dtype=torch.bool)}
    names = sorted(logits, key=lambda name: ".decoder." in "." + name)  # encoder first
    for layer, name in zip((1, 3), names, strict=True):
        probs = logits[name][0].reshape(-1, 4).float().softmax(-1).cpu()[valid[layer]]
        got = stats[stats.layer == layer].prob_sum.to_numpy()
        np.testing.assert_allclose(got, probs.sum(0).double().numpy(), rtol=1e-6)
    per_layer = run.sql("SELECT layer, count(*) AS n FROM router_tokens GROUP BY layer ORDER BY layer")
    assert per_layer.n.tolist() == [int(mask.sum()), 8]
    assert "aux_loss" in run.balance().columns


@pytest.mark.parametrize("model_type", SEQ2SEQ_TYPES)
def test_generate_stops_recording_a_target_row_after_its_end_of_text(
    model_type, seq2seq_model, tmp_path, device
):
    from transformers import LogitsProcessor, LogitsProcessorList

    import routescope as rs

    class EndRowZeroEarly(LogitsProcessor):
        """Row 0's second generated token is end-of-text; row 1 runs to max_new_tokens."""

        def __init__(self, eos: int) -> None:
            self.eos = eos

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if input_ids.shape[1] == 2:
                scores[0] = -1e9
                scores[0, self.eos] = 0
            return scores

    model = seq2seq_model(model_type)
    eos = model.config.eos_token_id
    ids, mask = source_batch(device)
    with rs.record(model, tmp_path / "run"), torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=5,
            do_sample=False,
            logits_processor=LogitsProcessorList([EndRowZeroEarly(eos)]),
        )
    assert out[0, 2].item() == eos
    run = rs.open_run(tmp_path / "run")
    rows = run.sql(
        "SELECT seq_id, count(*) AS n, max(pos) AS last FROM tokens WHERE stack = 'decoder' GROUP BY seq_id ORDER BY seq_id"
    )
    # row 0 is fed its start token, one token and the end-of-text; the pads after it are not
    # model work. Row 1 is fed every token but the last generated one.
    assert rows.n.tolist() == [3, out.shape[1] - 1]
    assert run.sql("SELECT count(*) AS n FROM tokens WHERE stack = 'encoder'").n[0] == int(mask.sum())

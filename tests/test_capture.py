"""Capture core: what rs.record writes equals what the routers decided, token by token."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch

import routescope as rs
from routescope.capture.recording.recorder import RunExistsError

EXACT_TYPES = [
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v3",
    "gpt_oss",
    "granitemoe",
    "phimoe",
    "llama4",
    "jamba",
    "qwen3_next",
    "glm4_moe",
    "ernie4_5_moe",
]


class IndependentCapture:
    """The test's own record of router decisions: hooks it finds and adds itself."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.handles = []
        for name, module in model.named_modules():
            layer = re.search(r"layers\.(\d+)\.", name + ".")
            if layer is None:
                continue
            layer = int(layer.group(1))
            if type(module).__name__ == "Llama4Router":
                self.handles.append(module.register_forward_hook(self._llama4(layer)))
            elif type(module).__name__.endswith("Experts") and hasattr(module, "down_proj"):
                self.handles.append(module.register_forward_pre_hook(self._experts(layer)))

    def _experts(self, layer):
        def hook(module, args):
            if len(args) < 3:  # Llama 4's experts get pre-scaled inputs only; its router hook records
                return
            self.calls.append((layer, args[1].clone(), args[2].clone()))

        return hook

    def _llama4(self, layer):
        def hook(module, args, output):
            scores, logits = output
            idx = torch.topk(logits, module.top_k, dim=1).indices
            self.calls.append((layer, idx, torch.gather(scores, 1, idx)))

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def expected_rows(calls, masks, seq_offsets, pasts) -> pd.DataFrame:
    """Rows (seq_id, pos, layer, slot, expert, weight) from independently captured calls.

    `calls` is grouped by forward: one list of (layer, idx, w) per forward.
    """
    rows = []
    for forward_calls, mask, seq0, past in zip(calls, masks, seq_offsets, pasts, strict=True):
        batch, seq_len = mask.shape[0], mask.shape[1] - past
        pos = (mask.long().cumsum(1) - 1)[:, past:]
        valid = mask[:, past:].bool()
        for layer, idx, w in forward_calls:
            idx = idx.reshape(batch, seq_len, -1)
            w = w.reshape(batch, seq_len, -1)
            for b in range(batch):
                for s in range(seq_len):
                    if not valid[b, s]:
                        continue
                    for slot in range(idx.shape[-1]):
                        rows.append(
                            (
                                seq0 + b,
                                int(pos[b, s]),
                                layer,
                                slot,
                                int(idx[b, s, slot]),
                                float(w[b, s, slot]),
                            )
                        )
    df = pd.DataFrame(rows, columns=["seq_id", "pos", "layer", "slot", "expert", "weight"])
    return df.sort_values(["seq_id", "pos", "layer", "slot"]).reset_index(drop=True)


def recorded_rows(run: rs.Run) -> pd.DataFrame:
    df = run.sql(
        "SELECT seq_id, pos, layer, slot, expert, weight FROM routing ORDER BY seq_id, pos, layer, slot"
    )
    return df.astype(
        {"seq_id": "int64", "pos": "int64", "layer": "int64", "slot": "int64", "expert": "int64"}
    )


def padded_batch(device, padding_side: str, lengths=(6, 3), vocab=100, seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), width), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        if padding_side == "left":
            mask[row, width - n :] = 1
        else:
            mask[row, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return ids.to(device), mask.to(device)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", EXACT_TYPES)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_recorded_decisions_equal_router_output(model_type, padding_side, tiny_model, tmp_path, device):
    model = tiny_model(model_type)
    ids, mask = padded_batch(device, padding_side)
    capture = IndependentCapture(model)
    try:
        with rs.record(model, tmp_path / "run") as rec, torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
            first = list(capture.calls)
            capture.calls.clear()
            model(input_ids=ids[:1], attention_mask=mask[:1])
            second = list(capture.calls)
    finally:
        capture.remove()
    assert rec.steps == 2
    run = rs.open_run(tmp_path / "run")
    want = expected_rows([first, second], [mask.cpu(), mask[:1].cpu()], [0, 2], [0, 0])
    got = recorded_rows(run)
    assert len(got) == len(want) > 0
    pd.testing.assert_frame_equal(got[want.columns[:5]], want[want.columns[:5]], check_dtype=False)
    # weights are stored as float32: exactly what the model applied, after the cast
    np.testing.assert_array_equal(got.weight.to_numpy(np.float32), want.weight.to_numpy(np.float32))

    # exactly k rows per recorded token per MoE layer, and no padding token
    manifest = run.manifest
    counts = run.sql("SELECT seq_id, pos, layer, count(*) AS n FROM routing GROUP BY ALL")
    for layer in manifest["moe_layers"]:
        assert (counts[counts.layer == layer].n == manifest["top_k"][str(layer)]).all()
    tokens = run.sql("SELECT count(*) AS n FROM tokens").n[0]
    assert tokens == int(mask.sum()) + int(mask[:1].sum()) == manifest["tokens"]
    assert counts.groupby("layer").size().to_dict() == {layer: tokens for layer in manifest["moe_layers"]}
    assert manifest["complete"] is True


def test_dense_layers_keep_their_decoder_index(tiny_model, tmp_path, device):
    model = tiny_model("deepseek_v3")  # first_k_dense_replace=1: layer 0 is dense
    ids, mask = padded_batch(device, "right")
    with rs.record(model, tmp_path / "run"):
        model(input_ids=ids, attention_mask=mask)
    run = rs.open_run(tmp_path / "run")
    assert run.manifest["moe_layers"] == [1, 2]
    assert run.manifest["num_hidden_layers"] == 3
    assert sorted(run.sql("SELECT DISTINCT layer FROM routing").layer) == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3", "llama4"])
def test_generate_records_prefill_and_decode(model_type, tiny_model, tmp_path, device):
    model = tiny_model(model_type)
    ids, mask = padded_batch(device, "left", lengths=(5, 3))
    capture = IndependentCapture(model)
    try:
        with rs.record(model, tmp_path / "run", labels={"domain": "code"}):
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0
            )
    finally:
        capture.remove()
    run = rs.open_run(tmp_path / "run")
    tokens = run.sql("SELECT * FROM tokens ORDER BY seq_id, pos")
    new = out.shape[1] - ids.shape[1]
    assert new == 5
    # every sequence: positions 0..len+new-2 (the last generated token is never fed back)
    for seq_id, length in zip([0, 1], [5, 3], strict=True):
        seq = tokens[tokens.seq_id == seq_id]
        assert seq.pos.tolist() == list(range(length + new - 1))
        assert (seq.phase.iloc[:length] == "prefill").all()
        assert (seq.phase.iloc[length:] == "decode").all()
        assert (seq.domain == "code").all()
        fed = out[seq_id][out[seq_id] != 0].tolist() if seq_id == 1 else out[seq_id].tolist()
        assert seq.token_id.tolist() == fed[: len(seq)]
    assert tokens.step.max() == new - 1
    # decode rows equal the routers' decode-step decisions
    per_step = [
        [c for c in capture.calls[i : i + len(run.moe_layers)]]
        for i in range(0, len(capture.calls), len(run.moe_layers))
    ]
    assert len(per_step) == new
    full_mask = torch.cat([mask.cpu(), torch.ones(2, new - 1, dtype=mask.dtype)], dim=1)
    masks = [mask.cpu()] + [full_mask[:, : ids.shape[1] + i] for i in range(1, new)]
    pasts = [0] + [ids.shape[1] + i - 1 for i in range(1, new)]
    want = expected_rows(per_step, masks, [0] * new, pasts)
    got = recorded_rows(run)
    pd.testing.assert_frame_equal(got[want.columns[:5]], want[want.columns[:5]], check_dtype=False)


def test_labels_switch_between_forwards(tiny_model, tmp_path, device):
    model = tiny_model("mixtral")
    ids, mask = padded_batch(device, "right")
    with rs.record(model, tmp_path / "run", labels={"domain": "code"}) as rec:
        model(input_ids=ids, attention_mask=mask)
        rec.set_labels(domain="math", source="gen")
        model(input_ids=ids, attention_mask=mask)
    run = rs.open_run(tmp_path / "run")
    assert run.manifest["labels"] == ["domain", "source"]
    df = run.sql("SELECT step, domain, source, count(*) AS n FROM tokens GROUP BY ALL ORDER BY step")
    assert df.domain.tolist() == ["code", "math"]
    assert pd.isna(df.source[0]) and df.source[1] == "gen"
    assert run.sql("SELECT count(*) AS n FROM tokens WHERE domain = 'math'").n[0] == int(mask.sum())


def test_router_stats_tables(tiny_model, tmp_path, device):
    model = tiny_model("mixtral")
    ids, mask = padded_batch(device, "left")
    with rs.record(model, tmp_path / "run", router_stats=True), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    run = rs.open_run(tmp_path / "run")
    stats = run.sql("SELECT layer, expert, prob_sum, tokens FROM router_stats ORDER BY layer, expert")
    valid = mask.reshape(-1).bool().cpu()
    for layer, logits in enumerate(out.router_logits):
        probs = torch.softmax(logits.float().cpu(), -1)[valid]
        got = stats[stats.layer == layer]
        np.testing.assert_allclose(got.prob_sum, probs.sum(0).double().numpy(), rtol=1e-5)
    per_token = run.sql("SELECT * FROM router_tokens")
    assert len(per_token) == int(mask.sum()) * 2
    assert per_token.entropy.between(0, 1.0001).all() and per_token.margin.between(0, 1).all()
    assert stats.groupby("layer").tokens.sum().tolist() == [int(mask.sum()) * 2] * 2


def test_dense_model_is_unsupported(tmp_path):
    from tests.tiny_models import build_tiny_model

    model = build_tiny_model("llama")
    with pytest.raises(rs.UnsupportedModelError, match="llama"):
        rs.record(model, tmp_path / "run").__enter__()
    assert not (tmp_path / "run").exists()
    assert isinstance(rs.UnsupportedModelError("x"), ValueError)


@pytest.mark.slow
def test_existing_run_is_refused_then_overwritten_or_appended(tiny_model, tmp_path, device):
    model = tiny_model("mixtral")
    ids, mask = padded_batch(device, "right")
    with rs.record(model, tmp_path / "run"):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(RunExistsError, match="already holds a routescope run"):
        with rs.record(model, tmp_path / "run"):
            model(input_ids=ids, attention_mask=mask)
    first = rs.open_run(tmp_path / "run")
    assert first.manifest["tokens"] == int(mask.sum()) and first.complete  # nothing lost
    with rs.record(model, tmp_path / "run", mode="append"):
        model(input_ids=ids, attention_mask=mask)
    appended = rs.open_run(tmp_path / "run")
    assert appended.manifest["tokens"] == 2 * int(mask.sum())
    assert appended.sql("SELECT count(DISTINCT seq_id) AS n FROM tokens").n[0] == 4
    assert appended.sql("SELECT max(step) AS s FROM tokens").s[0] == 1
    with rs.record(model, tmp_path / "run", mode="overwrite"):
        model(input_ids=ids[:1], attention_mask=mask[:1])
    assert rs.open_run(tmp_path / "run").manifest["tokens"] == int(mask[:1].sum())


@pytest.mark.parametrize("name", ["seq_id", "layer", "pos", "token_id", "phase", "rank", "bad name"])
def test_reserved_label_names_are_refused(name, tiny_model, tmp_path):
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="label name"):
        rs.record(model, tmp_path / "run", labels={name: "x"})
    with rs.record(model, tmp_path / "ok") as rec, pytest.raises(ValueError, match="label name"):
        rec.set_labels(**{name: "x"})


def test_exception_inside_block_keeps_recorded_steps(tiny_model, tmp_path, device):
    model = tiny_model("mixtral")
    ids, mask = padded_batch(device, "right")
    with pytest.raises(KeyboardInterrupt), rs.record(model, tmp_path / "run"):
        model(input_ids=ids, attention_mask=mask)
        raise KeyboardInterrupt
    run = rs.open_run(tmp_path / "run")
    assert run.complete is False
    assert run.manifest["tokens"] == int(mask.sum())
    assert len(run.sql("SELECT * FROM routing")) == int(mask.sum()) * 2 * 2
    # the model still works without hooks
    model(input_ids=ids, attention_mask=mask)


@pytest.mark.slow
def test_weights_can_be_dropped(tiny_model, tmp_path, device):
    model = tiny_model("mixtral")
    ids, mask = padded_batch(device, "right")
    with rs.record(model, tmp_path / "run", weights=False):
        model(input_ids=ids, attention_mask=mask)
    run = rs.open_run(tmp_path / "run")
    assert "weight" not in run.sql("SELECT * FROM routing LIMIT 1").columns
    assert run.manifest["weights_recorded"] is False


def test_open_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        rs.open_run(tmp_path / "missing")
    (tmp_path / "notarun").mkdir()
    with pytest.raises(rs.RunFormatError, match="manifest.json"):
        rs.open_run(tmp_path / "notarun")

"""rs.watch's losses are the ones the model trains on (issue 34 item 3, SPEC 4.1).

`routing/aux_loss` is transformers' `load_balancing_loss_func` of each forward, averaged over
the forwards of a log window: it equals what TRL's SFTTrainer logs as `aux_loss` (with
gradient accumulation and padding), and it equals the routers' own logits taken by the
test's hooks under bf16 autocast too (the sums run in float32, not bf16). The reference
numbers come from those hooks and from transformers' function, never from routescope.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

import routescope as rs
from tests.test_training import (
    LAYERS,
    MODEL,
    RouterTap,
    assert_close,
    dataset,
    expected,
    gini_by_pairs,
    train_logs,
)
from tests.tiny_models import build_tiny_model

pytestmark = pytest.mark.filterwarnings("ignore")


def batches(n_batches: int, rows: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    data = dataset(n_batches * rows, seed=seed)
    return [
        {k: torch.stack([r[k] for r in data[i : i + rows]]) for k in data[0]}
        for i in range(0, n_batches * rows, rows)
    ]


@pytest.mark.slow
def test_bf16_autocast_gives_the_float32_numbers_of_the_routers_own_logits():
    """Under bf16 autocast the router's logits are bf16; the scalars are those logits' numbers
    in float32 (the reference works in float64 on the same logits), not a bf16 matmul's."""
    torch.manual_seed(0)
    model = build_tiny_model(MODEL).train()
    tap = RouterTap(model)
    got = []
    try:
        with rs.watch(model) as watch:
            for _ in range(2):  # two windows of two forwards (equal-size micro-batches)
                for batch in batches(2, seed=len(got)):
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        loss = model(**batch).loss
                    loss.backward()
                got.append(watch.end_step())
    finally:
        tap.remove()
    assert tap.forwards[0][LAYERS[0]][0].dtype == torch.float64  # the tap's copy
    assert len(tap.forwards) == 4
    for values, window in zip(got, (tap.forwards[:2], tap.forwards[2:]), strict=True):
        assert_close(values, expected(window))
        # the per-forward mean is not the pooled value (the old routing/aux_loss)
        assert values["routing/aux_loss"] != pytest.approx(values["routing/aux_loss_pooled"], rel=1e-6)


@pytest.mark.slow
def test_brief_detail_logs_model_aggregates_only_and_alerts_still_see_layers(tmp_path):
    model = build_tiny_model(MODEL).train()
    tap = RouterTap(model)
    try:
        with rs.watch(model, detail="brief", alerts=rs.training.AlertRules(max_violation=0.0)) as watch:
            for batch in batches(2):
                model(**batch).loss.backward()
            values = watch.end_step()
    finally:
        tap.remove()
    assert values and not [k for k in values if "/layer_" in k]
    assert_close(values, expected(tap.forwards, detail="brief"))
    assert {a["layer"] for a in watch.alerts.raised} == set(LAYERS)  # rules read every layer
    with pytest.raises(ValueError, match="brief"):
        rs.watch(model, detail="all")


@pytest.mark.slow
def test_gini_of_expert_loads():
    from routescope.analysis.balance_frames import gini

    assert gini(np.array([5.0, 5.0, 5.0, 5.0])) == 0.0
    assert gini(np.array([0.0, 0.0, 0.0, 8.0])) == pytest.approx(0.75)  # (E-1)/E: one expert
    rng = np.random.default_rng(0)
    for _ in range(20):
        loads = rng.integers(0, 50, size=int(rng.integers(2, 40))).astype(float)
        if loads.sum():
            assert gini(loads) == pytest.approx(gini_by_pairs(loads), rel=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_aux_loss_equals_trl_sft_trainers_logged_aux_loss(tmp_path, bf16):
    """SFTTrainer with the model's own aux loss (output_router_logits), padding and gradient
    accumulation: routing/aux_loss is what TRL logs as aux_loss (the mean over the micro-batches
    of the window of each forward's load_balancing_loss_func)."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = rs.bundled.model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path).train()
    lines = [line for line in rs.bundled.corpus_path().read_text().splitlines() if line.strip()][:16]
    lines = [line[: 30 + 25 * (i % 3)] for i, line in enumerate(lines)]  # unequal lengths: padding
    config = trl.SFTConfig(
        str(tmp_path / "sft"),
        max_length=64,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=bf16,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_dict({"text": lines}), processing_class=tokenizer
    )
    assert trainer.aux_loss_enabled  # the model adds its aux loss: TRL logs it
    layers = [site.layer for site in rs.find_routers(model)]
    num_experts, top_k = model.config.num_experts, model.config.num_experts_per_tok
    tap = RouterTap(model, step_of=lambda: trainer.state.global_step + 1, layers=layers)
    rs.watch(trainer)
    try:
        trainer.train()
    finally:
        tap.remove()
    logs = train_logs(trainer)
    assert [h["step"] for h in logs] == [1, 2]
    padded = [f for f in tap.forwards if not bool(f["mask"].all())]
    assert padded, "the test needs padded micro-batches"
    for log in logs:
        window = [f for f in tap.forwards if f["step"] == log["step"]]
        assert len(window) == 2  # two micro-batches per optimizer step
        per_forward = [
            float(
                load_balancing_loss_func(
                    tuple(f[layer][0] for layer in layers), num_experts, top_k, f["mask"]
                )
            )
            for f in window
        ]
        assert log["routing/aux_loss"] == pytest.approx(np.mean(per_forward), rel=1e-6)
        # TRL computes its number in the autocast dtype (bf16 softmax); routescope in float32
        assert log["routing/aux_loss"] == pytest.approx(log["aux_loss"], rel=2e-4 if bf16 else 1e-6)
        assert log["routing/aux_loss_pooled"] != pytest.approx(log["aux_loss"], rel=1e-4)

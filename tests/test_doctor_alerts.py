"""rs.watch alerts by the doctor's rules (issue 34 item 2): a clean tiny-model training raises
none, an expert dead from step 1 alerts at once, each alert once, and the recorded run's
doctor names the same expert."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainingArguments

import routescope as rs
from routescope.capture.recording.counters import LayerTotals
from routescope.training import AlertRules
from routescope.training.alerts import Alerts
from tests.test_training import dataset
from tests.tiny_models import build_tiny_model

pytestmark = pytest.mark.filterwarnings("ignore")


def tiny(seed: int = 0) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_tiny_model("qwen2_moe", seed=seed).train()


@pytest.mark.slow
def test_a_clean_trainer_run_raises_no_alert(tmp_path, caplog):
    model = tiny()
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=12,
        logging_steps=1,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset(48))
    with caplog.at_level("WARNING", logger="routescope"):
        watch = rs.watch(trainer)
        trainer.train()
    logs = [h for h in trainer.state.log_history if "routing/tokens" in h]
    assert len(logs) == 12  # every log was judged
    assert watch.alerts.raised == []
    assert not [r for r in caplog.records if "train step" in r.getMessage()]


@pytest.mark.slow
def test_an_expert_dead_from_step_one_alerts_once(tmp_path, caplog):
    model = tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rows = dataset(24)
    with caplog.at_level("WARNING", logger="routescope"):
        with rs.ban_experts(model, {1: [2]}), rs.watch(model, out_dir=tmp_path / "run") as watch:
            for step in range(6):
                batch = {k: torch.stack([r[k] for r in rows[4 * step : 4 * step + 4]]) for k in rows[0]}
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                watch.end_step()
    dead = [a for a in watch.alerts.raised if a["kind"] == "dead_expert"]
    assert [(a["layer"], a["expert"], a["train_step"]) for a in dead] == [(1, 2, 1)]  # at step 1, once
    assert "probability" in dead[0]["text"] and dead[0]["severity"] == "critical"
    messages = [r.getMessage() for r in caplog.records if "dead_expert" in r.getMessage()]
    assert len(messages) == 1 and messages[0].startswith(
        "routescope: layer 1 at train step 1: dead_expert expert 2"
    )
    with rs.open_run(tmp_path / "run") as run:
        assert [
            (a["layer"], a["expert"])
            for a in run.manifest["training"]["alerts"]
            if a["kind"] == "dead_expert"
        ] == [(1, 2)]
        found = run.doctor()
    dead_rows = found[(found["finding"] == "dead_expert") & (found["severity"] != "ok")]
    assert list(zip(dead_rows["layer"], dead_rows["expert"])) == [(1, 2)]  # the same rules, the same expert


def totals(layer: int, counts, top_k: int = 2) -> LayerTotals:
    counts = np.asarray(counts, dtype=np.float64)
    return LayerTotals(layer, len(counts), top_k, counts, counts.sum() / top_k, None, None, 0.0)


def test_evidence_accumulates_across_small_windows():
    """An expert missed in windows too small to tell alerts once the tokens since the start are
    enough; uniform windows never alert, however many."""
    alerts = Alerts(AlertRules(), "routing")
    rng = np.random.default_rng(0)
    for step in range(1, 200):  # 200 small uniform windows: no alert
        picks = np.array([rng.choice(8, 2, replace=False) for _ in range(6)]).reshape(-1)
        assert alerts.check({}, step, [totals(0, np.bincount(picks, minlength=8))]) == []
    quiet = Alerts(AlertRules(), "routing")
    raised = []
    for step in range(1, 40):
        window = np.array([2, 2, 2, 2, 2, 2, 0, 0], dtype=float)  # 6 tokens, experts 6 and 7 missed
        raised += quiet.check({}, step, [totals(0, window)])
    first = {a["expert"]: a["train_step"] for a in raised if a["kind"] == "dead_expert"}
    assert set(first) == {6, 7} and min(first.values()) > 1  # not from one window of 6 tokens
    assert len(raised) == len({(a["layer"], a["expert"], a["kind"]) for a in raised})  # each once

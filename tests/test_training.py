"""rs.watch on a real transformers Trainer and in a custom loop (issue 23).

The reference for every scalar is the routers' own outputs, taken by the test's own forward
hooks on the router modules (logits and chosen ids) and the model's attention mask, turned
into numbers with numpy and transformers' `load_balancing_loss_func`. The same scalars are
read back from the TensorBoard event file, and the losses and weights of a watched run equal
those of a run without watch.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainingArguments
from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

import routescope as rs
from routescope.training import AlertRules
from tests.tiny_models import build_tiny_model

pytestmark = pytest.mark.filterwarnings("ignore")

MODEL = "qwen2_moe"
LAYERS = (0, 1)
E, K = 4, 2


def dataset(n: int = 16, seq: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Right-padded rows (every third row has 4 pad positions, label -100 there)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(2, 128, (seq,), generator=g)
        mask = torch.ones(seq, dtype=torch.long)
        if i % 3 == 0:
            mask[-4:], ids[-4:] = 0, 0
        labels = ids.clone()
        labels[mask == 0] = -100
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return rows


class RouterTap:
    """The test's own hooks: per forward, each router's logits and ids, and the mask."""

    def __init__(self, model: torch.nn.Module, step_of=None, layers=LAYERS) -> None:
        self.forwards: list[dict] = []
        self.step_of = step_of
        self.handles = [model.register_forward_pre_hook(self._begin, with_kwargs=True)]
        for layer in layers:
            gate = model.model.layers[layer].mlp.gate
            self.handles.append(gate.register_forward_hook(self._router(layer)))

    def _begin(self, module, args, kwargs) -> None:
        if module.training:
            step = self.step_of() if self.step_of else None
            self.forwards.append({"mask": kwargs["attention_mask"].detach().clone(), "step": step})

    def _router(self, layer: int):
        def hook(module, args, output) -> None:
            if module.training:
                logits, _, indices = output
                self.forwards[-1][layer] = (logits.detach().double().clone(), indices.detach().clone())

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def gini_by_pairs(counts: np.ndarray) -> float:
    """Gini coefficient by its definition: sum_ij |L_i - L_j| / (2 E^2 mean)."""
    return float(np.abs(counts[:, None] - counts[None, :]).sum() / (2 * len(counts) ** 2 * counts.mean()))


def expected(forwards: list[dict], detail: str = "layers") -> dict[str, float]:
    """SPEC 4.1 from the routers' outputs: balance over the pooled tokens of `forwards`; the
    losses per forward (transformers' own load_balancing_loss_func on that forward's logits),
    averaged over the forwards."""
    out: dict[str, float] = {}
    masks = torch.cat([f["mask"].reshape(-1) for f in forwards]).bool()
    z_layers, z_pooled, counts_all, probs_all = [], [], [], []
    for layer in LAYERS:
        logits = torch.cat([f[layer][0] for f in forwards])[masks]
        ids = torch.cat([f[layer][1] for f in forwards])[masks]
        counts = np.bincount(ids.reshape(-1).numpy(), minlength=E).astype(float)
        m = counts.mean()
        share = counts / counts.sum()
        plogp = np.where(share > 0, share * np.log(np.where(share > 0, share, 1)), 0)
        out[f"routing/layer_{layer}/cv"] = math.sqrt(((counts - m) ** 2).mean()) / m
        out[f"routing/layer_{layer}/max_violation"] = (counts.max() - m) / m
        out[f"routing/layer_{layer}/norm_entropy"] = -plogp.sum() / math.log(E)
        out[f"routing/layer_{layer}/dead_fraction"] = float((counts == 0).mean())
        out[f"routing/layer_{layer}/gini"] = gini_by_pairs(counts)
        per_forward_z = [
            float((f[layer][0][f["mask"].reshape(-1).bool()].logsumexp(-1) ** 2).mean()) for f in forwards
        ]
        z = float(np.mean(per_forward_z))
        out[f"routing/layer_{layer}/z_loss"] = z
        out[f"routing/layer_{layer}/aux_loss"] = float(
            np.mean([float(load_balancing_loss_func((f[layer][0],), E, K, f["mask"])) for f in forwards])
        )
        z_layers.append(z)
        z_pooled.append(float((logits.logsumexp(-1) ** 2).mean()))
        counts_all.append(counts)
        probs_all.append(logits.softmax(-1).sum(0).numpy())
    out["routing/z_loss"] = float(np.mean(z_layers))
    out["routing/z_loss_pooled"] = float(np.mean(z_pooled))
    out["routing/aux_loss"] = float(
        np.mean(
            [
                float(load_balancing_loss_func(tuple(f[layer][0] for layer in LAYERS), E, K, f["mask"]))
                for f in forwards
            ]
        )
    )
    tokens = int(masks.sum()) * len(LAYERS)
    out["routing/aux_loss_pooled"] = float(E * np.sum(sum(counts_all) / tokens * sum(probs_all) / tokens))
    for metric in ("cv", "max_violation", "gini"):
        values = [out[f"routing/layer_{layer}/{metric}"] for layer in LAYERS]
        out[f"routing/{metric}_p50"] = float(np.percentile(values, 50))
        out[f"routing/{metric}_p95"] = float(np.percentile(values, 95))
    out["routing/gini_max"] = max(out[f"routing/layer_{layer}/gini"] for layer in LAYERS)
    if detail == "brief":
        out = {k: v for k, v in out.items() if "/layer_" not in k}
    return out


def trainer_for(tmp_path: Path, name: str, **args) -> Trainer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_tiny_model(MODEL).train()
    settings = dict(
        per_device_train_batch_size=4,
        max_steps=3,
        logging_steps=1,
        report_to=["tensorboard"],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    settings.update(args)
    return Trainer(
        model=model, args=TrainingArguments(str(tmp_path / name), **settings), train_dataset=dataset()
    )


def train_logs(trainer: Trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h]


def assert_close(got: dict, want: dict, rel: float = 1e-9) -> None:
    for key, value in want.items():
        assert key in got, f"{key} missing from {sorted(got)}"
        # from the logits: float32 arithmetic (the router's precision; transformers' own
        # load_balancing_loss_func works in float32 too); from the counts: exact
        tolerance = 1e-6 if key.endswith(("aux_loss", "z_loss", "_pooled")) else rel
        assert got[key] == pytest.approx(value, rel=tolerance, abs=1e-12), key


def tensorboard_scalars(output_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = sorted(output_dir.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_trainer_logs_the_routers_own_numbers_in_log_history_and_tensorboard(tmp_path):
    plain = trainer_for(tmp_path, "plain")
    plain.train()

    trainer = trainer_for(tmp_path, "watched")
    tap = RouterTap(trainer.model, step_of=lambda: trainer.state.global_step + 1)
    watch = rs.watch(trainer, out_dir=tmp_path / "run")
    try:
        trainer.train()
    finally:
        tap.remove()
    assert not watch.active  # hooks gone with train()

    logs = train_logs(trainer)
    assert [h["step"] for h in logs] == [1, 2, 3]
    for log in logs:
        assert_close(log, expected([f for f in tap.forwards if f["step"] == log["step"]]))
        assert log["routing/tokens"] == sum(
            int(f["mask"].sum()) for f in tap.forwards if f["step"] == log["step"]
        )
        worst = max(log[f"routing/layer_{layer}/max_violation"] for layer in LAYERS)
        assert log["routing/max_violation_max"] == worst

    # training unchanged: same losses, gradient norms and final weights as without watch
    assert [h["loss"] for h in logs] == [h["loss"] for h in train_logs(plain)]
    assert [h["grad_norm"] for h in logs] == [h["grad_norm"] for h in train_logs(plain)]
    for (name, a), (_, b) in zip(
        trainer.model.named_parameters(), plain.model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name

    # the same numbers in the TensorBoard event file (float32 there)
    board = tensorboard_scalars(tmp_path / "watched")
    for log in logs:
        for key, value in log.items():
            if key.startswith("routing/"):
                assert board[f"train/{key}"][log["step"]] == pytest.approx(value, rel=1e-6), key

    # out_dir: tokens carry the optimizer step; balance per step equals the logged scalars
    with rs.open_run(tmp_path / "run") as run:
        steps = run.sql("SELECT train_step, count(*) AS n FROM tokens GROUP BY 1 ORDER BY 1")
        assert steps["train_step"].tolist() == [1, 2, 3]
        assert str(run.sql("SELECT train_step FROM tokens LIMIT 1")["train_step"].dtype) == "int32"
        assert steps["n"].tolist() == [int(log["routing/tokens"]) for log in logs]
        for log in logs:
            balance = run.balance(where=f"train_step = {log['step']}").set_index("layer")
            for layer in LAYERS:
                for metric in ("cv", "max_violation", "norm_entropy"):
                    got = balance.loc[layer, metric]
                    assert got == pytest.approx(log[f"routing/layer_{layer}/{metric}"], rel=1e-9)
        assert run.manifest["complete"]
        assert "alerts" in run.manifest["training"]


@pytest.mark.slow
def test_gradient_accumulation_pools_every_micro_batch_of_a_logged_step(tmp_path):
    trainer = trainer_for(
        tmp_path,
        "accum",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        logging_steps=2,
        max_steps=4,
    )
    tap = RouterTap(trainer.model, step_of=lambda: trainer.state.global_step + 1)
    rs.watch(trainer, out_dir=tmp_path / "run")
    try:
        trainer.train()
    finally:
        tap.remove()
    logs = train_logs(trainer)
    assert [h["step"] for h in logs] == [2, 4]
    assert len(tap.forwards) == 8  # 4 optimizer steps x 2 micro-batches
    for log in logs:
        window = [f for f in tap.forwards if log["step"] - 2 < f["step"] <= log["step"]]
        assert len(window) == 4
        assert_close(log, expected(window))
    with rs.open_run(tmp_path / "run") as run:
        per_step = run.sql(
            "SELECT train_step, count(DISTINCT step) AS forwards FROM tokens GROUP BY 1 ORDER BY 1"
        )
        assert per_step["train_step"].tolist() == [1, 2, 3, 4]
        assert per_step["forwards"].tolist() == [2, 2, 2, 2]


def test_custom_loop_end_step_returns_the_same_scalars_and_skips_eval(tmp_path):
    model = build_tiny_model(MODEL).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rows = dataset(8)
    batches = [{k: torch.stack([r[k] for r in rows[i : i + 4]]) for k in rows[0]} for i in (0, 4)]
    tap = RouterTap(model)
    got = []
    try:
        with rs.watch(model, out_dir=tmp_path / "run") as watch:
            for batch in batches:
                model.train()
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                model.eval()
                with torch.no_grad():
                    model(**batch)  # evaluation: neither counted nor recorded
                got.append(watch.end_step())
    finally:
        tap.remove()
    assert len(tap.forwards) == 2
    for values, forward in zip(got, tap.forwards, strict=True):
        assert_close(values, expected([forward]))
    assert [h["train_step"] for h in watch.history] == [1, 2]
    with rs.open_run(tmp_path / "run") as run:
        assert run.sql("SELECT DISTINCT train_step FROM tokens ORDER BY 1")["train_step"].tolist() == [1, 2]


def test_alerts_warn_once_and_reach_the_manifest(tmp_path, caplog):
    model = build_tiny_model(MODEL).train()
    batch = {k: torch.stack([r[k] for r in dataset(4)]) for k in dataset(1)[0]}
    with caplog.at_level("WARNING", logger="routescope"):
        with rs.watch(model, out_dir=tmp_path / "run", alerts=AlertRules(max_violation=0.0)) as watch:
            for _ in range(3):
                model(**batch)
                watch.end_step()
    warned = [r for r in caplog.records if "max_violation" in r.getMessage()]
    assert len(warned) == len(LAYERS)  # once per layer, not once per step
    with rs.open_run(tmp_path / "run") as run:
        alerts = run.manifest["training"]["alerts"]
    assert {(a["layer"], a["kind"]) for a in alerts} == {(layer, "max_violation") for layer in LAYERS}


@pytest.mark.slow
def test_trl_sft_trainer_gets_the_scalars_beside_its_own_metrics(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = rs.bundled.model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).train()
    lines = [line for line in rs.bundled.corpus_path().read_text().splitlines() if line.strip()][:16]
    config = trl.SFTConfig(
        str(tmp_path / "sft"),
        max_length=32,
        per_device_train_batch_size=4,
        max_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_dict({"text": lines}), processing_class=tokenizer
    )
    masks: list[int] = []
    handle = model.register_forward_pre_hook(
        lambda m, a, kw: masks.append(int(kw["attention_mask"].sum())) if m.training else None,
        with_kwargs=True,
    )
    rs.watch(trainer)
    try:
        trainer.train()
    finally:
        handle.remove()
    logs = train_logs(trainer)
    assert len(logs) == 2
    layers = [site.layer for site in rs.find_routers(model)]
    for log, tokens in zip(logs, masks, strict=True):
        assert "mean_token_accuracy" in log  # TRL's own metric, merged in its log()
        assert log["routing/tokens"] == tokens
        for layer in layers:
            assert 0.0 <= log[f"routing/layer_{layer}/norm_entropy"] <= 1.0
        assert log["routing/aux_loss"] > 0 and log["routing/z_loss"] > 0


@pytest.mark.slow
def test_two_processes_sum_the_counts_over_ranks(tmp_path):
    """torchrun, gloo, accelerate under the Trainer: each log covers both ranks' tokens."""
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:  # a free port (torchrun's port 0 does not rendezvous)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    worker = Path(__file__).with_name("training_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
    ]
    done = subprocess.run(
        [*command, str(worker), str(tmp_path)], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    forwards = [f for rank in (0, 1) for f in torch.load(tmp_path / f"tap{rank}.pt")]
    logs = [h for h in json.loads((tmp_path / "logs.json").read_text()) if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2]
    for log in logs:
        window = [f for f in forwards if f["step"] == log["step"]]
        assert len(window) == 2  # one micro-batch per rank
        assert_close(log, expected(window))
    with rs.open_run(tmp_path / "run") as run:
        assert run.sql("SELECT DISTINCT rank FROM tokens ORDER BY 1")["rank"].tolist() == [0, 1]
        per_step = run.sql("SELECT train_step, count(*) AS n FROM tokens GROUP BY 1 ORDER BY 1")
        assert per_step["n"].tolist() == [int(log["routing/tokens"]) for log in logs]


@pytest.mark.slow
def test_report_follow_prints_each_new_train_step_of_a_live_run(tmp_path):
    """A run written by a training loop in another thread: --follow prints the steps as they land."""
    import threading

    from routescope.cli import main
    from routescope.commands.follow import follow

    model = build_tiny_model(MODEL).train()
    rows = dataset(12)
    batches = [{k: torch.stack([r[k] for r in rows[i : i + 4]]) for k in rows[0]} for i in (0, 4, 8)]
    step_done = [threading.Event() for _ in batches]
    printed: list[str] = []
    shown_step = threading.Event()

    def emit(line: str) -> None:
        printed.append(line)
        if line.startswith("train_step"):
            shown_step.set()

    def train() -> None:
        with rs.watch(
            model, out_dir=tmp_path / "run", flush_seconds=0.05, alerts=AlertRules(max_violation=0.0)
        ) as w:
            for batch, done in zip(batches, step_done, strict=True):
                model(**batch).loss.backward()
                w.end_step()
                w.recorder.flush()
                done.set()
                shown_step.wait(10)  # the next step lands only once the follower showed this one
                shown_step.clear()

    worker = threading.Thread(target=train)
    worker.start()
    shown = follow(tmp_path / "run", interval=0.05, timeout=60, emit=emit)
    worker.join(30)
    headers = [line.split(":")[0] for line in printed if line.startswith("train_step")]
    assert headers == ["train_step 1", "train_step 2", "train_step 3"] and shown == 3
    assert any(line.startswith("alert: layer 0 max_violation") for line in printed)
    # the command line: on a finished run it prints the last step and returns
    assert main(["report", str(tmp_path / "run"), "--follow", "--interval", "0.01"]) == 0


@pytest.mark.slow
def test_dashboard_follows_a_training_run_and_shows_its_alerts(tmp_path):
    """While rs.watch is still writing: the Time view's steps extend as parts land (no restart)
    and the Overview lists the training alerts from the live manifest."""
    pytest.importorskip("dash")
    import routescope.dashboard.runs as registry_module
    from routescope.dashboard.app import create_app, run_state
    from routescope.dashboard.pages import overview, timeline
    from tests.test_dashboard import texts

    model = build_tiny_model(MODEL).train()
    batch = {k: torch.stack([r[k] for r in dataset(4)]) for k in dataset(1)[0]}
    watch = rs.watch(
        model, out_dir=tmp_path / "run", flush_seconds=3600, alerts=AlertRules(max_violation=0.0)
    )
    before = registry_module._CURRENT
    watch.start()
    try:
        model(**batch).loss.backward()
        watch.end_step()
        watch.recorder.flush()
        create_app([tmp_path / "run"])
        first = run_state("0")[0]
        steps_max = timeline.time_controls(first)[3]
        assert "training: layer 0 at train step 1: max_violation" in texts(overview.update_overview(first)[3])
        for _ in range(2):
            model(**batch).loss.backward()
            watch.end_step()
        watch.recorder.flush()
        later = run_state("0")[0]
        assert later["version"] != first["version"]
        assert timeline.time_controls(later)[3] == steps_max + 2 == 3  # optimizer steps 1..3
        heat, balance = timeline.update_time(later, "all", None, None, None, "all", 0, "lift")[:2]
        assert heat.layout.xaxis.title.text == "optimizer step (binned)"
        assert list(balance.data[0].x) == [1, 2, 3]
    finally:
        watch.stop()
        registry_module._CURRENT = before


def test_recording_options_without_out_dir_are_refused():
    model = build_tiny_model(MODEL)
    with pytest.raises(ValueError, match="need out_dir"):
        rs.watch(model, sample=0.1)
    with pytest.raises(TypeError, match="Trainer"):
        rs.watch(object())


def test_a_loop_that_never_calls_train_still_counts_its_training_forwards(tmp_path):
    """from_pretrained loads in eval mode: forwards with gradients on are training forwards."""
    model = build_tiny_model(MODEL)  # eval mode
    batch = {k: torch.stack([r[k] for r in dataset(4)]) for k in dataset(1)[0]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "router calls outside a forward" warning either
        with rs.watch(model, out_dir=tmp_path / "run") as watch:
            model(**batch).loss.backward()
            values = watch.end_step()
            with torch.no_grad():
                model(**batch)  # evaluation: not counted, not recorded
            assert watch.end_step() == {}  # nothing counted since the previous read
    assert values["routing/tokens"] == int(batch["attention_mask"].sum())
    with rs.open_run(tmp_path / "run") as run:
        assert run.manifest["tokens"] == values["routing/tokens"]


def test_a_rising_dead_fraction_warns_once_per_layer(caplog):
    from routescope.training.alerts import Alerts

    alerts = Alerts(AlertRules(dead_rise=1e-9), "routing")
    key = "routing/layer_{}/dead_fraction"
    with caplog.at_level("WARNING", logger="routescope"):
        assert alerts.check({key.format(0): 0.0, key.format(1): 0.25}, 1) == []  # the baselines
        assert alerts.check({key.format(0): 0.0, key.format(1): 0.25}, 2) == []  # no rise
        raised = alerts.check({key.format(0): 0.25, key.format(1): 0.25}, 3)
        assert alerts.check({key.format(0): 0.5, key.format(1): 0.25}, 4) == []  # already said
    assert [(a["layer"], a["kind"], a["reference"], a["train_step"]) for a in raised] == [
        (0, "dead_fraction_rise", 0.0, 3)
    ]
    assert [r.getMessage() for r in caplog.records] == [
        "routescope: layer 0 at train step 3: dead fraction rose from 0.000 to 0.250"
    ]

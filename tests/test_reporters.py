"""The routing scalars reach every reporter a Trainer writes to (issue 34 item 5).

rs.watch adds its scalars to the Trainer's logs before the reporting callbacks run, so each
reporter should hold exactly the numbers of `trainer.state.log_history`. Each test trains
a tiny model with one reporter and reads the numbers back with that tool's own reader:
MLflow's local file store (MlflowClient) and W&B's offline run file (its transaction log,
decoded with W&B's own protobuf `Record`). TensorBoard's event file is read back the same
way in tests/test_training.py.
A reporter that is not installed skips its test with the extra to install.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

import routescope as rs
from tests.test_training import train_logs, trainer_for

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]


def routing_logs(trainer) -> dict[int, dict[str, float]]:
    """step -> the routing scalars of that training log (the reference: log_history)."""
    logs = {h["step"]: {k: v for k, v in h.items() if k.startswith("routing/")} for h in train_logs(trainer)}
    assert list(logs) == [1, 2] and all(len(v) > 20 for v in logs.values())
    assert any("/layer_" in key for key in logs[1])  # detail="layers": per-layer keys too
    return logs


def watched_training(tmp_path: Path, reporter: str):
    trainer = trainer_for(tmp_path, reporter, report_to=[reporter], max_steps=2)
    rs.watch(trainer)
    trainer.train()
    return trainer


def test_mlflow_file_store_holds_the_routing_scalars(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="pip install 'routescope[mlflow]'")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "routescope-test")
    trainer = watched_training(tmp_path, "mlflow")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("routescope-test")
    (run,) = client.search_runs([experiment.experiment_id])
    for step, values in routing_logs(trainer).items():
        for key, value in values.items():
            history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
            assert history[step] == pytest.approx(value, rel=1e-12), key


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of a W&B run file. The file is W&B's transaction log: a 7-byte
    header (':W&B', magic 0xBEE1, version), then LevelDB-log records (crc32c, length, type;
    full / first / middle / last pieces, never across a 32 KiB block) each holding a
    serialized `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full, first
            pending = chunk
        elif kind in (3, 4):  # middle, last
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                items = record.history.item  # wandb-core writes the key as nested_key parts
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
                )
    return rows


def test_wandb_offline_run_file_holds_the_routing_scalars(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="pip install 'routescope[wandb]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    try:
        trainer = watched_training(tmp_path, "wandb")
    finally:
        wandb.finish()  # flush the run file
    (run_file,) = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    rows = {row["train/global_step"]: row for row in wandb_history(run_file) if "train/loss" in row}
    for step, values in routing_logs(trainer).items():
        for key, value in values.items():  # JSON in the file: the exact float64
            assert rows[step][f"train/{key}"] == value, key

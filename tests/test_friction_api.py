"""Issue 38, items 4, 7 and 11 (API side): what a new user tripped on in the Python API.

Real tiny models, real runs; each test names the item it covers.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

import routescope as rs


@pytest.mark.slow
def test_alert_rules_is_public_and_lazy() -> None:
    """Item 4: rs.AlertRules and `from routescope import AlertRules`; importing routescope alone
    still does not import torch (AlertRules is lazy, like rs.watch)."""
    from routescope import AlertRules
    from routescope.training.alerts import AlertRules as defined

    assert rs.AlertRules is defined and AlertRules is defined
    assert rs.AlertRules(max_violation=2.0).max_violation == 2.0
    assert "AlertRules" in rs.__all__ and "AlertRules" in dir(rs)
    code = "import sys, routescope as rs; rs.open_run; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_no_cache_deprecation_warning_under_recording(tiny_model, tmp_path, caplog) -> None:
    """Item 7: a use_cache=False forward under rs.record logs no `past_key_values`/`cache_params`
    deprecation warning (transformers' warning_once cache is cleared so an earlier one cannot hide it)."""
    logging.Logger.warning_once.cache_clear()
    model = tiny_model("qwen2_moe")
    ids = torch.randint(1, 100, (2, 6))
    logger = logging.getLogger("transformers")  # does not propagate to the root logger
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="transformers"):
            with rs.record(model, tmp_path / "run"):
                model(input_ids=ids, use_cache=False)
                model(input_ids=ids, use_cache=True)
    finally:
        logger.removeHandler(caplog.handler)
    deprecated = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert deprecated == []
    assert rs.open_run(tmp_path / "run").manifest["tokens"] == 24


def test_end_step_returns_its_train_step(tiny_model) -> None:
    """Item 11: the dict end_step() returns names the optimizer step it closed."""
    model = tiny_model("qwen2_moe").train()
    ids = torch.randint(1, 100, (2, 5))
    with rs.watch(model) as watch:
        got = []
        for _ in range(2):
            model(input_ids=ids)
            got.append(watch.end_step())
        assert watch.end_step() == {}  # nothing counted since the previous read
    assert [g["train_step"] for g in got] == [1, 2]
    assert all(g["routing/tokens"] == 10 for g in got)
    assert [h["train_step"] for h in watch.history] == [1, 2]


def test_replayer_rules_print_short(tiny_model, tmp_path) -> None:
    """Item 11: replayer.rules reads as one short WeightRule('name') per layer, not a function repr."""
    model = tiny_model("qwen2_moe")
    ids = torch.randint(1, 100, (2, 5))
    with rs.record(model, tmp_path / "run"), torch.no_grad():
        model(input_ids=ids)
    with rs.replay(model, tmp_path / "run", weights="router") as replayer, torch.no_grad():
        model(input_ids=ids)
    assert replayer.rules, "weights='router' found no rule"
    text = repr(replayer.rules)
    assert "function" not in text and "<" not in text
    assert all(repr(rule) == f"WeightRule({rule.name!r})" for rule in replayer.rules.values())


def test_import_sglang_help_describes_every_input(capsys) -> None:
    """Item 11: `import sglang --help` names .pt dumps, the .csv layout and server responses."""
    from routescope.cli import main

    assert main(["import", "sglang", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for needle in (".pt", ".csv", ".jsonl", "server responses", "--model", "per_token", "stat"):
        assert needle in text, needle


@pytest.mark.slow
def test_watch_flush_seconds_makes_steps_visible_while_training(tiny_model, tmp_path) -> None:
    """Item 8: rs.watch(..., out_dir=, flush_seconds=) is the writer's flush interval, so a
    reader (`report --follow`, the dashboard) sees each step soon after it ends."""
    import time

    model = tiny_model("qwen2_moe").train()
    ids = torch.randint(1, 100, (2, 5))
    out = tmp_path / "run"
    with rs.watch(model, out_dir=out, flush_seconds=0.2) as watch:
        model(input_ids=ids)
        watch.end_step()
        model(input_ids=ids)  # a forward of step 2: the step-1 tokens are finished
        deadline = time.monotonic() + 5  # well under the default flush_seconds (10 s)
        seen: list[int] = []
        while time.monotonic() < deadline and 1 not in seen:
            time.sleep(0.1)
            try:
                with rs.open_run(out) as run:
                    seen = run.sql("SELECT DISTINCT train_step FROM tokens")["train_step"].tolist()
            except (FileNotFoundError, rs.RunFormatError):
                continue
        assert 1 in seen, "step 1 was not flushed while the block ran"
        assert watch.recorder is not None and watch.recorder.options.flush_seconds == 0.2
        watch.end_step()


def test_follow_help_says_it_follows_the_writers_flush(capsys) -> None:
    """Item 8: `report --help` says --follow sees what the writer flushed, and how to set it."""
    from routescope.cli import main

    assert main(["report", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "flush_seconds" in text and "--flush-seconds" in text and "--interval" in text
    assert main(["profile", "--help"]) == 0
    assert "--flush-seconds" in capsys.readouterr().out

"""Issue 38, items 4, 7 and 11 (API side): what a new user tripped on in the Python API.

Real tiny models, real runs; each test names the item it covers.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import torch

import routescope as rs


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

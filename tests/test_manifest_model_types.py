"""The manifest names a multimodal wrapper by its own model type and adds its text model's
(issue 26, item 14: Kimi K2.6 `kimi_k25` records a `deepseek_v3` text model)."""

from __future__ import annotations

import warnings

import pytest
import torch

import routescope as rs
from tests.tiny_models import build_tiny_model, build_tiny_multimodal_model


@pytest.mark.parametrize(("wrapper", "text"), [("kimi_k25", "deepseek_v3")])
def test_wrapper_model_type_is_kept_and_the_text_model_type_added(wrapper, text, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_tiny_multimodal_model(wrapper)
        ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(0))
        with rs.record(model, tmp_path / "run"), torch.no_grad():
            model(input_ids=ids)
    with rs.open_run(tmp_path / "run") as run:
        assert run.manifest["model_type"] == wrapper
        assert run.manifest["text_model_type"] == text
        assert run.token_count() == 12 and run.manifest["versions"]["routescope"] == rs.__version__


def test_a_text_model_has_no_text_model_type(tmp_path):
    model = build_tiny_model("qwen3_moe")
    with rs.record(model, tmp_path / "run"), torch.no_grad():
        model(input_ids=torch.randint(1, 100, (1, 4)))
    with rs.open_run(tmp_path / "run") as run:
        assert run.manifest["model_type"] == "qwen3_moe" and "text_model_type" not in run.manifest

"""Shared fixtures: tiny MoE models built from configs (no downloads) and a hook-leak guard."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from torch import nn

from routescope.capture.recording.wraps import is_wrapped
from tests.tiny_models import build_tiny_model

# Tiny models: a second intra-op thread costs more than it gains, and on a shared 2-core
# machine it can make forwards many times slower.
torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="device for model tests, e.g. cuda")


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.config.getoption("--device"))


def _is_routescope(hook: object) -> bool:
    func = getattr(hook, "__func__", hook)
    return getattr(func, "__module__", "").startswith("routescope")


def _hook_count(module: nn.Module) -> int:
    """routescope hooks and forward wraps still on any submodule (transformers keeps hooks of
    its own)."""
    return sum(
        _is_routescope(hook)
        for m in module.modules()
        for hook in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
    ) + sum(is_wrapped(m) for m in module.modules())


_LIVE_MODELS: list[nn.Module] = []


@pytest.fixture(scope="session")
def spark():
    """One local Spark session for every test that asks for it (the Spark tests skip first when
    pyspark or Java is missing)."""
    from pyspark.sql import SparkSession

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        session = (
            SparkSession.builder.master("local[2]")
            .appName("routescope-tests")
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.sql.shuffle.partitions", "2")
            .config("spark.sql.execution.arrow.pyspark.enabled", "true")
            .getOrCreate()
        )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture
def tiny_model(device: torch.device):
    """Factory: tiny_model('mixtral', **overrides) -> eval-mode model on the test device."""

    def make(model_type: str, seed: int = 0, **overrides) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_tiny_model(model_type, seed=seed, **overrides).to(device)
        _LIVE_MODELS.append(model)
        return model

    return make


@pytest.fixture(autouse=True)
def no_hooks_left_behind():
    """Every test: no forward hook or pre-hook may remain on any model it built."""
    _LIVE_MODELS.clear()
    yield
    leaked = {type(m).__name__: _hook_count(m) for m in _LIVE_MODELS if _hook_count(m)}
    _LIVE_MODELS.clear()
    gc.collect()
    assert not leaked, f"hooks left behind on {leaked}"

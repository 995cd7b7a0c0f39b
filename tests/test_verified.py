"""The verified table (routescope/capture/verified.json): a model type outside it still records,
warns once and is marked `"verified": false`; a verified one records silently. The table, the
tests that verify it and pyproject's transformers bound say the same thing."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import tomllib
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

import routescope as rs
from routescope.capture.verified import UnverifiedModelWarning, verification, verified_table
from tests.moe_types import installed_moe_types
from tests.test_model_coverage import GAPS
from tests.tiny_models import SEQ2SEQ, build_tiny_model, tiny_config

ROOT = Path(__file__).resolve().parent.parent


class HouseMoeConfig(Qwen3MoeConfig):
    """A custom MoE the way a `trust_remote_code` model arrives: a new model_type."""

    model_type = "house_moe_test"


class HouseMoeForCausalLM(Qwen3MoeForCausalLM):
    config_class = HouseMoeConfig


AutoConfig.register("house_moe_test", HouseMoeConfig)
AutoModelForCausalLM.register(HouseMoeConfig, HouseMoeForCausalLM)


def _record(model: torch.nn.Module, path: Path) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with rs.record(model, path), torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    return [w for w in caught if issubclass(w.category, UnverifiedModelWarning)]


def test_a_verified_type_records_with_no_warning(tmp_path):
    caught = _record(build_tiny_model("qwen3_moe"), tmp_path / "run")
    assert caught == []
    manifest = rs.open_run(tmp_path / "run").manifest
    assert manifest["verified"] is True
    assert "unverified_reason" not in manifest


def test_an_unverified_type_records_warns_once_and_is_marked(tmp_path):
    values = tiny_config("qwen3_moe").to_dict()
    values.pop("model_type", None)
    torch.manual_seed(0)
    model = HouseMoeForCausalLM(HouseMoeConfig(**values)).eval()
    first = _record(model, tmp_path / "a")
    second = _record(model, tmp_path / "b")  # same type, same process: no second warning
    assert len(first) == 1 and second == []
    assert "house_moe_test" in str(first[0].message)
    for name in ("a", "b"):
        run = rs.open_run(tmp_path / name)
        assert run.manifest["verified"] is False
        assert "house_moe_test" in run.manifest["unverified_reason"]
        assert run.manifest["versions"]["transformers"] == transformers.__version__
        # the routing is still there, exactly k rows per token and layer
        counts = run.sql("SELECT count(*) AS n FROM routing GROUP BY seq_id, pos, layer")
        assert (counts.n == 2).all() and len(counts) == 4 * len(run.moe_layers)


def test_a_transformers_version_outside_the_range_is_unverified():
    table = verified_table()["transformers"]
    newest = tuple(int(x) for x in table["newest"].split("."))
    assert verification("qwen3_moe", f"{table['newest']}.3") == (True, "")
    ok, reason = verification("qwen3_moe", f"{newest[0]}.{newest[1] + 1}.0")
    assert not ok and "outside the versions" in reason
    ok, reason = verification("qwen3_moe", "5.0.0")
    assert not ok


@pytest.mark.slow
def test_report_says_unverified(tmp_path, capsys):
    values = tiny_config("qwen3_moe").to_dict()
    values.pop("model_type", None)
    model = HouseMoeForCausalLM(HouseMoeConfig(**values)).eval()
    _record(model, tmp_path / "run")
    from routescope.cli import main

    assert main(["report", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "Unverified" in out and "house_moe_test" in out


def recorded_type(model_type: str) -> str:
    """The model_type of the causal LM the coverage test builds: its text config's
    (llama4 -> llama4_text), which is what `rs.record` sees."""
    config = AutoConfig.for_model(model_type)
    return config.get_text_config().model_type


def _minor(version: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def test_pyproject_bound_ends_just_past_the_newest_verified_minor():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if d.startswith("transformers"))
    lower = re.search(r">=\s*([0-9.]+)", spec).group(1)
    upper = re.search(r"<\s*([0-9.]+)", spec).group(1)
    table = verified_table()["transformers"]
    assert _minor(lower) == _minor(table["oldest"])
    major, minor = _minor(table["newest"])
    assert _minor(upper) == (major, minor + 1), f"pyproject says {spec}; verified up to {table['newest']}"


@pytest.mark.slow
@pytest.mark.skipif(
    _minor(transformers.__version__) != _minor(verified_table()["transformers"]["newest"]),
    reason="the table is compared with the tests on the newest verified transformers only",
)
def test_table_lists_exactly_the_types_the_tests_verify():
    from tests.test_multimodal import MULTIMODAL_GAPS, MULTIMODAL_TYPES

    tested = {recorded_type(t) for t in installed_moe_types() if t not in GAPS}
    tested |= {t for t in MULTIMODAL_TYPES if t not in MULTIMODAL_GAPS}
    tested |= set(SEQ2SEQ)
    listed = set(verified_table()["model_types"])
    assert listed == tested, (
        f"verified.json and the tests disagree: only listed {sorted(listed - tested)}, "
        f"only tested {sorted(tested - listed)} (scripts/check_transformers.py --write-table updates it)"
    )

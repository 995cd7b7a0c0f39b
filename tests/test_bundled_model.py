"""The bundled model (data/model) and sample corpus (data/sample.jsonl): load offline, stay small,
and route by domain above a shuffled-label baseline. Built by scripts/train_model.py."""

from __future__ import annotations

import importlib.util
import json
import platform
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
MODEL_DIR = DATA / "model"
SAMPLE = DATA / "sample.jsonl"
DOMAINS = {"code", "prose", "math", "multilingual"}


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(
        f"_routescope_script_{name}", REPO / "scripts" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def check_structure_module():
    return _load_script("check_structure")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def bundled(offline):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    # One thread: two OpenMP threads crawl when the 2-core box is shared with other work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()
        tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
        yield model, tokenizer
    finally:
        torch.set_num_threads(threads)


def _sample_records() -> list[dict]:
    with SAMPLE.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_bundled_model_loads_offline_and_gives_finite_logits(bundled):
    model, tokenizer = bundled
    assert model.config.model_type == "qwen3_moe"
    assert model.config.num_experts == 16 and model.config.num_experts_per_tok == 2
    assert all(hasattr(layer.mlp, "experts") for layer in model.model.layers)
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) == model.config.vocab_size

    texts = [r["text"] for r in _sample_records()[:3]] + ["12 + 30 = 42"]
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=64)
    assert (batch["attention_mask"] == 0).any()  # the batch really exercises padding
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_tokenizer_round_trips_every_domain(bundled):
    _, tokenizer = bundled
    seen = set()
    for record in _sample_records():
        if record["domain"] in seen:
            continue
        seen.add(record["domain"])
        ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == record["text"]
    assert seen == DOMAINS


def test_data_folder_and_sample_stay_small():
    total = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert total <= 20 * 1024 * 1024, f"data/ is {total} bytes"
    assert SAMPLE.stat().st_size <= 2 * 1024 * 1024
    assert (MODEL_DIR / "model.safetensors").is_file()


def test_sample_records_are_valid_and_cover_four_domains():
    records = _sample_records()
    counts: dict[str, int] = {}
    for record in records:
        assert set(record) == {"text", "domain"}
        assert isinstance(record["text"], str) and record["text"].strip()
        assert isinstance(record["domain"], str)
        counts[record["domain"]] = counts.get(record["domain"], 0) + 1
    assert set(counts) >= DOMAINS
    assert min(counts.values()) >= 50, counts
    assert len({r["text"] for r in records}) == len(records)
    multilingual = "".join(r["text"] for r in records if r["domain"] == "multilingual")
    assert sum(ord(ch) > 0x036F for ch in multilingual) > 0.5 * len(multilingual)  # non-Latin scripts


@pytest.mark.slow
def test_routing_is_specialized_by_domain_above_shuffled_baseline(bundled, check_structure_module):
    model, tokenizer = bundled
    records = check_structure_module.load_records(SAMPLE, per_domain=16)
    report = check_structure_module.check_structure(model, tokenizer, records, seed=0, max_length=128)

    assert set(report.domains) == DOMAINS
    assert all(report.tokens[d] > 500 for d in report.domains)
    assert all(0.0 < report.loss[d] < 8.0 for d in report.domains)
    *_, lift, shuffled = report.best()
    assert lift >= 2.0, report.format()
    assert lift >= shuffled + 0.75, report.format()
    real, base = report.max_lift(), report.max_lift(shuffled=True)
    pairs = [(layer, d) for layer in report.layers for d in report.domains]
    mean_real = sum(real[layer][d][1] for layer, d in pairs) / len(pairs)
    mean_base = sum(base[layer][d][1] for layer, d in pairs) / len(pairs)
    assert mean_real >= mean_base + 0.5, report.format()
    # Lifts are shares x E, so each domain's lifts average to 1 within a layer.
    for by_domain in report.lift.values():
        for lifts in by_domain.values():
            assert sum(lifts) / len(lifts) == pytest.approx(1.0)
    # The check's own hooks are gone.
    assert not any(layer.mlp.experts._forward_pre_hooks for layer in model.model.layers)


@pytest.mark.slow
def test_sample_matches_the_builder_and_is_disjoint_from_training(tmp_path):
    info = json.loads((MODEL_DIR / "training_info.json").read_text(encoding="utf-8"))
    if platform.python_version() != info["python_version"]:
        pytest.skip(f"code/prose come from the Python {info['python_version']} stdlib")
    build = _load_script("build_corpus")
    build.build_corpus(tmp_path / "train.jsonl", tmp_path / "sample.jsonl")
    assert (tmp_path / "sample.jsonl").read_bytes() == SAMPLE.read_bytes()
    with (tmp_path / "train.jsonl").open(encoding="utf-8") as fh:
        train_texts = {json.loads(line)["text"] for line in fh}
    assert not train_texts & {r["text"] for r in _sample_records()}

"""Multimodal MoE models: image placeholder tokens are routed and recorded like text, and
each token's modality comes from what the model is given (mm_token_type_ids or config ids).

Tiny Qwen3-VL-MoE and GLM-4.5V (glm4v_moe) models are built from configs
(tests/tiny_models.py) and given synthetic images: random pixel values for a (1, 4, 4)
patch grid, which the vision tower merges into 4 placeholder tokens.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from routescope.capture.discovery import find_routers
from routescope.capture.recording.modality import (
    IMAGE,
    MODALITIES,
    TEXT,
    VIDEO,
    modality_names,
    token_modality,
)
from tests.conftest import _LIVE_MODELS
from tests.tiny_models import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    VISION_END,
    VISION_LANGUAGE,
    VISION_START,
    build_tiny_vision_language_model,
)

VL_TYPES = sorted(VISION_LANGUAGE)
IMAGE_TOKENS = 4  # a (1, 4, 4) grid of patches, merged 2 x 2
PATCH_VALUES = 3 * 2 * 4 * 4  # channels x temporal patch x patch x patch


def image_batch(device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two sequences, each with one synthetic image; the second is shorter and left-padded."""
    gen = torch.Generator().manual_seed(seed)
    image = [VISION_START] + [IMAGE_TOKEN] * IMAGE_TOKENS + [VISION_END]
    rows = [
        [11, 12, *image, 13, 14, 15],
        [0, 0, 0, 21, *image, 22],
    ]
    ids = torch.tensor(rows)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "pixel_values": torch.randn(2 * 16, PATCH_VALUES, generator=gen).to(device),
        "image_grid_thw": torch.tensor([[1, 4, 4], [1, 4, 4]]).to(device),
        "mm_token_type_ids": (ids == IMAGE_TOKEN).to(torch.int32).to(device),
    }


@pytest.fixture
def vl_model(device):
    def make(model_type: str) -> torch.nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_tiny_vision_language_model(model_type).to(device)
        _LIVE_MODELS.append(model)  # the hook-leak guard of conftest checks it after the test
        return model

    return make


@pytest.mark.parametrize("model_type", VL_TYPES)
def test_modality_from_token_types_and_from_config_ids(model_type, vl_model, device):
    model = vl_model(model_type)
    batch = image_batch(device)
    ids = batch["input_ids"]
    expected = torch.where(ids == IMAGE_TOKEN, IMAGE, TEXT).to(torch.int8)
    from_types = token_modality(ids, batch, model.config)
    from_ids = token_modality(ids, {}, model.config)  # no mm_token_type_ids: the config's ids decide
    assert from_types is not None and from_ids is not None
    assert torch.equal(from_types.cpu(), expected.cpu())
    assert torch.equal(from_ids.cpu(), expected.cpu())
    assert (from_ids == IMAGE).sum().item() == 2 * IMAGE_TOKENS
    # a video placeholder is named by the config's video id
    video = ids.clone()
    video[0, 3] = VIDEO_TOKEN
    assert token_modality(video, {}, model.config)[0, 3].item() == VIDEO


def test_modality_of_decode_steps_and_text_only_models(device):
    # generate passes the whole sequence's token types with only the new token's id: the
    # last columns belong to the new tokens
    types = torch.tensor([[0, 1, 1, 0, 3], [0, 0, 2, 2, 0]], device=device)
    new = torch.tensor([[7], [8]], device=device)
    assert token_modality(new, {"mm_token_type_ids": types}).flatten().tolist() == [3, 0]
    # nothing marks any token: None (all text), also for a config without placeholder ids
    plain = torch.tensor([[5, 6, 7]], device=device)
    assert token_modality(plain, {}, config=None) is None
    assert modality_names([0, 1, 2, 3]).tolist() == list(MODALITIES)
    with pytest.raises(ValueError, match="mm_token_type_ids has 1 rows but input_ids has 2"):
        token_modality(new, {"mm_token_type_ids": types[:1]})


@pytest.mark.parametrize("model_type", VL_TYPES)
def test_language_model_routers_are_found(model_type, vl_model):
    model = vl_model(model_type)
    sites = find_routers(model)
    text = model.config.get_text_config()
    dense_first = getattr(text, "first_k_dense_replace", 0) or 0
    assert [site.layer for site in sites] == list(range(dense_first, text.num_hidden_layers))
    assert all(".language_model." in site.name and site.stack == "decoder" for site in sites)


def test_runs_without_the_extra_columns_read_as_text_and_decoder(tmp_path):
    # parts written before `modality` and `stack` existed (or imported): the defaults
    from routescope import open_run
    from tests.synthetic import write_run

    rng = np.random.default_rng(0)
    write_run(tmp_path / "run", {0: rng.integers(0, 4, size=(40, 2))}, num_experts=4, seq_len=8)
    run = open_run(tmp_path / "run")
    assert run.sql("SELECT DISTINCT modality, stack FROM tokens").values.tolist() == [["text", "decoder"]]
    by_modality = run.specialization(by="modality")
    assert set(by_modality.modality) == {"text"}
    assert np.isclose(by_modality.share.sum(), 1.0)
    assert run.expert_load(where="modality = 'image'").tokens.sum() == 0
    with pytest.raises(ValueError, match="token columns: phase, modality, stack"):
        run.specialization(by="lang")


@pytest.mark.parametrize("model_type", VL_TYPES)
def test_super_expert_calibration_accepts_images(model_type, vl_model, device):
    # dict batches go to the model whole, so pixel_values reach the vision tower and every
    # token the language model routes, image placeholders included, is calibrated on
    from routescope import find_super_experts

    model = vl_model(model_type)
    batch = image_batch(device)
    experts = find_super_experts(model, [batch], progress=False)
    routed = experts[~experts.shared]
    top_k = model.config.get_text_config().num_experts_per_tok
    per_layer = routed.groupby("layer").tokens_seen.sum()
    assert list(per_layer.index) == [site.layer for site in find_routers(model)]
    assert (per_layer == top_k * int(batch["attention_mask"].sum())).all()


# -- coverage: every multimodal MoE type of the installed transformers --------------------
def installed_multimodal_moe_types() -> list[str]:
    """MoE model types with an image-text-to-text or multimodal-LM class and no causal-LM
    class (their text halves, where registered, are in tests/moe_types.py)."""
    from pathlib import Path

    import transformers
    from transformers.models.auto import modeling_auto

    root = Path(transformers.__file__).parent / "models"
    moe_folders = {
        path.parent.name
        for path in root.glob("*/modeling_*.py")
        if '"router_logits"' in (text := path.read_text(encoding="utf-8"))
        or "@use_experts_implementation" in text
    }
    mappings = (
        modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        modeling_auto.MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES,
    )
    return sorted(
        t
        for t in set().union(*mappings)
        if t.replace("-", "_") in moe_folders and t not in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    )


# model type -> why it is not covered (docs/models.md, "Multimodal models", says the same)
MULTIMODAL_GAPS: dict[str, str] = {
    "diffusion_gemma": "encoder plus diffusion decoder, not an autoregressive language model",
    "qwen3_omni_moe": "transformers 5.24 cannot build it from its own default config (Qwen3OmniMoeTalkerTextConfig has no shared_expert_intermediate_size); beyond that, its thinker and talker are two MoE language models whose block lists share layer numbers (discovery would refuse them by name) and whose generate calls bypass the model's forward",
}
# gaps whose shrunk config would still allocate gigabytes: listed, never built
NOT_BUILT: set[str] = set()
MULTIMODAL_TYPES = installed_multimodal_moe_types()


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_type",
    [
        pytest.param(
            t, marks=pytest.mark.xfail(reason=MULTIMODAL_GAPS[t], strict=True, run=t not in NOT_BUILT)
        )
        if t in MULTIMODAL_GAPS
        else t
        for t in MULTIMODAL_TYPES
    ],
)
def test_multimodal_type_records_text_exactly(model_type, tmp_path, device):
    """The causal-LM coverage test (tests/test_model_coverage.py) on the multimodal model,
    given text only: a left-padded batch and a generate, every decision exact."""
    from tests import test_model_coverage as coverage
    from tests.tiny_models import build_tiny_multimodal_model

    def make(model_type: str) -> torch.nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_tiny_multimodal_model(model_type).to(device)
        _LIVE_MODELS.append(model)
        return model

    coverage.test_model_type_records_exactly(model_type, make, tmp_path, device)


# -- recording with images ------------------------------------------------------------------
def _expected_decisions(forward_calls: list, valid: torch.Tensor) -> tuple[list[int], np.ndarray]:
    """(experts, weights) of one forward's real tokens in the recorded order: batch row, then
    position, then layer, then slot."""
    batch, width = valid.shape
    layers = sorted(forward_calls, key=lambda call: call[0])
    experts, weights = [], []
    for b in range(batch):
        for s in range(width):
            if not valid[b, s]:
                continue
            for _, ids, w in layers:
                row = b * width + s
                experts += ids[row].tolist()
                weights += w[row].float().tolist()
    return experts, np.asarray(weights, dtype=np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", VL_TYPES)
def test_image_tokens_are_recorded_exactly_with_their_modality(model_type, vl_model, tmp_path, device):
    import routescope as rs
    from tests.test_model_coverage import RouterCapture

    model = vl_model(model_type)
    batch = image_batch(device)
    capture = RouterCapture(model)
    try:
        with rs.record(model, tmp_path / "run"), torch.no_grad():
            model(**batch)
            out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    finally:
        capture.remove()
    run = rs.open_run(tmp_path / "run")
    mask = batch["attention_mask"].cpu()
    new = out.shape[1] - mask.shape[1]
    valid_by_step = [mask, mask] + [torch.ones(2, 1, dtype=mask.dtype)] * (new - 1)
    assert len(capture.forwards) == len(valid_by_step)

    # every token the language model routes is recorded, image placeholders included, with
    # the experts and weights the experts module was called with
    for step, (forward_calls, valid) in enumerate(zip(capture.forwards, valid_by_step, strict=True)):
        got = run.sql(
            "SELECT r.expert, r.weight FROM routing r JOIN tokens t USING (seq_id, pos) "
            "WHERE t.step = ? ORDER BY r.seq_id, r.pos, r.layer, r.slot",
            [step],
        )
        calls = [(layer, ids.cpu(), w.cpu()) for layer, ids, w in forward_calls]
        experts, weights = _expected_decisions(calls, valid)
        assert got.expert.tolist() == experts
        np.testing.assert_array_equal(got.weight.to_numpy(np.float32), weights)

    # modality at every position: the prompt's placeholders are images, the rest text
    tokens = run.sql("SELECT step, phase, token_id, modality, stack FROM tokens ORDER BY step, seq_id, pos")
    prompt = tokens[tokens.step < 2]
    assert (prompt.modality == np.where(prompt.token_id == IMAGE_TOKEN, "image", "text")).all()
    assert (prompt.modality == "image").sum() == 2 * 2 * IMAGE_TOKENS  # two forwards, two images each
    assert set(tokens[tokens.phase == "decode"].modality) == {"text"}
    assert set(tokens["stack"]) == {"decoder"}
    assert list(tokens.groupby("step").phase.first()) == ["prefill", "prefill"] + ["decode"] * (new - 1)

    # generate's decode steps continue the sequences of its prefill (step 1), one position on
    rows = run.sql("SELECT step, seq_id, pos FROM tokens WHERE step >= 1 ORDER BY step, seq_id")
    last = rows[rows.step == 1].groupby("seq_id").pos.max()
    for step, decode in rows[rows.step > 1].groupby("step"):
        assert decode.seq_id.tolist() == list(last.index)
        assert (decode.set_index("seq_id").pos == last + (step - 1)).all()

    # metrics filter and group by modality
    top_k = run.manifest["top_k"][str(run.moe_layers[0])]
    image_load = run.expert_load(where="modality = 'image'")
    assert (image_load.groupby("layer").tokens.sum() == top_k * 4 * IMAGE_TOKENS).all()
    by_modality = run.specialization(by="modality")
    assert set(by_modality.modality) == {"image", "text"}
    shares = by_modality.groupby(["modality", "layer"]).share.sum()
    np.testing.assert_allclose(shares.to_numpy(), 1.0)


@pytest.mark.slow
def test_docs_list_every_multimodal_and_encoder_decoder_type_with_the_same_gaps():
    from tests.test_model_coverage import _docs_table
    from tests.tiny_models import SEQ2SEQ

    rows = _docs_table()
    missing = sorted((set(MULTIMODAL_TYPES) | set(SEQ2SEQ)) - set(rows))
    assert not missing, f"docs/models.md does not list {missing}"
    gaps = {t for t in MULTIMODAL_TYPES if rows[t][2].lower().startswith("gap")}
    assert gaps == set(MULTIMODAL_GAPS), "docs/models.md and MULTIMODAL_GAPS disagree"
    assert all(rows[t][2] == "supported" for t in SEQ2SEQ)


@pytest.mark.slow
def test_modality_isolated_experts_are_recorded_from_both_sets(device):
    """Ernie 4.5 VL: text tokens are routed to the text experts and vision tokens to the
    vision experts; the adapter's ids and weights equal what each experts module is called
    with, vision ids after the text ones."""
    from tests.tiny_models import build_tiny_multimodal_model

    model = build_tiny_multimodal_model("ernie4_5_vl_moe").to(device)
    _LIVE_MODELS.append(model)
    site = find_routers(model)[0]
    block, experts = site.module, site.module.num_experts
    assert site.adapter.name == "modality_split" and site.num_experts == 2 * experts
    calls: dict[str, tuple] = {}
    handles = [
        getattr(block, part).experts.register_forward_pre_hook(
            lambda m, args, part=part: calls.update({part: (args[1], args[2])})  # returns None
        )
        for part in ("text_moe", "vision_moe")
    ]
    got = []
    handles.append(
        block.register_forward_hook(
            lambda m, a, k, out: got.append(site.adapter.extract(m, a, k, out)), with_kwargs=True
        )
    )
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 6, model.config.get_text_config().hidden_size, generator=gen).to(device)
    types = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 2, 2, 2, 0]], device=device)
    try:
        with torch.no_grad():
            block(hidden, types)
    finally:
        for handle in handles:
            handle.remove()
    (ids, weights), vision = got[0], types.reshape(-1).bool()
    text_ids, text_weights = calls["text_moe"]
    vision_ids, vision_weights = calls["vision_moe"]
    assert torch.equal(ids[~vision], text_ids) and torch.equal(weights[~vision], text_weights)
    assert torch.equal(ids[vision], vision_ids + experts) and torch.equal(weights[vision], vision_weights)
    assert int((ids >= experts).sum()) == 2 * int(vision.sum())  # top-2 of the vision set


@pytest.mark.slow
def test_routers_in_a_second_block_list_are_refused_by_name(vl_model):
    """No installed multimodal type has experts in its vision tower; one that had would share
    layer numbers with the language model, so discovery refuses it and names both lists."""
    import copy

    from routescope import UnsupportedModelError

    model = vl_model("qwen3_vl_moe")
    experts = model.model.language_model.layers[0].mlp.experts
    model.model.visual.blocks[0].moe_experts = copy.deepcopy(experts)  # a vision-tower MoE layer
    with pytest.raises(UnsupportedModelError, match=r"model\.language_model\.layers, model\.visual\.blocks"):
        find_routers(model)


@pytest.mark.slow
def test_video_placeholders_are_recorded_as_video(vl_model, tmp_path, device):
    import routescope as rs
    from tests.tiny_models import VIDEO_TOKEN

    model = vl_model("qwen3_vl_moe")
    gen = torch.Generator().manual_seed(1)
    ids = torch.tensor([[11, 12, VISION_START, *[VIDEO_TOKEN] * IMAGE_TOKENS, VISION_END, 13]], device=device)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values_videos": torch.randn(16, PATCH_VALUES, generator=gen).to(device),  # one (1, 4, 4) grid
        "video_grid_thw": torch.tensor([[1, 4, 4]], device=device),
        "mm_token_type_ids": torch.where(ids == VIDEO_TOKEN, VIDEO, TEXT),
    }
    with rs.record(model, tmp_path / "run"), torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    run = rs.open_run(tmp_path / "run")
    tokens = run.sql("SELECT seq_id, pos, token_id, phase, modality FROM tokens ORDER BY step, pos")
    assert tokens.modality.tolist() == ["video" if t == VIDEO_TOKEN else "text" for t in tokens.token_id]
    assert (tokens.modality == "video").sum() == IMAGE_TOKENS
    # the decode steps continue the prompt's sequence
    assert tokens.seq_id.nunique() == 1
    assert tokens.pos.tolist() == list(range(out.shape[1] - 1))
    assert tokens.phase.tolist() == ["prefill"] * ids.shape[1] + ["decode"] * (
        out.shape[1] - 1 - ids.shape[1]
    )

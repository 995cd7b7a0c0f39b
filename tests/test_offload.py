"""Big-model dispatch: recording through accelerate's device_map hooks with CPU and disk offload.

A tiny Mixtral is saved, reloaded with `device_map` so that some layers live on "disk"
(weights on the meta device, loaded by accelerate's AlignDevicesHook at each forward), and
recorded; the run must equal a recording of the plain in-memory model on the same inputs.
"""

from __future__ import annotations

import warnings

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

import routescope as rs
from routescope.capture.recording.wraps import is_wrapped

DEVICE_MAPS = {
    "auto-cpu-limited": dict(device_map="auto", max_memory={"cpu": "60KB"}),
    "layer-on-disk": dict(
        device_map={
            "model.embed_tokens": "cpu",
            "model.rotary_emb": "cpu",
            "model.layers.0": "cpu",
            "model.layers.1": "disk",
            "model.norm": "cpu",
            "lm_head": "cpu",
        }
    ),
}


def record_inputs(model, out) -> pd.DataFrame:
    ids = torch.tensor([[5, 9, 17, 33, 2, 101, 7], [0, 0, 12, 44, 81, 3, 9]])
    mask = (ids != 0).long()
    with rs.record(model, out), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with rs.open_run(out) as run:
        return run.sql(
            "SELECT t.step, t.phase, r.* FROM routing r JOIN tokens t USING (seq_id, pos) ORDER BY ALL"
        ).drop(columns="rank")


def routescope_hooks(model) -> int:
    """routescope's hooks and forward wraps on any submodule."""
    return sum(
        getattr(getattr(h, "__func__", h), "__module__", "").startswith("routescope")
        for m in model.modules()
        for h in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
    ) + sum(is_wrapped(m) for m in model.modules())


@pytest.mark.slow
@pytest.mark.parametrize("placement", sorted(DEVICE_MAPS))
def test_offloaded_model_records_like_plain_model(tiny_model, tmp_path, placement):
    plain = tiny_model("mixtral")
    plain.save_pretrained(tmp_path / "model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dispatched = AutoModelForCausalLM.from_pretrained(
            tmp_path / "model", offload_folder=tmp_path / "offload", **DEVICE_MAPS[placement]
        ).eval()

    assert "disk" in set(dispatched.hf_device_map.values())
    hooked = [name for name, module in dispatched.named_modules() if hasattr(module, "_hf_hook")]
    assert hooked, "accelerate hooks are not active"
    offloaded = [n for n, p in dispatched.named_parameters() if p.device.type == "meta"]
    assert any(".mlp." in name or "experts" in name for name in offloaded), offloaded

    expected = record_inputs(plain, tmp_path / "plain")
    got = record_inputs(dispatched, tmp_path / "dispatched")
    assert routescope_hooks(dispatched) == 0
    assert len(got) > 0
    pd.testing.assert_frame_equal(got, expected)

    with rs.open_run(tmp_path / "dispatched") as run:
        assert run.complete
        assert run.manifest["moe_layers"] == [0, 1]

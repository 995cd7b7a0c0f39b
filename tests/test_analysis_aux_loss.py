"""aux_loss from router_stats equals transformers' load_balancing_loss_func on a real tiny
Mixtral's router logits, layer by layer (SPEC 4.1)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import routescope as rs

E, K = 4, 2


@pytest.fixture
def mixtral(device):
    cfg = AutoConfig.for_model(
        "mixtral",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=128,
        num_local_experts=E,
        num_experts_per_tok=K,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).to(device).eval()


def router_logits(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    return out.router_logits


@pytest.mark.parametrize("padded", [False, True])
def test_aux_loss_equals_load_balancing_loss_func(mixtral, device, tmp_path, padded):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (3, 16), generator=gen).to(device)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :5] = 0  # left padding: never recorded, excluded by the reference through its mask
    with rs.record(mixtral, tmp_path / "run", router_stats=True) as _, torch.no_grad():
        mixtral(input_ids=ids, attention_mask=mask)
    logits = router_logits(mixtral, ids, mask)
    with rs.open_run(tmp_path / "run") as run:
        bal = run.balance(aux_loss=True).set_index("layer")
        assert list(bal.index) == run.moe_layers == [0, 1]
        for layer in run.moe_layers:
            expected = load_balancing_loss_func(
                (logits[layer].float(),), E, K, attention_mask=mask if padded else None
            )
            assert bal.loc[layer, "aux_loss"] == pytest.approx(float(expected), rel=1e-5)
            assert bal.loc[layer, "tokens"] == int(mask.sum())


def test_aux_loss_step_mean_equals_mean_of_per_forward_losses(mixtral, device, tmp_path):
    gen = torch.Generator().manual_seed(2)
    batches = [
        torch.randint(1, 128, (rows, length), generator=gen).to(device) for rows, length in ((3, 16), (1, 9))
    ]
    with rs.record(mixtral, tmp_path / "run", router_stats=True) as _, torch.no_grad():
        for ids in batches:
            mixtral(input_ids=ids)
    per_forward = [router_logits(mixtral, ids, torch.ones_like(ids)) for ids in batches]
    with rs.open_run(tmp_path / "run") as run:
        bal = run.balance(aux_loss=True).set_index("layer")
    for layer in (0, 1):
        losses = [float(load_balancing_loss_func((logits[layer].float(),), E, K)) for logits in per_forward]
        assert bal.loc[layer, "aux_loss_step_mean"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
        # the pooled value weights the 48-token forward 48:9, the step mean 1:1
        pooled = torch.cat([logits[layer].float() for logits in per_forward])
        assert bal.loc[layer, "aux_loss"] == pytest.approx(
            float(load_balancing_loss_func((pooled,), E, K)), rel=1e-5
        )

"""R3 agreement (SPEC 4.7, issue 34 item 4): `exact_match` per layer and `token_agreement`
(`any_layer_differs`, `missing_routes`) of `rs.compare`, against a hand computation from the
routers' own choices, taken by the test's forward hooks on two tiny models that route the
same tokens differently (B is A with one layer's router weights perturbed, as a trainer's
weights drift from the rollout engine's). Both ways saturation reads routing (the scan and
the join fallback) give the same numbers.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

import routescope as rs
from routescope.analysis import compare, saturation
from routescope.analysis.content import match_by_content
from routescope.store.layout import list_parts
from tests.tiny_models import build_tiny_model

MODEL = "qwen2_moe"
LAYERS = (0, 1)


def routed_ids(model: torch.nn.Module, path, ids: torch.Tensor, mask: torch.Tensor) -> dict[int, np.ndarray]:
    """Record the forward with rs.record and return each router's own top-k ids [rows*seq, k]."""
    chosen: dict[int, np.ndarray] = {}
    handles = []
    for layer in LAYERS:

        def hook(module, args, output, layer=layer):
            chosen[layer] = output[2].detach().numpy().copy()

        handles.append(model.model.layers[layer].mlp.gate.register_forward_hook(hook))
    try:
        with rs.record(model, path), torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    return chosen


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("agreement")
    model_a = build_tiny_model(MODEL)
    model_b = copy.deepcopy(model_a)
    with torch.no_grad():  # layer 1's router drifts; layer 0 is unchanged
        gate = model_b.model.layers[1].mlp.gate.weight
        gate.add_(0.6 * gate.std() * torch.randn(gate.shape, generator=torch.Generator().manual_seed(1)))
    ids = torch.randint(2, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0  # right padding: not recorded, not compared
    chosen_a = routed_ids(model_a, root / "a", ids, mask)
    chosen_b = routed_ids(model_b, root / "b", ids, mask)
    keep = mask.reshape(-1).bool().numpy()
    return (
        root / "a",
        root / "b",
        {layer: chosen_a[layer][keep] for layer in LAYERS},
        {layer: chosen_b[layer][keep] for layer in LAYERS},
    )


@pytest.mark.slow
def test_exact_match_and_any_layer_differs_equal_the_hand_computation(two_models):
    path_a, path_b, chosen_a, chosen_b = two_models
    tokens = len(chosen_a[0])
    same = {
        layer: np.array([set(x) == set(y) for x, y in zip(chosen_a[layer], chosen_b[layer], strict=True)])
        for layer in LAYERS
    }
    assert same[0].all() and 0 < same[1].mean() < 1  # the test needs some, not all, decisions changed
    result = rs.compare(path_a, path_b)
    sat = result.saturation.set_index("layer")
    for layer in LAYERS:
        assert sat.loc[layer, "tokens_matched"] == tokens
        assert sat.loc[layer, "exact_match"] == pytest.approx(same[layer].mean(), abs=1e-12)
        overlap = [len(set(x) & set(y)) / 2 for x, y in zip(chosen_a[layer], chosen_b[layer], strict=True)]
        assert sat.loc[layer, "saturation"] == pytest.approx(np.mean(overlap), abs=1e-12)
    differs = ~np.logical_and.reduce([same[layer] for layer in LAYERS])
    agreement = result.token_agreement
    assert agreement.columns.tolist()[:3] == ["tokens_matched", "any_layer_differs", "missing_routes"]
    row = agreement.iloc[0]
    assert row["tokens_matched"] == tokens and row["layers"] == len(LAYERS)
    assert row["any_layer_differs"] == pytest.approx(differs.mean(), abs=1e-12)
    assert row["missing_routes"] == 0.0  # a recording routes every token
    assert "token_agreement" in result.to_dict()


@pytest.mark.slow
def test_scan_and_join_give_the_same_agreement(two_models):
    path_a, path_b, _, _ = two_models
    with rs.open_run(path_a) as a, rs.open_run(path_b) as b:
        pairs, _ = match_by_content(compare.content_tokens(a, None), compare.content_tokens(b, None))
        parts = [str(p) for p in list_parts(b.path, "routing")]
        args = (a.con, pairs, list(LAYERS), [2, 2], 2, parts)
        scanned = saturation.agreement_table(*args, scan=True)
        joined = saturation.agreement_table(*args, scan=False)
    pd.testing.assert_frame_equal(scanned.per_layer, joined.per_layer)
    assert scanned.tokens_differing == joined.tokens_differing > 0


@pytest.mark.slow
def test_a_run_compared_with_itself_agrees_everywhere(two_models):
    path_a, _, _, _ = two_models
    result = rs.compare(path_a, path_a)
    assert (result.saturation["exact_match"] == 1.0).all()
    assert result.token_agreement["any_layer_differs"].iloc[0] == 0.0


@pytest.mark.slow
def test_runs_with_different_k_never_match_exactly(tmp_path):
    """A's top-2 are B's first two of three: every A expert is in B (saturation over the
    smaller k is 1), yet no top-k set is equal."""
    from tests.synthetic import sample_topk, write_run

    rng = np.random.default_rng(0)
    top3 = sample_topk(rng, np.full((60, 6), 1 / 6), 3)
    tokens = np.arange(60) % 17
    write_run(tmp_path / "a", {0: top3[:, :2].copy()}, 6, seq_len=20, token_id=tokens)
    write_run(tmp_path / "b", {0: top3}, 6, seq_len=20, token_id=tokens)
    result = rs.compare(tmp_path / "a", tmp_path / "b")
    row = result.saturation.iloc[0]
    assert row["tokens_matched"] == 60 and row["saturation"] == 1.0 and row["exact_match"] == 0.0
    assert result.token_agreement["any_layer_differs"].iloc[0] == 1.0

"""rs.replay on a padded batch (issue 26, item 7): the README's line with the recording's
attention_mask replays; without it the error says the missing tokens are padding."""

from __future__ import annotations

import pytest
import torch

import routescope as rs
from tests.tiny_models import build_tiny_model

PAD = 0


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, 5:], mask[1, 5:] = PAD, 0  # right padding, as a tokenizer pads a shorter text
    return ids, mask


@pytest.fixture
def recorded(tmp_path):
    model = build_tiny_model("mixtral")
    model.config.pad_token_id = PAD
    ids, mask = padded_batch()
    with rs.record(model, tmp_path / "run"), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    return model, ids, mask, tmp_path / "run"


def test_replay_with_the_recordings_mask_replays_every_token(recorded):
    model, ids, mask, run = recorded
    with rs.replay(model, run, weights="recorded") as rep, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert rep.replayed_tokens == int(mask.sum()) and rep.fallback_tokens == 0


def test_replay_without_the_mask_says_the_missing_tokens_are_padding(recorded):
    model, ids, _, run = recorded
    with pytest.raises(rs.RouteScopeError) as err, torch.no_grad():
        with rs.replay(model, run):
            model(input_ids=ids)
    text = str(err.value)
    assert "4 of 18 tokens" in text
    assert "4 of the missing tokens are the padding id 0 and no attention_mask was passed" in text
    assert "call the model with the attention_mask the recording used" in text


def test_a_missing_token_that_is_not_padding_gets_no_padding_hint(recorded):
    model, ids, mask, run = recorded
    other = ids.clone()
    other[0, 3] = 99 if int(other[0, 3]) != 99 else 98
    with pytest.raises(rs.RouteScopeError) as err, torch.no_grad():
        with rs.replay(model, run):
            model(input_ids=other, attention_mask=mask)
    assert "are not in the run" in str(err.value) and "padding id" not in str(err.value)

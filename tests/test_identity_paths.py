"""A decode step's token identity: the short path `generate` takes once per token gives the same
answer as the general path, step after step (positions, which tokens count, the tracker's state)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from routescope.capture.recording import decoded
from routescope.capture.recording.identity import ForwardInputs, SequenceTracker
from routescope.capture.recording.rows import as_tensor
from routescope.capture.recording.skipped import Skipped

BATCH, HEADS, DIM, EOS = 4, 2, 4, 7
# decode step -> the row that feeds the end-of-text id there (no mask, a 2-D one, a 4-D one)
ENDS = {1: 1, 6: 2, 10: 3}
PADDED = (3, 8)  # decode steps where row 0 feeds a padding token (a 2-D mask, then a 4-D one)
MAX_LENGTH = 32  # a static cache's length


def static_mask(mask: torch.Tensor) -> torch.Tensor:
    """The [B, 1, 1, MAX_LENGTH] bool mask a static cache's decode step gets, from the 2-D one:
    the query may attend to the real tokens so far, itself included."""
    allowed = torch.zeros(mask.shape[0], MAX_LENGTH, dtype=torch.bool)
    allowed[:, : mask.shape[1]] = mask != 0
    return allowed[:, None, None, :]


def grow(cache: DynamicCache, tokens: int) -> None:
    """The cache holds `tokens` more positions, as a forward of that many tokens leaves it."""
    kv = torch.zeros(BATCH, HEADS, tokens, DIM)
    cache.update(kv, kv.clone(), 0)


class Lane:
    """One tracker and its own cache, fed the same forwards as the other lane."""

    def __init__(self, sample: float | None) -> None:
        ids = iter(range(1000))
        self.tracker = SequenceTracker(
            lambda n: np.array([next(ids) for _ in range(n)], dtype=np.int64), Skipped(), sample, seed=3
        )
        self.tracker.eos_ids = torch.tensor([EOS])
        self.cache = DynamicCache()

    def step(self, ids, mask, position_ids, short_path: bool):
        inputs = ForwardInputs(ids, None, mask, position_ids, self.cache)
        identity = self.tracker.identify(inputs, {"domain": "x"}, short_path=short_path)
        identity.token_ids_fed = ids.clone()
        grow(self.cache, ids.shape[1])
        return identity


@pytest.mark.parametrize("sample", [None, 0.5])
@pytest.mark.parametrize("max_run", [64, 2, 1])  # steps' validity made when read, or sooner
@pytest.mark.parametrize("read_every", [1, 5])  # read each step's identity at once, or five at a time
@pytest.mark.parametrize("at_once", [False, True])  # a CPU's deferred masks, or an accelerator's
def test_the_decode_short_path_equals_the_general_path(sample, max_run, read_every, at_once, monkeypatch):
    monkeypatch.setattr(decoded, "MAX_RUN", max_run)
    monkeypatch.setattr(decoded, "made_at_once", lambda device: at_once)
    short, general = Lane(sample), Lane(sample)
    prompt = torch.tensor([[0, 0, 5, 6], [0, 4, 5, 6], [3, 4, 5, 6], [0, 0, 0, 6]])
    mask = (prompt != 0).long()  # left padding, as generate's batches have
    for lane in (short, general):
        lane.step(prompt, mask, None, short_path=False)
    rng = torch.Generator().manual_seed(0)
    # mask4d: a static cache's [B, 1, 1, max length] bool mask and position_ids (compiled generate)
    kinds = ["mask", "none", "position_ids", "mask", "position_ids", "mask4d"]
    kinds += ["mask", "none", "mask4d", "none", "mask4d", "position_ids", "mask4d"]
    unread = []
    for t, kind in enumerate(kinds):
        ids = torch.randint(8, 20, (BATCH, 1), generator=rng)
        if t in ENDS:
            ids[ENDS[t], 0] = EOS  # that row's text ends: its later tokens are not recorded
        mask = torch.cat([mask, torch.ones(BATCH, 1, dtype=torch.long)], dim=1)
        if t in PADDED:
            mask[0, -1] = 0  # a padded step of one row
        past = mask.shape[1] - 1
        position_ids = mask.sum(1, keepdim=True) - 1 if kind in ("position_ids", "mask4d") else None
        if kind == "mask4d" and t in PADDED:
            position_ids[0, 0] = 0  # a padding token's position is anything: not the row's next one
        given = {"mask": mask, "mask4d": static_mask(mask)}.get(kind)
        got = short.step(ids, given, position_ids, short_path=True)
        want = general.step(ids, given, position_ids, short_path=False)
        # the caller may reuse its tensors: what the step copied must not change
        ids.fill_(-5)
        if position_ids is not None:
            position_ids.fill_(-5)
        assert got.phase == want.phase == "decode"
        assert np.array_equal(got.seq_ids, want.seq_ids)
        assert got.past == want.past == past
        unread.append((t, kind, got, want))
        if len(unread) < read_every and t < len(kinds) - 1:
            continue  # steps not read yet: their validity is made later, several at once
        for t_, kind_, got_, want_ in unread:  # in order, as the writer thread reads them
            valid = as_tensor(got_.valid)
            assert torch.equal(valid, want_.valid), (t_, kind_)
            positions = got_.positions if got_.snap is None else got_.snap[:, 1:2]
            assert torch.equal(positions[valid], want_.positions[want_.valid]), (t_, kind_)
            if got_.snap is not None:  # the ids fed, copied
                assert torch.equal(got_.snap[:, :1][valid], want_.token_ids_fed[want_.valid]), (t_, kind_)
        unread = []
        a, b = got.state, want.state
        assert torch.equal(a.live(), b.live()), (t, kind)
        # a finished row's next position is never used again (the short path leaves it stale)
        assert torch.equal(a.next_positions()[a.alive], b.next_positions()[b.alive]), (t, kind)
    assert not short.tracker.skipped.counts and not general.tracker.skipped.counts
    if sample is None:  # the rows that fed the end-of-text id are finished; the other goes on
        assert as_tensor(got.valid)[:, 0].tolist() == [True, False, False, False]

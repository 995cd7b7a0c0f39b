"""content_keys: equal prefixes give equal keys whatever the seq_id or row order; different
prefixes give different keys; tokens without their full prefix get the sentinel."""

from __future__ import annotations

import numpy as np
import pytest

from routescope.analysis.content import MISSING_KEY, content_keys


def _rows(seqs: dict[int, list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    seq_id, pos, tok = [], [], []
    for s, ids in seqs.items():
        for p, t in enumerate(ids):
            seq_id.append(s)
            pos.append(p)
            tok.append(t)
    return np.array(seq_id, dtype=np.int64), np.array(pos, dtype=np.int32), np.array(tok, dtype=np.int32)


def _prefixes(seq_id, pos, tok) -> list[tuple[int, ...] | None]:
    """Independent truth: the tuple of token ids at 0..pos, or None when one is missing."""
    by_seq: dict[int, dict[int, int]] = {}
    for s, p, t in zip(seq_id.tolist(), pos.tolist(), tok.tolist()):
        by_seq.setdefault(s, {})[p] = t
    out = []
    for s, p in zip(seq_id.tolist(), pos.tolist()):
        seq = by_seq[s]
        out.append(tuple(seq[i] for i in range(p + 1)) if all(i in seq for i in range(p + 1)) else None)
    return out


def test_same_texts_other_seq_ids_and_order_give_same_keys():
    rng = np.random.default_rng(0)
    texts = [rng.integers(0, 50, size=int(n)).tolist() for n in rng.integers(1, 30, size=12)]
    a = _rows({i: t for i, t in enumerate(texts)})
    perm = rng.permutation(len(texts))
    b = _rows({1000 + 7 * j: texts[i] for j, i in enumerate(perm)})
    keys_a = content_keys(*a)
    shuffle = rng.permutation(len(b[0]))
    keys_b = content_keys(*(x[shuffle] for x in b))
    truth_a = _prefixes(*a)
    truth_b = _prefixes(*(x[shuffle] for x in b))
    map_a = dict(zip(truth_a, keys_a.tolist()))
    assert [map_a[t] for t in truth_b] == keys_b.tolist()
    assert (keys_a != MISSING_KEY).all()


def test_keys_equal_exactly_when_prefixes_equal():
    rng = np.random.default_rng(1)
    # Small vocabulary and shared prefixes, so equal and unequal prefixes both occur often.
    base = rng.integers(0, 3, size=20).tolist()
    seqs = {}
    for s in range(40):
        cut = int(rng.integers(0, 20))
        seqs[s] = base[:cut] + rng.integers(0, 3, size=int(rng.integers(1, 10))).tolist()
    seq_id, pos, tok = _rows(seqs)
    keys = content_keys(seq_id, pos, tok)
    truth = _prefixes(seq_id, pos, tok)
    groups_truth = {}
    for t, k in zip(truth, keys.tolist()):
        groups_truth.setdefault(t, set()).add(k)
    assert all(len(ks) == 1 for ks in groups_truth.values())  # equal prefix -> one key
    assert len({next(iter(ks)) for ks in groups_truth.values()}) == len(groups_truth)  # distinct
    assert len(groups_truth) > 50


def test_shared_prefix_then_divergence():
    seq_id, pos, tok = _rows({5: [1, 2, 3, 4], 9: [1, 2, 7, 4]})
    k = content_keys(seq_id, pos, tok)
    assert k[0] == k[4] and k[1] == k[5]
    assert k[2] != k[6] and k[3] != k[7]  # same last token, different history


def test_token_zero_and_length_matter():
    seq_id, pos, tok = _rows({0: [0], 1: [0, 0], 2: [5], 3: [0, 5]})
    k = content_keys(seq_id, pos, tok).tolist()
    # rows: [0] | [0] [0,0] | [5] | [0] [0,5]
    assert k[0] == k[1] == k[4]
    assert len({k[0], k[2], k[3], k[5]}) == 4  # [0,0] != [0]; a leading token 0 counts


def test_missing_earlier_position_gets_sentinel():
    seq_id = np.array([3, 3, 3, 4, 4])
    pos = np.array([0, 1, 3, 1, 2])
    tok = np.array([1, 2, 3, 2, 3])
    k = content_keys(seq_id, pos, tok)
    assert k[0] != MISSING_KEY and k[1] != MISSING_KEY
    assert k[2] == MISSING_KEY  # pos 2 missing
    assert k[3] == MISSING_KEY and k[4] == MISSING_KEY  # pos 0 missing


def test_bad_input_names_what_was_wrong():
    with pytest.raises(ValueError, match="unique"):
        content_keys(np.array([1, 1]), np.array([0, 0]), np.array([3, 4]))
    with pytest.raises(ValueError, match="equal length"):
        content_keys(np.array([1, 1]), np.array([0]), np.array([3, 4]))
    with pytest.raises(ValueError, match="pos must be >= 0"):
        content_keys(np.array([1]), np.array([-1]), np.array([3]))
    with pytest.raises(ValueError, match="integers"):
        content_keys(np.array([1.0]), np.array([0]), np.array([3]))
    assert content_keys(np.array([], dtype=int), np.array([], dtype=int), np.array([], dtype=int)).size == 0


def test_match_by_content_pairs_occurrences_in_order():
    from routescope.analysis.content import match_by_content

    # A holds text [4, 5] twice (seqs 0 and 1), B holds it once (seq 9) and [4, 6] once (seq 3)
    a = {"seq_id": np.array([0, 0, 1, 1]), "pos": np.array([0, 1, 0, 1]), "token_id": np.array([4, 5, 4, 5])}
    b = {"seq_id": np.array([9, 9, 3, 3]), "pos": np.array([0, 1, 0, 1]), "token_id": np.array([4, 5, 4, 6])}
    pairs, counts = match_by_content(a, b)
    got = sorted(zip(pairs["a_seq_id"], pairs["a_pos"], pairs["b_seq_id"], pairs["b_pos"]))
    # "[4]" occurs twice in both: 1st with 1st (B seq 3), 2nd with 2nd (B seq 9);
    # "[4, 5]" once in B: both of A's pair with it
    assert got == [(0, 0, 3, 0), (0, 1, 9, 1), (1, 0, 9, 0), (1, 1, 9, 1)]
    assert counts == {"selected_a": 4, "keyless_a": 0, "matched": 4}
    self_pairs, _ = match_by_content(a, a)
    assert (self_pairs["a_seq_id"] == self_pairs["b_seq_id"]).all()
    assert (self_pairs["a_pos"] == self_pairs["b_pos"]).all()
    a["selected"] = np.array([False, True, True, True])
    b_short = {k: v[2:] for k, v in b.items()}  # B without [4, 5]
    _, counts = match_by_content(a, b_short)
    assert counts == {"selected_a": 3, "keyless_a": 0, "matched": 1}

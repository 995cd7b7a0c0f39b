"""rs.compare: load and balance deltas, experts that died or became hot, router saturation."""

from __future__ import annotations

import json

import numpy as np
import pytest

import routescope as rs
from routescope.analysis.compare import Comparison
from tests import analysis_reference as ref
from tests.synthetic import sample_topk, write_run

E, K, T = 6, 2, 300


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    rng = np.random.default_rng(3)
    root = tmp_path_factory.mktemp("compare")
    uniform = np.full((T, E), 1 / E)
    a = {layer: sample_topk(rng, uniform, K) for layer in (0, 1)}
    # B: in layer 1 expert 5 dies and expert 0 becomes hot; layer 0 keeps half of A's choices
    b = {0: a[0].copy(), 1: sample_topk(rng, np.tile([0.5, 0.125, 0.125, 0.125, 0.125, 0.0], (T, 1)), K)}
    b[0][T // 2 :] = sample_topk(rng, uniform[T // 2 :], K)
    tokens_a = rng.integers(0, 50, T)
    tokens_b = tokens_a.copy()
    tokens_b[:30] += 1  # 30 tokens differ: excluded from saturation
    path_a = write_run(root / "a", a, E, seq_len=30, token_id=tokens_a, router_probs={0: uniform, 1: uniform})
    path_b = write_run(root / "b", b, E, seq_len=30, token_id=tokens_b, router_probs={0: uniform, 1: uniform})
    return path_a, path_b, a, b, tokens_a != tokens_b


@pytest.mark.slow
def test_compare_paths(pair):
    path_a, path_b, a, b, differ = pair
    result = rs.compare(path_a, path_b)
    assert isinstance(result, Comparison)
    load = result.load
    assert load[["layer", "expert"]].values.tolist() == [[layer, e] for layer in (0, 1) for e in range(E)]
    for layer in (0, 1):
        rows = load[load["layer"] == layer]
        la, lb = ref.load(a[layer], E), ref.load(b[layer], E)
        np.testing.assert_array_equal(rows["tokens_delta"], lb - la)
        np.testing.assert_allclose(rows["share_delta"], lb / lb.sum() - la / la.sum())
    bal = result.balance.set_index("layer")
    assert bal.loc[1, "cv_delta"] == pytest.approx(ref.balance(b[1], E)["cv"] - ref.balance(a[1], E)["cv"])
    assert "aux_loss_delta" in bal.columns and "aux_loss_step_mean_delta" in bal.columns
    changes = result.expert_changes
    assert [1, 5, "died"] in changes[["layer", "expert", "change"]].values.tolist()
    assert [1, 0, "became_hot"] in changes[["layer", "expert", "change"]].values.tolist()
    sat = result.saturation.set_index("layer")
    same = ~differ
    for layer in (0, 1):
        overlap = [len(set(a[layer][t]) & set(b[layer][t])) / K for t in np.flatnonzero(same)]
        assert sat.loc[layer, "tokens_matched"] == same.sum()
        assert sat.loc[layer, "saturation"] == pytest.approx(np.mean(overlap))
        top1 = np.mean(a[layer][same, 0] == b[layer][same, 0])
        assert sat.loc[layer, "top1_agreement"] == pytest.approx(top1)
    assert sat.loc[0, "saturation"] > sat.loc[1, "saturation"]
    json.dumps(result.to_dict())  # JSON-ready
    assert "Comparison(" in repr(result) and "<h5>" in result._repr_html_()


def test_compare_runs_and_where(pair):
    path_a, path_b, a, _, differ = pair
    with rs.open_run(path_a) as run_a, rs.open_run(path_b) as run_b:
        result = rs.compare(run_a, run_b, where="pos < 10")
        assert run_a.expert_load() is not None  # Run objects given are left open
    pos = np.arange(T) % 30
    mask = pos < 10
    rows = result.load[result.load["layer"] == 0]
    np.testing.assert_array_equal(rows["tokens_a"], ref.load(a[0][mask], E))
    assert result.saturation["tokens_matched"].iloc[0] == (mask & ~differ).sum()


def test_compare_with_itself_changes_nothing(pair):
    path_a, *_ = pair
    result = rs.compare(path_a, path_a)
    assert (result.load["share_delta"] == 0).all() and result.expert_changes.empty
    assert (result.saturation["saturation"] == 1).all()


def test_compare_missing_run(pair, tmp_path):
    with pytest.raises(FileNotFoundError):
        rs.compare(pair[0], tmp_path / "missing")


# -- content alignment (SPEC 4.7) -----------------------------------------------------------
def _content_run(path, texts, order, rng_seed, k=K, seq_base=0):
    """A run over `texts` (lists of token ids) in `order`, whose routing is a function of each
    token's content (its prefix), as a deterministic model's would be."""
    seq_id, pos, tok, chosen = [], [], [], {0: [], 1: []}
    for i, t in enumerate(order):
        text = texts[t]
        for p in range(len(text)):
            seq_id.append(seq_base + 7 * i)
            pos.append(p)
            tok.append(text[p])
            for layer in (0, 1):
                prefix_rng = np.random.default_rng([rng_seed, layer, *text[: p + 1]])
                chosen[layer].append(prefix_rng.permutation(E)[:k])
    experts = {layer: np.array(v) for layer, v in chosen.items()}
    write_run(path, experts, E, seq_id=np.array(seq_id), pos=np.array(pos), token_id=np.array(tok))
    return experts, list(zip(seq_id, pos, tok))


def _texts(rng, n, lo=3, hi=12, vocab=20):
    return [rng.integers(0, vocab, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def test_same_texts_in_another_order_saturate_fully(tmp_path):
    rng = np.random.default_rng(7)
    texts = _texts(rng, 12)
    _content_run(tmp_path / "a", texts, range(12), rng_seed=1)
    # B: other order, other seq_ids, two texts dropped
    order_b = [int(i) for i in rng.permutation(12)[:10]]
    _content_run(tmp_path / "b", texts, order_b, rng_seed=1, seq_base=1000)
    result = rs.compare(tmp_path / "a", tmp_path / "b")
    sat = result.saturation.set_index("layer")
    expected = sum(len(texts[i]) for i in order_b)
    assert (sat["tokens_matched"] == expected).all()
    assert (sat["saturation"] == 1.0).all() and (sat["top1_agreement"] == 1.0).all()
    assert any("covers the" in note for note in result.notes)  # A's two extra texts are unmatched


def test_runs_sharing_only_a_prefix(tmp_path):
    rng = np.random.default_rng(11)
    texts_a = _texts(rng, 8, lo=6, vocab=1000)  # no two texts start alike
    assert len({t[0] for t in texts_a}) == 8
    shared = [int(rng.integers(1, len(t))) for t in texts_a]
    # B continues each text differently after its shared prefix; B's routing differs too
    texts_b = [t[:m] + [x + 1000 for x in t[m:]] for t, m in zip(texts_a, shared)]
    ea, _ = _content_run(tmp_path / "a", texts_a, range(8), rng_seed=1)
    eb, rows_b = _content_run(tmp_path / "b", texts_b, list(range(8))[::-1], rng_seed=2, seq_base=50)
    result = rs.compare(tmp_path / "a", tmp_path / "b")
    sat = result.saturation.set_index("layer")
    # independent truth: tokens of A at positions inside their text's shared prefix
    index_b = {}
    for j, (s, p, _) in enumerate(rows_b):
        index_b[(s, p)] = j
    seq_of_text_b = {t: 50 + 7 * i for i, t in enumerate(list(range(8))[::-1])}
    a_rows, b_rows = [], []
    start = 0
    for t, text in enumerate(texts_a):
        for p in range(shared[t]):
            a_rows.append(start + p)
            b_rows.append(index_b[(seq_of_text_b[t], p)])
        start += len(text)
    for layer in (0, 1):
        overlap = [len(set(ea[layer][i]) & set(eb[layer][j])) / K for i, j in zip(a_rows, b_rows)]
        top1 = np.mean([ea[layer][i][0] == eb[layer][j][0] for i, j in zip(a_rows, b_rows)])
        assert sat.loc[layer, "tokens_matched"] == sum(shared)
        assert sat.loc[layer, "saturation"] == pytest.approx(np.mean(overlap))
        assert sat.loc[layer, "top1_agreement"] == pytest.approx(top1)


def test_no_content_match_gives_nan_and_a_note(tmp_path):
    rng = np.random.default_rng(5)
    texts = _texts(rng, 4)
    _content_run(tmp_path / "a", texts, range(4), rng_seed=1)
    _content_run(tmp_path / "b", [[x + 50 for x in t] for t in texts], range(4), rng_seed=1)
    result = rs.compare(tmp_path / "a", tmp_path / "b")
    assert (result.saturation["tokens_matched"] == 0).all()
    assert result.saturation["saturation"].isna().all() and result.saturation["top1_agreement"].isna().all()
    assert any("NaN" in note for note in result.notes)


def test_saturation_of_a_real_model_recorded_in_two_batch_orders(tiny_model, tmp_path):
    torch = pytest.importorskip("torch")
    model = tiny_model("mixtral")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (6, 10), generator=gen)
    with rs.record(model, tmp_path / "a"), torch.no_grad():
        model(input_ids=ids)
    with rs.record(model, tmp_path / "b"), torch.no_grad():
        perm = torch.tensor([5, 3, 1, 0, 4, 2])
        model(input_ids=ids[perm[:3]])  # other batch size, other order
        model(input_ids=ids[perm[3:]])
    result = rs.compare(tmp_path / "a", tmp_path / "b")
    sat = result.saturation
    assert (sat["tokens_matched"] == 60).all()
    assert (sat["saturation"] > 0.99).all() and (sat["top1_agreement"] > 0.99).all()

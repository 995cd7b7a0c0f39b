"""Every metric of the Run API against an independent NumPy reference on a synthetic run with
planted structure: a dead and a hot expert, a layer pair where B is a function of A, an
independent pair, and label-specific experts with a known lift. MoE layers are 1, 3, 5 so
that a layer index is never confused with a count of MoE layers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import routescope as rs
from routescope.analysis.metrics import OLMOE_MIN_OCCURRENCES
from tests import analysis_reference as ref
from tests.synthetic import sample_topk, write_run

E, K, T, SEQ_LEN = 8, 2, 2000, 20
LAYERS = (1, 3, 5)


def plant(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    seq_id = np.arange(T) // SEQ_LEN
    pos = np.arange(T) % SEQ_LEN
    domain = np.where(seq_id % 2 == 0, "code", "math")
    # layer 1: expert 7 never chosen (dead), expert 0 preferred (hot)
    p1 = np.array([0.4, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.0])
    l1 = sample_topk(rng, np.tile(p1, (T, 1)), K)
    # layer 3: slot 0 is a bijective function of layer 1's slot 0; slot 1 any other expert
    l3 = np.empty((T, K), dtype=np.int64)
    l3[:, 0] = (3 * l1[:, 0] + 1) % E
    l3[:, 1] = (l3[:, 0] + rng.integers(1, E, T)) % E
    # layer 5: code tokens always use experts {0, 1}, math tokens two of {2..7}; independent of layer 3
    l5 = np.empty((T, K), dtype=np.int64)
    code = domain == "code"
    l5[code] = np.where(rng.random(code.sum())[:, None] < 0.5, [0, 1], [1, 0])
    l5[~code] = 2 + sample_topk(rng, np.full((int((~code).sum()), 6), 1 / 6), K)
    experts = {1: l1, 3: l3, 5: l5}
    probs = {layer: rng.dirichlet(np.ones(E), T) for layer in LAYERS}
    step = seq_id // 10
    phase = np.where(step < 5, "prefill", "decode")
    token_id = rng.integers(0, 30, T)
    return dict(
        experts=experts,
        probs=probs,
        seq_id=seq_id,
        pos=pos,
        domain=domain,
        step=step,
        phase=phase,
        token_id=token_id,
    )


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    data = plant()
    path = write_run(
        tmp_path_factory.mktemp("planted") / "run",
        data["experts"],
        E,
        seq_id=data["seq_id"],
        pos=data["pos"],
        token_id=data["token_id"],
        step=data["step"],
        phase=data["phase"],
        labels={"domain": data["domain"]},
        router_probs=data["probs"],
        num_hidden_layers=6,
        parts=3,
    )
    with rs.open_run(path) as run:
        yield run, data


def test_expert_load_matches_bincount_and_lists_every_expert(planted):
    run, data = planted
    df = run.expert_load()
    assert list(df.columns) == ["layer", "expert", "tokens", "share"]
    assert list(zip(df["layer"], df["expert"])) == [(layer, e) for layer in LAYERS for e in range(E)]
    for layer in LAYERS:
        expected = ref.load(data["experts"][layer], E)
        got = df[df["layer"] == layer]
        np.testing.assert_array_equal(got["tokens"], expected)
        np.testing.assert_allclose(got["share"], expected / expected.sum())
    assert df.loc[(df["layer"] == 1) & (df["expert"] == 7), "tokens"].item() == 0


@pytest.mark.slow
def test_balance_matches_reference(planted):
    run, data = planted
    df = run.balance()
    for col in [
        "layer",
        "num_experts",
        "tokens",
        "cv",
        "max_violation",
        "balancedness",
        "norm_entropy",
        "aux_loss",
    ]:
        assert col in df.columns
    assert df["layer"].tolist() == list(LAYERS)
    for row in df.itertuples():
        expected = ref.balance(data["experts"][row.layer], E)
        assert row.tokens == T and row.num_experts == E
        for key in ("cv", "max_violation", "balancedness", "norm_entropy"):
            assert getattr(row, key) == pytest.approx(expected[key], rel=1e-12), key
        assert row.aux_loss == pytest.approx(
            ref.aux_loss(data["probs"][row.layer], data["experts"][row.layer], E), rel=1e-9
        )


@pytest.mark.slow
def test_dead_experts_with_evidence(planted):
    run, _ = planted
    dead = run.dead_experts()
    assert dead[["layer", "expert"]].values.tolist() == [[1, 7]]
    row = dead.iloc[0]
    assert row["tokens"] == 0 and row["share"] == 0.0
    assert row["tokens_seen"] == T
    assert row["p_uniform_miss"] == pytest.approx((1 - K / E) ** T)
    # a looser threshold adds the experts under it, still sorted by (layer, expert)
    loose = run.dead_experts(max_share=0.05)
    load = run.expert_load()
    expected = load[load["share"] <= 0.05][["layer", "expert"]].values.tolist()
    assert loose[["layer", "expert"]].values.tolist() == expected


@pytest.mark.slow
def test_hot_experts(planted):
    run, _ = planted
    load = run.expert_load()
    for factor in (2.0, 1.5, 1.0):
        hot = run.hot_experts(factor=factor)
        expected = load[load["share"] >= factor / E]
        assert hot[["layer", "expert"]].values.tolist() == expected[["layer", "expert"]].values.tolist()
        np.testing.assert_allclose(hot["ratio"], expected["share"] * E)
    assert [1, 0] in run.hot_experts()[["layer", "expert"]].values.tolist()


@pytest.mark.slow
def test_coactivation_counts_all_ordered_pairs(planted):
    run, data = planted
    for layer in LAYERS:
        df = run.coactivation(layer)
        assert list(df.columns[:4]) == ["expert_a", "expert_b", "count", "p_b_given_a"]
        assert len(df) == E * (E - 1)
        expected = ref.coactivation(data["experts"][layer], E)
        loads = ref.load(data["experts"][layer], E)
        for row in df.itertuples():
            assert row.count == expected[row.expert_a, row.expert_b]
            if loads[row.expert_a]:
                assert row.p_b_given_a == pytest.approx(
                    expected[row.expert_a, row.expert_b] / loads[row.expert_a]
                )
            else:
                assert math.isnan(row.p_b_given_a)


@pytest.mark.slow
def test_entanglement_function_and_independent_pairs(planted):
    run, data = planted
    ent = run.entanglement()
    assert ent[["layer", "next_layer"]].values.tolist() == [[1, 3], [3, 5]]
    x = data["experts"]
    for row in ent.itertuples():
        table = ref.contingency(x[row.layer][:, 0], x[row.next_layer][:, 0], E, E)
        expected = ref.information(table)
        for key, value in expected.items():
            assert getattr(row, key) == pytest.approx(value, abs=1e-9), key
        assert row.tokens == T
    function_pair, independent_pair = ent.iloc[0], ent.iloc[1]
    assert function_pair["norm_mutual_info"] == pytest.approx(1.0)
    assert function_pair["top1_predictability"] == pytest.approx(1.0)
    assert function_pair["cond_entropy_bits"] == pytest.approx(0.0, abs=1e-9)
    assert function_pair["baseline_mutual_info_bits"] < 0.1 * function_pair["mutual_info_bits"]
    # independent: MI is what plug-in bias gives, i.e. close to the permutation baseline
    bias = (E - 1) * (E - 1) / (2 * T * math.log(2))
    assert independent_pair["mutual_info_bits"] < 3 * bias
    assert (
        abs(independent_pair["mutual_info_bits"] - independent_pair["baseline_mutual_info_bits"]) < 2 * bias
    )


@pytest.mark.slow
def test_entanglement_baseline_is_seeded(planted):
    run, _ = planted
    a, b = run.entanglement(seed=0), run.entanglement(seed=0)
    pd.testing.assert_frame_equal(a, b)
    c = run.entanglement(seed=1)
    assert not np.allclose(a["baseline_mutual_info_bits"], c["baseline_mutual_info_bits"])
    pd.testing.assert_frame_equal(
        a.drop(columns="baseline_mutual_info_bits"), c.drop(columns="baseline_mutual_info_bits")
    )


@pytest.mark.slow
def test_transition_full_matrix(planted):
    run, data = planted
    x = data["experts"]
    for a, b in ((1, 3), (1, 5), (5, 1)):
        df = run.transition(a, b)
        assert len(df) == E * E
        table = ref.contingency(x[a][:, 0], x[b][:, 0], E, E)
        np.testing.assert_array_equal(df["count"].to_numpy().reshape(E, E), table)
        rows = table.sum(1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            expected = np.where(rows > 0, table / rows, np.nan)
        np.testing.assert_allclose(df["p_b_given_a"].to_numpy().reshape(E, E), expected)
    t13 = run.transition(1, 3)
    used = t13[t13["count"] > 0]
    assert (used["expert_b"] == (3 * used["expert_a"] + 1) % E).all()


def test_pathways(planted):
    run, data = planted
    expected = ref.pathways(data["experts"])
    df = run.pathways(top=5)
    assert len(df) == 5
    assert df["count"].tolist() == sorted(df["count"], reverse=True)
    for row in df.itertuples():
        assert row.count == expected[tuple(row.path)]
        assert row.share == pytest.approx(row.count / T)
    assert df["count"].iloc[0] == max(expected.values())
    assert len(run.pathways(top=10_000)) == len(expected)


def test_specialization_known_lift(planted):
    run, data = planted
    spec = run.specialization(by="domain")
    assert list(spec.columns[:5]) == ["domain", "layer", "expert", "tokens", "share"]
    assert "lift" in spec.columns
    assert len(spec) == 2 * len(LAYERS) * E
    assert spec[["domain", "layer", "expert"]].values.tolist() == sorted(
        spec[["domain", "layer", "expert"]].values.tolist()
    )
    code5 = spec[(spec["domain"] == "code") & (spec["layer"] == 5)].set_index("expert")
    assert code5.loc[0, "lift"] == pytest.approx(4.0) and code5.loc[1, "lift"] == pytest.approx(4.0)
    assert (code5.loc[2:, "lift"] == 0).all()
    math5 = spec[(spec["domain"] == "math") & (spec["layer"] == 5)].set_index("expert")
    assert math5.loc[0, "tokens"] == 0 and math5.loc[1, "tokens"] == 0
    for (domain, layer), grp in spec.groupby(["domain", "layer"]):
        mask = data["domain"] == domain
        expected = ref.load(data["experts"][layer][mask], E)
        np.testing.assert_array_equal(grp["tokens"], expected)
        np.testing.assert_allclose(grp["lift"], expected / expected.sum() * E)


def test_vocab_specialization(planted):
    run, data = planted
    df = run.vocab_specialization()
    assert df[["layer", "token_id"]].values.tolist() == sorted(df[["layer", "token_id"]].values.tolist())
    # data order (seq_id, pos) is the row order of the planted arrays
    for layer in LAYERS:
        got = df[df["layer"] == layer].set_index("token_id")
        truth = ref.olmoe_vocab(data["token_id"].tolist(), data["experts"][layer])
        assert sorted(got.index) == sorted(truth)
        for tok, (top, share, occurrences, ties) in truth.items():
            assert got.loc[tok, "occurrences"] == occurrences
            assert got.loc[tok, "top_expert"] == top
            assert got.loc[tok, "top_share"] == pytest.approx(share)
            assert got.loc[tok, "ties"] == ties
            assert got.loc[tok, "baseline"] == pytest.approx(K / E)
    frequent = run.vocab_specialization(min_occurrences=80)
    assert (frequent["occurrences"] >= 80).all() and len(frequent) < len(df)


def test_vocab_specialization_ties_go_to_the_expert_seen_first(tmp_path):
    # token 5 meets expert 3 first, then expert 1, each twice: OLMoE keeps 3 (lowest id would give 1)
    experts = np.array([[3, 0], [1, 2], [1, 4], [3, 6]])
    path = write_run(tmp_path / "ties", {0: experts}, 8, token_id=np.array([5, 5, 5, 5]), seq_len=4)
    with rs.open_run(path) as run:
        row = run.vocab_specialization().iloc[0]
    assert (row.token_id, row.top_expert, row.ties, row.occurrences) == (5, 3, 2, 4)
    assert row.top_share == pytest.approx(0.5)


@pytest.mark.slow
def test_vocab_specialization_by_next_token(planted):
    run, data = planted
    df = run.vocab_specialization(by="next_token")
    # independent: each token's experts keyed by the id at pos + 1 of the same sequence
    nxt = {
        (s, p): t for s, p, t in zip(data["seq_id"].tolist(), data["pos"].tolist(), data["token_id"].tolist())
    }
    keys = [nxt.get((s, p + 1)) for s, p in zip(data["seq_id"].tolist(), data["pos"].tolist())]
    for layer in LAYERS:
        got = df[df["layer"] == layer].set_index("token_id")
        truth = ref.olmoe_vocab(keys, data["experts"][layer])
        assert sorted(got.index) == sorted(truth)
        for tok, (top, share, occurrences, ties) in truth.items():
            assert (got.loc[tok, "top_expert"], got.loc[tok, "occurrences"], got.loc[tok, "ties"]) == (
                top,
                occurrences,
                ties,
            )
            assert got.loc[tok, "top_share"] == pytest.approx(share)
    assert df.groupby("layer")["occurrences"].sum().tolist() == [T - T // SEQ_LEN] * len(LAYERS)
    filtered = run.vocab_specialization(by="next_token", min_occurrences=OLMOE_MIN_OCCURRENCES)
    assert (filtered["occurrences"] >= 10).all()
    with pytest.raises(ValueError, match="by must be one of"):
        run.vocab_specialization(by="prev_token")


@pytest.mark.slow
def test_token_specialization_is_olmoes_layer_average(planted):
    run, data = planted
    df = run.token_specialization(min_occurrences=OLMOE_MIN_OCCURRENCES).set_index("layer")
    nxt = {
        (s, p): t for s, p, t in zip(data["seq_id"].tolist(), data["pos"].tolist(), data["token_id"].tolist())
    }
    next_keys = [nxt.get((s, p + 1)) for s, p in zip(data["seq_id"].tolist(), data["pos"].tolist())]
    for layer in LAYERS:
        for keys, col, ids in (
            (data["token_id"].tolist(), "specialization", "token_ids"),
            (next_keys, "next_token_specialization", "next_token_ids"),
        ):
            truth = [v for v in ref.olmoe_vocab(keys, data["experts"][layer]).values() if v[2] >= 10]
            assert df.loc[layer, ids] == len(truth)
            assert df.loc[layer, col] == pytest.approx(np.mean([v[1] for v in truth]))
        assert df.loc[layer, "baseline"] == pytest.approx(K / E)
    # pigeonhole: the top expert takes at least k/E of a token id's slots
    assert (df["specialization"] >= df["baseline"] - 1e-12).all()


@pytest.mark.slow
def test_repetition_rate(planted):
    run, data = planted
    df = run.repetition_rate()
    assert df["layer"].tolist() == list(LAYERS)
    for row in df.itertuples():
        slot0 = data["experts"][row.layer][:, 0]
        pairs, repeats = ref.repetition(slot0, data["seq_id"], data["pos"])
        assert (row.pairs, row.repeats) == (pairs, repeats)
        assert row.repetition_rate == pytest.approx(repeats / pairs)
        assert row.baseline == pytest.approx(1 / E)
        p = ref.load(slot0, E) / T
        assert row.marginal_baseline == pytest.approx((p**2).sum())
        # Mixtral Table 5, "first or second choice"
        pairs2, hits2 = ref.repetition_top2(data["experts"][row.layer], data["seq_id"], data["pos"])
        assert row.repeats_top2 == hits2
        assert row.repetition_rate_top2 == pytest.approx(hits2 / pairs2)
        assert row.baseline_top2 == pytest.approx(1 - math.comb(E - 2, 2) / math.comb(E, 2))


@pytest.mark.slow
def test_repetition_top2_baseline_matches_random_routing(tmp_path):
    """Under uniform random top-2 routing the top-2 rate approaches 1 − C(E−2,2)/C(E,2)."""
    rng = np.random.default_rng(9)
    n, e = 20000, 6
    experts = np.array([rng.choice(e, 2, replace=False) for _ in range(n)])
    path = write_run(tmp_path / "uniform", {0: experts}, e, seq_len=100)
    with rs.open_run(path) as run:
        row = run.repetition_rate().iloc[0]
    assert row.baseline_top2 == pytest.approx(1 - 6 / 15)
    assert abs(row.repetition_rate_top2 - row.baseline_top2) < 0.02
    assert abs(row.repetition_rate - 1 / e) < 0.02


@pytest.mark.slow
def test_repetition_top2_is_nan_for_top1_routing(tmp_path):
    experts = np.random.default_rng(1).integers(0, 4, size=(200, 1))
    with rs.open_run(write_run(tmp_path / "top1", {0: experts}, 4, seq_len=20)) as run:
        row = run.repetition_rate().iloc[0]
    assert math.isnan(row.repetition_rate_top2) and math.isnan(row.baseline_top2)
    assert not math.isnan(row.repetition_rate)


@pytest.mark.slow
def test_where_selects_tokens_for_every_metric(planted):
    run, data = planted
    mask = (data["domain"] == "code") & (data["pos"] >= 3)
    where = "domain = 'code' AND pos >= 3"
    load = run.expert_load(where=where)
    for layer in LAYERS:
        np.testing.assert_array_equal(
            load[load["layer"] == layer]["tokens"], ref.load(data["experts"][layer][mask], E)
        )
    bal = run.balance(where=where)
    assert (bal["tokens"] == mask.sum()).all()
    assert bal["aux_loss"].isna().all()  # the filter splits forward steps
    ent = run.entanglement(where=where)
    table = ref.contingency(data["experts"][1][mask, 0], data["experts"][3][mask, 0], E, E)
    assert ent.iloc[0]["mutual_info_bits"] == pytest.approx(ref.information(table)["mutual_info_bits"])
    co = run.coactivation(5, where=where)
    np.testing.assert_array_equal(
        co["count"].to_numpy(), ref.coactivation(data["experts"][5][mask], E)[~np.eye(E, dtype=bool)]
    )
    rep = run.repetition_rate(where=where)
    pairs, repeats = ref.repetition(data["experts"][1][mask, 0], data["seq_id"][mask], data["pos"][mask])
    assert (rep.iloc[0]["pairs"], rep.iloc[0]["repeats"]) == (pairs, repeats)
    spec = run.specialization(by="domain", where=where)
    assert set(spec["domain"]) == {"code"}


@pytest.mark.slow
def test_aux_loss_over_whole_steps_only(planted):
    run, data = planted
    prefill = data["phase"] == "prefill"
    bal = run.balance(where="phase = 'prefill'")
    for row in bal.itertuples():
        expected = ref.aux_loss(data["probs"][row.layer][prefill], data["experts"][row.layer][prefill], E)
        assert row.aux_loss == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="forward step"):
        run.balance(where="pos < 5", aux_loss=True)
    assert "aux_loss" not in run.balance(aux_loss=False).columns


@pytest.mark.slow
def test_empty_selection(planted):
    run, _ = planted
    where = "token_id < 0"
    load = run.expert_load(where=where)
    assert len(load) == len(LAYERS) * E and (load["tokens"] == 0).all() and load["share"].isna().all()
    bal = run.balance(where=where)
    assert (bal["tokens"] == 0).all() and bal["cv"].isna().all()
    assert run.dead_experts(where=where).empty and run.hot_experts(where=where).empty
    ent = run.entanglement(where=where)
    assert ent[["layer", "next_layer"]].values.tolist() == [[1, 3], [3, 5]] and (ent["tokens"] == 0).all()
    assert run.pathways(where=where).empty


@pytest.mark.slow
def test_same_results_without_weights_and_in_one_part(planted, tmp_path):
    run, data = planted
    path = write_run(
        tmp_path / "noweights",
        data["experts"],
        E,
        seq_id=data["seq_id"],
        pos=data["pos"],
        token_id=data["token_id"],
        step=data["step"],
        phase=data["phase"],
        labels={"domain": data["domain"]},
        weights=False,
        num_hidden_layers=6,
    )
    with rs.open_run(path) as other:
        assert "weight" not in other.sql("SELECT * FROM routing LIMIT 1").columns
        pd.testing.assert_frame_equal(other.expert_load(), run.expert_load())
        pd.testing.assert_frame_equal(other.balance(), run.balance(aux_loss=False))
        pd.testing.assert_frame_equal(other.entanglement(), run.entanglement())
        pd.testing.assert_frame_equal(other.pathways(top=7), run.pathways(top=7))
        assert "aux_loss" not in other.balance().columns


@pytest.mark.slow
def test_cached_counts_follow_session_variables(planted):
    """The dashboard binds filter values through session variables: same text, other values."""
    run, data = planted
    where = "domain = getvariable('rs_test_domain')"
    run.sql("SET VARIABLE rs_test_domain = 'code'")
    code = run.expert_load(where=where)
    run.sql("SET VARIABLE rs_test_domain = 'math'")
    maths = run.expert_load(where=where)
    run.sql("RESET VARIABLE rs_test_domain")
    mask = data["domain"] == "math"
    np.testing.assert_array_equal(maths[maths["layer"] == 5]["tokens"], ref.load(data["experts"][5][mask], E))
    assert not code["tokens"].equals(maths["tokens"])


@pytest.mark.slow
def test_metrics_registry_runs_every_metric(planted):
    from routescope.analysis.metrics import METRICS

    run, _ = planted
    args = {"coactivation": (3,), "transition": (1, 3), "specialization": ("domain",)}
    for name, fn in METRICS.items():
        df = fn(run, *args.get(name, ()), where="phase = 'decode'")
        assert isinstance(df, pd.DataFrame) and not df.empty, name
        method = getattr(run, name)
        pd.testing.assert_frame_equal(method(*args.get(name, ()), where="phase = 'decode'"), df)


@pytest.mark.slow
def test_refresh_sees_new_parts(tmp_path):
    """Cached per-expert counts belong to the views' parts: refresh() picks up a new part."""
    rng = np.random.default_rng(5)
    first = {0: sample_topk(rng, np.full((50, 4), 0.25), 2)}
    path = write_run(tmp_path / "live", first, 4, complete=False)
    more = write_run(
        tmp_path / "more",
        {0: sample_topk(rng, np.full((30, 4), 0.25), 2)},
        4,
        seq_id=np.full(30, 99),
        pos=np.arange(30),
    )
    with rs.open_run(path) as run:
        assert run.balance()["tokens"].item() == 50
        for table in ("tokens", "routing"):
            (more / table / "rank=0" / "part-00000.parquet").rename(
                path / table / "rank=0" / "part-00001.parquet"
            )
        assert run.balance()["tokens"].item() == 50  # the views are a snapshot until refresh()
        run.refresh()
        assert run.balance()["tokens"].item() == 80
        assert run.expert_load()["tokens"].sum() == 160

"""run.doctor() and `routescope doctor` (SPEC 4.8): one test per finding, planted on synthetic runs
(tests/synthetic.py) and on a tiny model; a run uniform by construction is healthy."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import routescope as rs
from routescope.analysis.doctor import exit_code, group_findings, verdict
from routescope.analysis.doctor_rules import diversity, gini
from routescope.analysis.querying import query
from routescope.cli import main
from tests.synthetic import sample_topk, write_run
from tests.tiny_models import build_tiny_model

E, K = 8, 2


def uniform(rng: np.random.Generator, tokens: int, num_experts: int = E, k: int = K) -> np.ndarray:
    return sample_topk(rng, np.full((tokens, num_experts), 1.0 / num_experts), k)


def serious(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["severity"].isin(["warning", "critical"])]


def rows(df: pd.DataFrame, name: str) -> pd.DataFrame:
    return df[(df["finding"] == name) & (df["severity"] != "ok")]


def edit_manifest(path, **changes) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.slow
@pytest.mark.parametrize("seed, num_experts, k, layers", [(0, 8, 2, 3), (1, 64, 8, 4), (2, 16, 1, 2)])
def test_a_uniform_run_is_healthy(tmp_path, seed, num_experts, k, layers):
    """Routing uniform by construction, over many steps, with router margins: nothing above info."""
    rng = np.random.default_rng(seed)
    tokens = 6000
    experts = {layer: uniform(rng, tokens, num_experts, k) for layer in range(layers)}
    probs = {layer: rng.dirichlet(np.ones(num_experts), size=tokens) for layer in experts}
    path = write_run(
        tmp_path / "u", experts, num_experts, seq_len=60, step=np.arange(tokens) // 500, router_probs=probs
    )
    edit_manifest(path, verified=True)
    with rs.open_run(path) as run:
        df = run.doctor()
    assert serious(df).empty, serious(df)[["finding", "evidence"]].to_string()
    assert verdict(df)["severity"] in ("ok", "info")
    assert exit_code(df) == 0
    # every check that ran says so: ok rows name what was checked
    assert {"dead_expert", "hot_expert", "layer_collapse", "routing_drift", "damaged_run"} <= set(
        df.loc[df["severity"] == "ok", "finding"]
    )


def test_dead_expert_from_the_first_step_with_the_miss_probability(tmp_path):
    rng = np.random.default_rng(0)
    tokens = 2000
    chosen = uniform(rng, tokens)
    probs = np.full((tokens, E), 1.0 / E)
    probs[:, 3] = 0  # expert 3 of layer 1 never chosen
    layer1 = sample_topk(rng, probs / probs.sum(1, keepdims=True), K)
    path = write_run(tmp_path / "d", {0: chosen, 1: layer1}, E, step=np.arange(tokens) // 500 + 5)
    with rs.open_run(path) as run:
        df = run.doctor()
    dead = rows(df, "dead_expert")
    assert list(zip(dead["layer"], dead["expert"])) == [(1, 3)]
    row = dead.iloc[0]
    # 1 of 8 experts dead is 12.5 %, outside Megatron's 0-5 % band: critical
    assert row["severity"] == "critical" and row["step"] == 5  # dead from the first recorded step
    p_miss = (1 - K / E) ** tokens
    assert f"{p_miss:.2g}" in row["evidence"] and "dead from step 5" in row["evidence"]
    assert exit_code(df) == 3
    with rs.open_run(path) as run:
        shown = run.sql(row["sql"])  # the query the finding hands over shows the dead expert missing
    assert 3 not in set(shown["expert"]) and len(shown) == E - 1


def test_a_dead_expert_on_too_few_tokens_is_only_info(tmp_path):
    """(1 - 2/8)^10 = 0.056: no evidence, so the finding says so and stays info."""
    chosen = np.array([[0, 1], [1, 2], [2, 0]] * 3 + [[0, 1]])  # experts 3..7 unused, 10 tokens
    path = write_run(tmp_path / "few", {0: chosen}, E)
    with rs.open_run(path) as run:
        dead = rows(run.doctor(), "dead_expert")
    assert len(dead) == 5 and set(dead["severity"]) == {"info"}
    assert "too few tokens to tell" in dead.iloc[0]["evidence"]


def test_hot_expert_and_imbalanced_layer(tmp_path):
    rng = np.random.default_rng(1)
    tokens = 4000
    probs = np.full(E, 1.0)
    probs[0] = 6.0  # expert 0 chosen far more often
    skewed = sample_topk(rng, np.tile(probs / probs.sum(), (tokens, 1)), K)
    path = write_run(tmp_path / "h", {0: uniform(rng, tokens), 1: skewed}, E)
    with rs.open_run(path) as run:
        df = run.doctor()
        load = run.expert_load()
    hot = rows(df, "hot_expert")
    assert list(zip(hot["layer"], hot["expert"])) == [(1, 0)]
    share = load[(load["layer"] == 1) & (load["expert"] == 0)]["share"].iloc[0]
    assert f"share {share:.4f}" in hot.iloc[0]["evidence"] and hot.iloc[0]["severity"] == "warning"
    imbalance = rows(df, "layer_imbalance")
    assert list(imbalance["layer"]) == [1]
    loads = load[load["layer"] == 1]["tokens"].to_numpy()
    assert f"Gini {gini(loads):.3f}" in imbalance.iloc[0]["evidence"]
    assert exit_code(df) == 1


def test_collapsed_layer_is_critical(tmp_path):
    rng = np.random.default_rng(2)
    tokens = 3000
    collapsed = np.tile([[0, 1]], (tokens, 1))
    collapsed[:50] = uniform(rng, 50)  # a few tokens elsewhere: no expert has to be dead to collapse
    path = write_run(tmp_path / "c", {0: uniform(rng, tokens), 1: collapsed}, E)
    with rs.open_run(path) as run:
        df = run.doctor()
        loads = run.expert_load().query("layer == 1")["tokens"].to_numpy()
    collapse = rows(df, "layer_collapse")
    assert list(collapse["layer"]) == [1] and collapse.iloc[0]["severity"] == "critical"
    assert f"{diversity(loads):.3f}" in collapse.iloc[0]["evidence"]
    assert df.iloc[0]["severity"] == "critical"  # most severe first


def test_drift_names_the_step_an_expert_dies_and_a_layer_collapses(tmp_path):
    rng = np.random.default_rng(3)
    per_step, steps = 400, 8
    tokens = per_step * steps
    step = np.arange(tokens) // per_step
    dying = uniform(rng, tokens)
    without_5 = np.full(E, 1.0 / (E - 1))
    without_5[5] = 0
    late = step >= 4
    dying[late] = sample_topk(rng, np.tile(without_5, (int(late.sum()), 1)), K)  # expert 5 dies at step 4
    collapsing = uniform(rng, tokens)
    skew = np.array([8.0, 4.0, 1, 1, 1, 1, 1, 1])
    after6 = step >= 6
    collapsing[after6] = sample_topk(rng, np.tile(skew / skew.sum(), (int(after6.sum()), 1)), K)
    path = write_run(tmp_path / "drift", {0: dying, 1: collapsing, 2: uniform(rng, tokens)}, E, step=step)
    with rs.open_run(path) as run:
        df = run.doctor()
        drift = rows(df, "routing_drift")
        died = drift[drift["expert"].notna()]
        assert list(zip(died["layer"], died["expert"], died["step"])) == [(0, 5, 4)]
        assert "died at step 4" in died.iloc[0]["evidence"]
        per_step_rows = run.sql(died.iloc[0]["sql"])
        assert (per_step_rows.loc[per_step_rows["step"] >= 4, "slots"] == 0).all()
    changed = drift[drift["expert"].isna()]
    assert list(zip(changed["layer"], changed["step"])) == [(1, 6)]
    assert changed.iloc[0]["severity"] == "warning" and "worsens at step 6" in changed.iloc[0]["evidence"]
    assert 2 not in set(drift["layer"])


def test_near_ties_from_router_margins(tmp_path):
    rng = np.random.default_rng(4)
    tokens = 1000
    chosen = uniform(rng, tokens)
    probs = {}
    for layer, tie_share in ((0, 0.0), (1, 0.8)):
        p = rng.dirichlet(np.ones(E), size=tokens)
        tied = rng.random(tokens) < tie_share
        top = np.argsort(-p, axis=1)
        first, second = top[:, 0], top[:, 1]
        idx = np.flatnonzero(tied)
        mean = (p[idx, first[idx]] + p[idx, second[idx]]) / 2
        p[idx, first[idx]], p[idx, second[idx]] = mean + 1e-4, mean - 1e-4
        probs[layer] = p
    path = write_run(tmp_path / "t", {0: chosen, 1: chosen}, E, router_probs=probs)
    with rs.open_run(path) as run:
        df = run.doctor()
        ties = rows(df, "near_ties")
        warn = ties[ties["severity"] == "warning"]
        assert list(warn["layer"]) == [1]
        margins = run.sql("SELECT margin FROM router_tokens WHERE layer = 1")["margin"]
        count = int((margins < 2**-7).sum())
        assert f"{count:,} of {tokens:,} tokens" in warn.iloc[0]["evidence"]
        assert len(run.sql(warn.iloc[0]["sql"])) == min(count, 100)
    assert set(ties.loc[ties["layer"] == 0, "severity"]) <= {"info"}


def test_near_ties_say_when_margins_were_not_recorded(tmp_path):
    path = write_run(tmp_path / "n", {0: uniform(np.random.default_rng(5), 500)}, E)
    with rs.open_run(path) as run:
        ties = rows(run.doctor(), "near_ties")
    assert list(ties["severity"]) == ["info"] and "router_stats=True" in ties.iloc[0]["suggestion"]


def test_capacity_drops_are_slots_recorded_with_weight_zero(tmp_path):
    rng = np.random.default_rng(6)
    tokens = 1000
    chosen = uniform(rng, tokens)
    weights = np.full((tokens, K), 0.5, dtype=np.float32)
    weights[:100, 1] = 0.0  # 100 of 2000 slots dropped: 5 %
    path = write_run(
        tmp_path / "cap", {0: chosen, 1: chosen}, E, weights={0: np.full((tokens, K), 0.5), 1: weights}
    )
    with rs.open_run(path) as run:
        df = run.doctor()
        drops = rows(df, "capacity_drops")
        assert list(drops["layer"]) == [1] and drops.iloc[0]["severity"] == "warning"
        assert "100 of 2,000 routing slots (5.00%)" in drops.iloc[0]["evidence"]
        assert len(run.sql(drops.iloc[0]["sql"])) == 100
        wheres = ["phase = 'prefill'", "pos < 500"]  # a rollup dimension, and not one
        routing_only = [query(run, "doctor_capacity_drops", where=w, uses=("expert_counts",)) for w in wheres]
        run.build_rollups()  # slots then come from rollup_expert_counts: the same numbers
        assert "rollup_expert_counts" in run.rollups
        again = rows(run.doctor(), "capacity_drops")
        assert list(again["evidence"]) == list(drops["evidence"])
        for where, expected in zip(wheres, routing_only, strict=True):
            got = query(run, "doctor_capacity_drops", where=where, uses=("expert_counts",))
            pd.testing.assert_frame_equal(got, expected)
        assert list(routing_only[1]["dropped"]) == [0, 100] and list(routing_only[1]["slots"]) == [1000, 1000]
    positive = write_run(
        tmp_path / "pos", {0: chosen, 1: chosen}, E, weights={0: weights + 0.1, 1: weights + 0.1}
    )
    with rs.open_run(positive) as run:
        assert rows(run.doctor(), "capacity_drops").empty
        drops = query(run, "doctor_capacity_drops", where=None, uses=("expert_counts",))
        assert list(drops["slots"]) == [2 * tokens, 2 * tokens] and not drops["dropped"].any()
    unweighted = write_run(tmp_path / "now", {0: chosen}, E, weights=False)
    with rs.open_run(unweighted) as run:
        note = rows(run.doctor(), "capacity_drops")
    assert list(note["severity"]) == ["info"] and "not measured" in note.iloc[0]["evidence"]


def test_super_experts_from_the_calibration_table(tmp_path):
    rng = np.random.default_rng(7)
    acts = []
    for layer in range(4):
        for expert in range(E):
            acts.append((layer, expert, False, float(rng.uniform(0.5, 2.0)), 3, 100))
    acts[1 * E + 6] = (1, 6, False, 5000.0, 17, 100)  # layer 1 expert 6: a Super Expert
    table = pd.DataFrame(
        acts, columns=["layer", "expert", "shared", "max_abs_output", "channel", "tokens_seen"]
    )
    experts = {layer: uniform(rng, 500) for layer in range(4)}
    path = write_run(
        tmp_path / "s",
        experts,
        E,
        num_hidden_layers=4,
        extra_tables={"expert_activations": {c: table[c].to_numpy() for c in table.columns}},
    )
    with rs.open_run(path) as run:
        df = run.doctor()
        supers = rows(df, "super_experts")
        assert list(zip(supers["layer"], supers["expert"])) == [(1, 6)]
        assert set(supers["severity"]) == {"info"} and "channel 17" in supers.iloc[0]["evidence"]
        assert run.sql(supers.iloc[0]["sql"]).iloc[0]["max_abs_output"] == 5000.0


def test_unverified_model_and_damaged_runs(tmp_path):
    rng = np.random.default_rng(8)
    path = write_run(tmp_path / "v", {0: uniform(rng, 800)}, E)
    edit_manifest(
        path,
        verified=False,
        unverified_reason="transformers 9.9 is not verified",
        versions={"transformers": "9.9"},
    )
    with rs.open_run(path) as run:
        df = run.doctor()
    unverified = rows(df, "unverified_model")
    assert (
        list(unverified["severity"]) == ["warning"]
        and "9.9 is not verified" in unverified.iloc[0]["evidence"]
    )
    edit_manifest(path, verified=True, tokens=900)  # the manifest counts 100 tokens the parts lack
    with rs.open_run(path) as run:
        df = run.doctor()
    damaged = rows(df, "damaged_run")
    assert list(damaged["severity"]) == ["critical"] and "900" in damaged.iloc[0]["evidence"]
    assert "800" in damaged.iloc[0]["evidence"] and rows(df, "unverified_model").empty
    edit_manifest(path, tokens=800, complete=False, skipped={"tokens_lost_on_writer_error": 12})
    with rs.open_run(path) as run:
        df = run.doctor()
    assert list(rows(df, "incomplete_run")["severity"]) == ["warning"]
    assert "tokens_lost_on_writer_error = 12" in rows(df, "unrecorded_work").iloc[0]["evidence"]


def test_where_thresholds_and_grouping(tmp_path):
    rng = np.random.default_rng(9)
    tokens = 2000
    probs = np.full((tokens, E), 1.0 / E)
    probs[:, 2] = 0
    chosen = uniform(rng, tokens)
    half = np.arange(tokens) >= tokens // 2
    chosen[half] = sample_topk(rng, (probs / probs.sum(1, keepdims=True))[half], K)
    path = write_run(tmp_path / "w", {0: chosen}, E, phase=np.where(half, "decode", "prefill").tolist())
    with rs.open_run(path) as run:
        assert rows(run.doctor(), "dead_expert").empty  # alive in prefill
        assert list(rows(run.doctor(where="phase = 'decode'"), "dead_expert")["expert"]) == [2]
        strict = run.doctor(where="phase = 'decode'", thresholds=rs.DoctorThresholds(alpha=1e-300))
        assert set(rows(strict, "dead_expert")["severity"]) == {"info"}  # the bar is a parameter
        with pytest.raises(ValueError, match="alpha"):
            rs.DoctorThresholds(alpha=0)
        with pytest.raises(ValueError, match="invalid where"):
            run.doctor(where="no_such_column = 1")
        groups = group_findings(run.doctor(where="phase = 'decode'"))
    assert groups.iloc[0]["finding"] == "dead_expert" and groups.iloc[0]["count"] == 1


# -- the command ----------------------------------------------------------------------------
@pytest.mark.slow
def test_doctor_command_exit_codes_and_json(tmp_path, capsys):
    rng = np.random.default_rng(10)
    healthy = write_run(tmp_path / "ok", {0: uniform(rng, 2000)}, E)
    edit_manifest(healthy, verified=True)
    assert main(["doctor", str(healthy)]) == 0
    assert "DOCTOR healthy" in capsys.readouterr().out
    probs = np.full(E, 1.0)
    probs[0] = 6.0
    hot = write_run(tmp_path / "hot", {0: sample_topk(rng, np.tile(probs / probs.sum(), (3000, 1)), K)}, E)
    edit_manifest(hot, verified=True)
    assert main(["doctor", str(hot)]) == 1
    assert "DOCTOR warning" in capsys.readouterr().out
    dead = write_run(tmp_path / "dead", {0: np.tile([[0, 1], [2, 3]], (1000, 1))}, E)
    assert main(["doctor", str(dead), "--json"]) == 3
    doc = json.loads(capsys.readouterr().out)
    assert doc["verdict"]["severity"] == "critical"
    assert {f["finding"] for f in doc["findings"] if f["severity"] == "critical"} >= {"dead_expert"}
    assert all(
        set(f) >= {"severity", "finding", "layer", "expert", "step", "evidence", "sql", "suggestion"}
        for f in doc["findings"]
    )
    capsys.readouterr()
    assert main(["doctor", str(tmp_path / "missing")]) == 2
    assert main(["doctor", str(dead), "--threshold", "alpha=zero"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "alpha=zero" in err[-1]
    # overrides reach the rules: with no evidence bar met, the dead experts are info; the hot
    # ones (2x uniform over 2000 tokens: p underflows to 0) still warn
    argv = ["doctor", str(dead), "--threshold", "alpha=1e-300", "--json"]
    assert main(argv) == 1
    doc = json.loads(capsys.readouterr().out)
    assert {f["severity"] for f in doc["findings"] if f["finding"] == "dead_expert"} == {"info"}


# -- a tiny model --------------------------------------------------------------------------
def record_tiny(path, ban_from_step: int | None = None, steps: int = 8):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_tiny_model("qwen3_moe", seed=0).eval()
    generator = torch.Generator().manual_seed(0)
    with rs.record(model, path, router_stats=True):
        for step in range(steps):
            ids = torch.randint(1, 128, (8, 32), generator=generator)
            with torch.no_grad():
                if ban_from_step is not None and step >= ban_from_step:
                    with rs.ban_experts(model, {1: [2]}):
                        model(input_ids=ids)
                else:
                    model(input_ids=ids)
    return rs.open_run(path)


@pytest.mark.slow
def test_a_tiny_model_is_healthy_and_a_banned_expert_is_found(tmp_path):
    with record_tiny(tmp_path / "clean") as run:
        clean = run.doctor()
    assert serious(clean).empty, serious(clean)[["finding", "evidence"]].to_string()
    assert run.manifest["verified"] is True and rows(clean, "unverified_model").empty
    with record_tiny(tmp_path / "banned", ban_from_step=0) as run:
        dead = rows(run.doctor(), "dead_expert")
    assert list(zip(dead["layer"], dead["expert"], dead["step"])) == [(1, 2, 0)]
    assert set(dead["severity"]) == {"critical"}
    with record_tiny(tmp_path / "late", ban_from_step=5) as run:
        drift = rows(run.doctor(), "routing_drift")
    died = drift[drift["expert"].notna()]
    assert list(zip(died["layer"], died["expert"], died["step"])) == [(1, 2, 5)]


@pytest.mark.slow
def test_report_starts_with_the_verdict(tmp_path, capsys):
    dead = write_run(tmp_path / "dead", {0: np.tile([[0, 1], [2, 3]], (1000, 1))}, E)
    assert main(["report", str(dead)]) == 0
    out = capsys.readouterr().out
    assert out.index("DOCTOR critical") < out.index("Balance per MoE layer")
    assert main(["report", str(dead), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["doctor"]["verdict"]["severity"] == "critical"
    assert doc["doctor"]["groups"][0]["finding"] == "dead_expert"
    html_path = tmp_path / "r.html"
    assert main(["report", str(dead), "--html", str(html_path)]) == 0
    text = html_path.read_text()
    assert text.index("id='doctor-verdict'") < text.index("<h2>Figures</h2>")


@pytest.mark.slow
def test_the_evidence_bar_equals_scipy_stats():
    """The doctor computes its tails with scipy.special (light to import); scipy.stats is the reference."""
    from scipy import stats

    from routescope.analysis.doctor_rules import change_p_value, hot_tail_probability, uniformity_p_value

    for tokens, k, num_experts in [(100, 2, 8), (5000, 8, 128), (37, 1, 4)]:
        loads = np.arange(0, tokens + 3)
        ours = hot_tail_probability(loads, tokens, k, num_experts)
        assert np.allclose(ours, stats.binom.sf(loads - 1, tokens, k / num_experts), rtol=1e-12, atol=0)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 100, 20).astype(float), rng.integers(1, 100, 20).astype(float)
    assert uniformity_p_value(a, 2) == pytest.approx(stats.chisquare(a).pvalue, rel=1e-9)
    reference = stats.chi2_contingency(np.vstack([a, b]), correction=False)[1]
    assert change_p_value(a, b) == pytest.approx(reference, rel=1e-9)


@pytest.mark.parametrize("decode", [False, True])
def test_step_loads_equal_the_metric(tmp_path, decode):
    """The doctor's join by sequence (prefill-only runs) gives metrics.step_expert_loads' counts;
    a run whose sequences span steps takes the metric itself."""
    from routescope.analysis import metrics
    from routescope.analysis.doctor import step_loads

    rng = np.random.default_rng(11)
    tokens = 1200
    seq_len = 40
    step = np.arange(tokens) // 200 if not decode else np.arange(tokens) % seq_len // 10
    path = write_run(
        tmp_path / "s", {0: uniform(rng, tokens), 3: uniform(rng, tokens)}, E, seq_len=seq_len, step=step
    )
    with rs.open_run(path) as run:
        ours = step_loads(run, None).reset_index(drop=True)
        reference = metrics.step_expert_loads(run).reset_index(drop=True)
        fast = (
            int(
                run.sql(
                    "SELECT count(*) AS n FROM (SELECT seq_id FROM tokens GROUP BY seq_id HAVING min(step) <> max(step))"
                )["n"].iloc[0]
            )
            == 0
        )
    assert fast is not decode
    pd.testing.assert_frame_equal(ours, reference, check_dtype=False)


# -- more findings planted on tiny models ---------------------------------------------------
def tiny_qwen(seed: int = 0) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_tiny_model("qwen3_moe", seed=seed).eval()


def record_batches(model, path, steps: int = 6, **options):
    generator = torch.Generator().manual_seed(0)
    with rs.record(model, path, **options), torch.no_grad():
        for _ in range(steps):
            model(input_ids=torch.randint(1, 128, (8, 32), generator=generator))
    return rs.open_run(path)


def test_a_tiny_model_routed_to_two_experts_collapses(tmp_path):
    """Experts 0 and 1 of layer 1 banned: every token takes 2 and 3 (k = 2 of 4)."""
    model = tiny_qwen()
    with rs.ban_experts(model, {1: [0, 1]}):
        run = record_batches(model, tmp_path / "run")
    with run:
        df = run.doctor()
    assert list(rows(df, "layer_collapse")["layer"]) == [1]
    assert set(zip(rows(df, "dead_expert")["layer"], rows(df, "dead_expert")["expert"])) == {(1, 0), (1, 1)}
    hot = rows(df, "hot_expert")
    assert set(zip(hot["layer"], hot["expert"])) == {(1, 2), (1, 3)}  # each takes 2x its fair share
    assert exit_code(df) == 3


def test_a_tiny_model_whose_router_barely_separates_has_near_ties(tmp_path):
    model = tiny_qwen()
    with torch.no_grad():
        model.model.layers[0].mlp.gate.weight.mul_(1e-4)  # logits ~0: top-1 and top-2 within bf16's step
    with record_batches(model, tmp_path / "run", router_stats=True) as run:
        ties = rows(run.doctor(), "near_ties")
    assert list(ties.loc[ties["severity"] == "warning", "layer"]) == [0]


@pytest.mark.slow
def test_a_tiny_model_with_a_planted_super_expert(tmp_path):
    model = tiny_qwen()
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[1].mul_(1e4)  # expert 1 of layer 0: massive outputs
    generator = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(1, 128, (4, 16), generator=generator)} for _ in range(2)]
    with record_batches(model, tmp_path / "run") as run:
        pass
    rs.find_super_experts(model, batches, out=tmp_path / "run", progress=False)
    with rs.open_run(tmp_path / "run") as run:
        supers = rows(run.doctor(), "super_experts")
    assert (0, 1) in set(zip(supers["layer"], supers["expert"]))
    assert set(supers["severity"]) == {"info"}


def test_switch_capacity_drops_on_a_tiny_model(tmp_path):
    """Switch Transformers with expert capacity 1: the dropped slots are recorded with weight 0."""
    from tests.tiny_models import build_tiny_seq2seq_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_tiny_seq2seq_model("switch_transformers", expert_capacity=1).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 100, (2, 7), generator=generator)
    with rs.record(model, tmp_path / "run"), torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=ids[:, :4])
    with rs.open_run(tmp_path / "run") as run:
        drops = rows(run.doctor(), "capacity_drops")
        zero = run.sql("SELECT layer, count(*) AS n FROM routing WHERE weight = 0 GROUP BY layer")
    assert len(drops) and set(drops["layer"]) == set(zero["layer"])
    for row in drops.itertuples(index=False):
        assert f"{int(zero.loc[zero['layer'] == row.layer, 'n'].iloc[0]):,} of" in row.evidence


def test_a_counts_only_import_gets_the_load_findings(tmp_path):
    """An SGLang `stat` import holds per-expert counts per step: dead, hot and drift findings
    work on them; margins and weights it does not have are "not measured"."""
    from routescope.importers import ImportedRun, counts_to_table, write_imported_run

    layers, steps = [1, 3], 6
    counts = np.zeros((steps, len(layers), E), dtype=np.int64)
    rng = np.random.default_rng(12)
    for s in range(steps):
        counts[s, 0] = rng.multinomial(400 * K, np.ones(E) / E)
        probs = np.ones(E)
        probs[4] = 0.0  # expert 4 of layer 3 never chosen
        counts[s, 1] = rng.multinomial(400 * K, probs / probs.sum())
    imported = ImportedRun(
        engine="sglang",
        mode="stat",
        num_hidden_layers=4,
        num_experts={layer: E for layer in layers},
        top_k={layer: K for layer in layers},
        expert_counts=counts_to_table(counts, layers),
    )
    path = write_imported_run(imported, tmp_path / "run")
    with rs.open_run(path) as run:
        df = run.doctor()
    dead = rows(df, "dead_expert")
    assert list(zip(dead["layer"], dead["expert"], dead["step"])) == [(3, 4, 0)]
    assert "not measured" in rows(df, "near_ties").iloc[0]["evidence"]
    assert "not measured" in rows(df, "capacity_drops").iloc[0]["evidence"]


def test_balance_change_split_equals_a_scan_of_every_split():
    """doctor_drift picks the split of largest |cv after − cv before| over all splits at once;
    it must be the split (and cv change) a plain scan with `cv` finds, first one on ties."""
    from routescope.analysis.doctor_drift import _balance_change
    from routescope.analysis.doctor_rules import DoctorThresholds, cv

    rng = np.random.default_rng(11)
    th = DoctorThresholds()
    found = 0
    for trial in range(30):
        steps = np.arange(40)
        change = int(rng.integers(5, 35))
        matrix = rng.poisson(50, (40, 16)).astype(float)
        matrix[change:, : int(rng.integers(1, 8))] *= rng.uniform(0.2, 3.0)  # some layers change
        if trial % 5 == 0:
            matrix[:, :] = 10.0  # no change at all: every delta is 0
        cumulative, m = np.cumsum(matrix, axis=0), int(th.drift_min_steps)
        best, best_delta = None, 0.0
        for i in range(m, len(steps) - m + 1):
            delta = cv(cumulative[-1] - cumulative[i - 1]) - cv(cumulative[i - 1])
            if np.isfinite(delta) and abs(delta) > abs(best_delta):
                best, best_delta = i, delta
        got = _balance_change(0, steps, matrix, 2, th, 1, lambda *a, **k: "")
        if best is None or abs(best_delta) < th.cv_band:
            assert got == []
            continue
        if got:  # a finding also needs the change to pass the chance test
            found += 1
            assert got[0]["step"] == best and f"{cv(cumulative[best - 1]):.3f}" in got[0]["evidence"]
    assert found >= 5

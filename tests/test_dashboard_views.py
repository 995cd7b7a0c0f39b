"""The dashboard's answers to the questions users bring (issue 15): units, balance metrics
on their own axes, dead experts visible, the Time page, ranks, state in the URL, lift of
an expert's tokens, small-sample warnings (the other pages: test_dashboard_pages.py).
Callbacks are called directly with values on runs recorded from a real model, and checked
against the Run API or plain SQL."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import routescope as rs
from tests.test_dashboard import record_demo_run, texts, traces_with_data

RANK_OFFSET = 1 << 40  # seq ids of rank 1, as the recorder assigns them


def add_second_rank(run_dir: Path) -> None:
    """Copy rank 0's parts to rank 1 with seq ids moved by the rank offset: a two-rank run
    whose ranks routed the same tokens the same way."""
    for table in ("tokens", "routing"):
        for part in sorted((run_dir / table / "rank=0").glob("part-*.parquet")):
            data = pq.read_table(part)
            data = data.set_column(
                data.schema.get_field_index("seq_id"),
                "seq_id",
                pc.add(data["seq_id"], pa_scalar(RANK_OFFSET)),
            )
            target = run_dir / table / "rank=1"
            target.mkdir(parents=True, exist_ok=True)
            pq.write_table(data, target / part.name)


def pa_scalar(value: int):
    import pyarrow as pa

    return pa.scalar(value, pa.int64())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("views")
    a = record_demo_run(root / "run_a", seed=0)
    two = root / "two_ranks"
    shutil.copytree(a, two)
    add_second_rank(two)
    return {"a": a, "two": two}


@pytest.fixture(scope="module")
def app(runs):
    from routescope.dashboard.app import create_app

    return create_app([runs["a"], runs["two"]])


A, TWO = ({"run": key, "version": None} for key in ("0", "1"))


# -- units -------------------------------------------------------------------------------
@pytest.mark.slow
def test_cards_and_notes_count_tokens_and_slots_apart(app, runs):
    from routescope.dashboard.pages import load, overview

    run = rs.open_run(runs["a"])
    health = overview.update_overview(A)[1].children[0].figure.data[0]
    column = list(health.x).index("tokens")
    tokens = int(run.sql("SELECT count(*) AS n FROM tokens")["n"][0])
    assert [row[column] for row in health.text] == [f"{tokens:,}"] * len(run.moe_layers)  # tokens, not slots
    k = run.top_k(run.moe_layers[0])
    note = load.update_load(A, "all", None, None, None, "lift", None, None)[5]
    assert f"{tokens:,} tokens, {tokens * k:,} routing slots (k = {k})" in note


# -- balance metrics on separate axes ----------------------------------------------------
@pytest.mark.slow
def test_balance_metrics_each_have_their_own_axis(app):
    from routescope.dashboard.pages import compare, overview

    fig = overview.update_overview(A)[2]
    axes = {trace.yaxis for trace in fig.data}
    assert len(axes) == 4 and {trace.name or trace.hovertemplate.split(" ")[0] for trace in fig.data}
    assert [t.hovertemplate.split(" ")[0] for t in fig.data] == [
        "cv",
        "max_violation",
        "balancedness",
        "norm_entropy",
    ]
    _d, both, *_ = compare.update_compare(A, "0", "1")
    assert len({trace.yaxis for trace in both.data}) == 4 and traces_with_data(both) == 8


# -- dead and near-dead experts ----------------------------------------------------------
@pytest.mark.slow
def test_dead_and_near_dead_experts_are_marked_in_figures():
    from routescope import plots

    tokens = [0, 3, 400, 397, 100, 100, 100, 100]
    load = pd.DataFrame({"layer": [0] * 4 + [1] * 4, "expert": [0, 1, 2, 3] * 2, "tokens": tokens})
    load["share"] = load["tokens"] / load.groupby("layer")["tokens"].transform("sum")
    for value in ("lift", "share"):
        heat = plots.load_heatmap(load, value=value)
        z = np.array(heat.data[0].z, dtype=float)
        assert np.isnan(z[0, 0]) and not np.isnan(z[0, 1])  # the dead cell is left to the black background
        marks = {t.name: (list(t.x), list(t.y)) for t in heat.data[1:] if t.x[0] is not None}
        legend = {t.name for t in heat.data[1:] if t.showlegend is not False}
        assert legend == set(marks)  # each kind of mark has one (dark) legend entry
        assert marks["dead (no token)"] == ([0], ["L0"])
        assert marks["near-dead (≤ 0.1 × uniform)"] == ([1], ["L0"])
    bars = plots.expert_bars(load, 0)
    names = [t.name for t in bars.data]
    assert "dead (1): no token" in names and any(n and n.startswith("near-dead (1)") for n in names)
    assert list(bars.data[0].marker.color)[:2] == [
        plots.STATE_COLORS["dead"],
        plots.STATE_COLORS["near-dead"],
    ]
    assert plots.expert_bars(load, 1).data[1:] == ()


@pytest.mark.slow
def test_a_dead_expert_reads_as_dead_in_details_and_alerts(app, runs):
    from routescope.dashboard.pages import load, overview

    run = rs.open_run(runs["a"])
    decode = run.expert_load(where="phase = 'decode'")
    dead = decode[decode["tokens"] == 0].iloc[0]
    click = {"points": [{"x": int(dead["expert"]), "y": f"L{int(dead['layer'])}"}]}
    text = texts(load.show_expert(A, click, "decode", None, None, None, None))
    assert "Dead under this filter" in text and "nan" not in text
    alerts = texts(overview.update_overview(A)[3])
    findings = run.doctor()
    shown = findings[findings["severity"] != "ok"]
    for row in shown.head(overview.TOP_ALERTS).itertuples(index=False):  # the ten that matter most
        assert overview.finding_text(row) in alerts
    dead = shown[shown["finding"] == "dead_expert"]
    assert set(zip(dead["layer"], dead["expert"])) == set(
        zip(run.dead_experts()["layer"], run.dead_experts()["expert"])
    )  # every dead expert is a finding, with its evidence


# -- time --------------------------------------------------------------------------------
@pytest.mark.slow
def test_step_loads_and_balance_over_steps_agree_with_the_run_api(app, runs):
    from routescope.dashboard import queries
    from routescope.dashboard.filters import TokenFilter

    run = rs.open_run(runs["a"])
    loads = queries.step_loads(run)
    total = loads.groupby(["layer", "expert"])["tokens"].sum().reset_index()
    expected = run.expert_load()
    assert total["tokens"].tolist() == expected["tokens"].tolist()
    per_step = queries.balance_over_steps(run)
    for step in sorted(per_step["step_lo"].unique())[:3]:
        api = run.balance(where=f"step = {int(step)}").set_index("layer")
        mine = per_step[per_step["step_lo"] == step].set_index("layer")
        for metric in ("cv", "max_violation", "balancedness", "norm_entropy"):
            assert mine[metric].to_numpy() == pytest.approx(api.loc[mine.index, metric].to_numpy())
    # bins: never more than asked, every step counted once
    binned = queries.step_loads(run, TokenFilter(), max_bins=3)
    assert binned["step_lo"].nunique() <= 3
    assert binned["tokens"].sum() == expected["tokens"].sum()


@pytest.mark.slow
def test_time_page(app, runs):
    from routescope.dashboard.pages import timeline

    controls = timeline.time_controls(A, None, None, None, "#layer=2&color=share")
    layer, metric = controls[7], controls[11]
    run = rs.open_run(runs["a"])
    assert layer == 2 and metric == "share"
    heat, balance, msg, note, caption = timeline.update_time(A, "all", None, None, None, "all", layer, metric)
    steps = run.sql("SELECT count(DISTINCT step) AS n FROM tokens")["n"][0]
    assert np.array(heat.data[0].z).shape == (run.num_experts(layer), steps)
    assert traces_with_data(balance) == 4 * len(run.moe_layers) and msg is None
    assert f"{steps} bins" in note and "share" in caption
    bad = timeline.update_time(A, "all", None, None, None, "all", 99, "lift")
    assert "not a MoE layer" in texts(bad[2])


# -- ranks -------------------------------------------------------------------------------
@pytest.mark.slow
def test_rank_filter_and_per_rank_load(app, runs):
    from routescope.dashboard.pages import load

    controls = load.load_controls(TWO)
    assert [o["value"] for o in controls[8]] == ["all", "0", "1"]
    one = rs.open_run(runs["a"]).expert_load()
    for rank in ("0", "1"):
        heat = load.update_load(TWO, "all", None, None, None, "share", None, rank)[0]
        z = np.nan_to_num(np.array(heat.data[0].z, dtype=float))
        expected = one.pivot(index="layer", columns="expert", values="share").to_numpy()
        assert z == pytest.approx(expected, abs=1e-6)
    ranks_fig = load.update_load(TWO, "all", None, None, None, "share", 0, None)[3].children[0].figure
    assert [t.name.split(" (")[0] for t in ranks_fig.data] == ["rank 0", "rank 1"]
    assert list(ranks_fig.data[0].y) == pytest.approx(list(ranks_fig.data[1].y))
    single = load.update_load(A, "all", None, None, None, "share", 0, None)[3]
    assert "one rank recorded this run" in texts(single)
    missing = load.update_load(A, "all", None, None, None, "share", 0, "7")
    assert "No token matches" in texts(missing[4])


# -- state in the URL --------------------------------------------------------------------
def test_url_fragment_round_trip_and_run_sync():
    from routescope.dashboard.urlstate import read_fragment, steps_value, sync_run, write_fragment

    frag = write_fragment("", {"phase": "decode", "run": "1", "steps": "2-5", "rank": "all"})
    assert frag == "#run=1&phase=decode&steps=2-5"
    assert read_fragment(frag) == {"run": "1", "phase": "decode", "steps": "2-5"}
    assert read_fragment(write_fragment(frag, {"phase": None})) == {"run": "1", "steps": "2-5"}
    assert read_fragment(None) == {} and steps_value("x-1") is None and steps_value("9-3") == [3, 9]
    keys = ["0", "1"]
    assert sync_run("#run=1", "0", keys, "app-url") == ("1", None)  # a shared link picks the run
    assert sync_run("#run=../etc", "0", keys, "app-url") == (None, "#run=0")  # not served: ignored
    assert sync_run("#phase=decode", "1", keys, "app-url") == (None, "#run=1&phase=decode")
    assert sync_run("#run=0&layer=2", "1", keys, "app-run") == (None, "#run=1&layer=2")


@pytest.mark.slow
def test_load_page_reads_and_writes_its_filters_in_the_url(app):
    from dash import no_update

    from routescope.dashboard.pages import load

    out = load.load_controls(A, None, None, None, "#run=0&phase=decode&layer=2&steps=1-3&color=share&rank=0")
    assert out[4] == [1, 3] and out[7] == 2 and out[9:13] == ("0", "decode", None, "share")
    hostile = load.load_controls(A, None, None, None, "#phase=x'--&layer=99&label=nope&steps=a-b")
    assert hostile[4] == [hostile[2], hostile[3]] and hostile[7] == 0 and hostile[10:12] == ("all", None)
    frag = load.load_fragment("#run=0", "decode", "domain", "math", [1, 3], "all", "lift", 2)
    assert frag == "#run=0&label=domain&layer=2&phase=decode&steps=1-3&value=math"
    assert load.load_fragment(frag, "decode", "domain", "math", [1, 3], "all", "lift", 2) is no_update


def test_step_boxes_apply_on_enter_and_follow_the_slider():
    from dash import no_update

    from routescope.dashboard.components import sync_step_boxes

    assert sync_step_boxes("load-steps", [2, 7], 0, 9, 0, 9) == (no_update, 2, 7)
    assert sync_step_boxes("load-step-from", [0, 9], 4, 9, 0, 9) == ([4, 9], 4, 9)
    assert sync_step_boxes("load-step-to", [0, 9], 4, 99, 0, 9) == ([4, 9], 4, 9)  # clamped
    assert sync_step_boxes("load-step-from", [0, 9], 8, 3, 0, 9) == ([3, 8], 3, 8)  # swapped


# -- an expert's tokens: lift against overall frequency ----------------------------------
def test_top_tokens_lift_against_overall_frequency(app, runs):
    from routescope.dashboard import queries

    run = rs.open_run(runs["a"])
    layer = run.moe_layers[0]
    load = run.expert_load()
    expert = int(load[load["layer"] == layer].sort_values("tokens").iloc[-1]["expert"])
    top, by_lift = queries.top_tokens(run, layer, expert)
    total = int(run.sql("SELECT count(*) AS n FROM tokens")["n"][0])
    routed = int(load[(load["layer"] == layer) & (load["expert"] == expert)]["tokens"].iloc[0])
    for frame in (top, by_lift):
        for _, row in frame.head(3).iterrows():
            seen = run.sql("SELECT count(*) AS n FROM tokens WHERE token_id = ?", [int(row["token_id"])])[
                "n"
            ][0]
            here = run.sql(
                "SELECT count(*) AS n FROM routing r JOIN tokens t USING (seq_id, pos) "
                "WHERE r.layer = ? AND r.expert = ? AND t.token_id = ?",
                [layer, expert, int(row["token_id"])],
            )["n"][0]
            assert (row["count"], row["occurrences"]) == (here, seen)
            assert row["lift"] == pytest.approx((here / routed) / (seen / total))
    assert top["count"].is_monotonic_decreasing
    assert (by_lift["occurrences"] >= queries.MIN_LIFT_OCCURRENCES).all()
    assert by_lift["lift"].is_monotonic_decreasing


@pytest.mark.slow
def test_small_sample_warning(app, runs):
    from routescope.dashboard.pages import load

    run = rs.open_run(runs["a"])
    decode_tokens = int(run.sql("SELECT count(*) AS n FROM tokens WHERE phase = 'decode'")["n"][0])
    out = load.update_load(A, "decode", None, None, None, "lift", None, None)
    assert decode_tokens * run.top_k(run.moe_layers[0]) / run.num_experts(run.moe_layers[0]) < 30
    assert "Small sample" in texts(out[4])
    assert "Small sample" not in texts(load.update_load(A, "all", None, None, None, "lift", None, None)[4])


@pytest.mark.slow
def test_balance_over_steps_highlights_one_layer_among_many():
    from routescope import plots

    rows = [
        {
            "step_lo": s,
            "layer": layer,
            "cv": 0.1 * layer + s,
            "max_violation": 1.0,
            "balancedness": 0.5,
            "norm_entropy": 0.9,
        }
        for layer in range(12)
        for s in range(3)
    ]
    fig = plots.balance_over_steps_figure(pd.DataFrame(rows), highlight=5)
    assert len(fig.data) == 8  # 4 metrics × (other layers, the chosen one), not 4 × 12
    chosen = next(t for t in fig.data if t.name == "L5" and t.hovertemplate.startswith("cv"))
    assert list(chosen.y) == pytest.approx([0.5, 1.5, 2.5])
    grey = next(t for t in fig.data if t.name == "other layers" and t.hovertemplate.startswith("cv"))
    assert np.isnan(np.array(grey.x, dtype=float)).sum() == 11  # one break after each other layer
    few = plots.balance_over_steps_figure(pd.DataFrame(rows[: 3 * 4]))
    assert {t.name for t in few.data} == {"L0", "L1", "L2", "L3"}

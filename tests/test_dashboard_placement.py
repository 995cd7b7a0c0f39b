"""The Placement page (issue 18): per-GPU load bars of the contiguous layout beside the chosen
plan, max / mean GPU load, the plan's slots, a fit / evaluate split on steps, state in the URL
and a message for every bad control value. Callbacks are called directly on a run recorded
from a real model and checked against `run.placement`, `evaluate_placement` and `run.balance`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import routescope as rs
from routescope.analysis.placement import evaluate_placement, gpu_loads
from tests.test_dashboard import record_demo_run, table_rows, texts

A = {"run": "0", "version": None}


@pytest.fixture(scope="module")
def run_path(tmp_path_factory) -> Path:
    return record_demo_run(tmp_path_factory.mktemp("placement") / "run_a", seed=0)


@pytest.fixture(scope="module")
def app(run_path):
    from routescope.dashboard import runs as registry_module
    from routescope.dashboard.app import create_app

    before = registry_module._CURRENT
    app = create_app([run_path])
    yield app
    registry_module._CURRENT = before


@pytest.fixture(scope="module")
def run(run_path) -> rs.Run:
    return rs.open_run(run_path)


def card_imbalance(card) -> float:
    """The max/mean number a before / after card shows."""
    line = next(c for c in card.children if getattr(c, "className", None) == "placement-imbalance")
    return float(line.children.split()[-1])


def plan_rows(plan_div) -> pd.DataFrame:
    """The plan table's rows (gpu, slot, expert, replicas, tokens) read back from its cells."""
    rows = table_rows(plan_div)
    df = pd.DataFrame(rows, columns=["gpu", "slot", "expert", "replicas", "tokens"])
    return df.astype({"gpu": int, "slot": int, "expert": int, "replicas": int, "tokens": float})


@pytest.mark.slow
def test_plots_export_the_gpu_load_figure():
    from routescope import plots
    from routescope.plots import placement

    assert plots.gpu_load_figure is placement.gpu_load_figure and "gpu_load_figure" in plots.__all__


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lpt", "eplb"])
def test_before_and_after_match_the_run_api(app, run, method):
    from routescope.dashboard.pages import placement

    layer = run.moe_layers[1]
    fig, cards, layers, plan_div, msg, note = placement.update_placement(A, 4, 0, method, layer)
    assert msg is None and f"4 GPUs × {run.num_experts(layer) // 4} slots" in note
    loads = run.expert_load()
    plans = {m: run.placement(4, method=m) for m in ("contiguous", method)}
    # bars: contiguous first ("before"), the plan second ("after"), per GPU of the chosen layer
    assert [t.name.split(" (max")[0] for t in fig.data] == ["contiguous (before)", f"{method} (after)"]
    for trace, m in zip(fig.data, ("contiguous", method)):
        expected = gpu_loads(loads, plans[m])
        assert list(trace.y) == pytest.approx(expected.loc[expected["layer"] == layer, "load"].tolist())
    # cards: max/mean from evaluate_placement, ep_balancedness from run.balance(placement=...)
    for card, m in zip(cards, ("contiguous", method)):
        ev = evaluate_placement(loads, plans[m]).set_index("layer").loc[layer]
        assert card_imbalance(card) == pytest.approx(ev["imbalance"], abs=5e-4)
        bal = run.balance(ep_size=4, placement=plans[m]).set_index("layer").loc[layer, "ep_balancedness"]
        assert f"ep_balancedness {bal:.3f}" in texts(card)
    # every layer in the table, the plan's slots for the chosen layer
    for ly in run.moe_layers:
        assert (
            f"{evaluate_placement(loads, plans[method]).set_index('layer').loc[ly, 'imbalance']:.4g}"
            in texts(layers)
        )
    rows = plan_rows(plan_div)
    want = plans[method][plans[method]["layer"] == layer][["gpu", "slot", "expert"]].reset_index(drop=True)
    pd.testing.assert_frame_equal(rows[["gpu", "slot", "expert"]], want, check_dtype=False)
    # lpt is never worse than contiguous on the loads it was built from
    if method == "lpt":
        assert card_imbalance(cards[1]) <= card_imbalance(cards[0]) + 1e-9


@pytest.mark.slow
def test_redundant_slots_replicate_and_split_the_load(app, run):
    from routescope.dashboard.pages import placement

    layer = run.moe_layers[0]
    experts = run.num_experts(layer)
    _fig, _cards, _layers, plan_div, msg, note = placement.update_placement(A, 4, 4, "eplb", layer)
    assert msg is None and f"4 GPUs × {(experts + 4) // 4} slots (4 redundant)" in note
    rows = plan_rows(plan_div)
    assert len(rows) == experts + 4 and sorted(set(rows["expert"])) == list(range(experts))
    assert (rows.groupby("gpu").size() == (experts + 4) // 4).all()
    assert (rows["replicas"] == rows["expert"].map(rows["expert"].value_counts())).all()
    load = run.expert_load().query("layer == @layer").set_index("expert")["tokens"]
    assert rows["tokens"].to_numpy() == pytest.approx(
        (rows["expert"].map(load) / rows["replicas"]).to_numpy(), abs=0.5e-4 * load.max()
    )
    assert rows["tokens"].sum() == pytest.approx(load.sum())  # replicas share, nothing is lost


@pytest.mark.slow
def test_fit_on_early_steps_evaluate_on_later_ones(app, run):
    from routescope.dashboard.pages import placement

    steps = run.sql("SELECT min(step) AS lo, max(step) AS hi FROM tokens")
    split = (int(steps["lo"][0]) + int(steps["hi"][0])) // 2
    layer = run.moe_layers[-1]
    fig, cards, layers, plan_div, msg, note = placement.update_placement(A, 4, 0, "lpt", layer, split)
    assert msg is None and f"steps ≤ {split}" in note and f"steps > {split}" in note
    plan = run.placement(4, method="lpt", where=f"step <= {split}")
    later, early = run.expert_load(where=f"step > {split}"), run.expert_load(where=f"step <= {split}")
    out_of_sample = evaluate_placement(later, plan).set_index("layer").loc[layer]
    in_sample = evaluate_placement(early, plan).set_index("layer").loc[layer]
    assert card_imbalance(cards[1]) == pytest.approx(out_of_sample["imbalance"], abs=5e-4)
    assert f"in sample (fit window): max/mean {in_sample['imbalance']:.3f}" in texts(cards[1])
    expected = gpu_loads(later, plan)
    assert list(fig.data[1].y) == pytest.approx(expected.loc[expected["layer"] == layer, "load"].tolist())
    assert sum(fig.data[1].y) == pytest.approx(later.query("layer == @layer")["tokens"].sum())
    rows = plan_rows(plan_div)
    pd.testing.assert_frame_equal(
        rows[["gpu", "slot", "expert"]],
        plan[plan["layer"] == layer][["gpu", "slot", "expert"]].reset_index(drop=True),
        check_dtype=False,
    )
    assert "in sample" in texts(layers)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ep", "redundant", "method", "fit", "says"),
    [
        (3, 0, "lpt", None, "do not split evenly over ep_size=3 GPUs; redundant values that fit: 2"),
        (None, 0, "lpt", None, "Enter an EP size"),
        (2.5, 0, "lpt", None, "whole number of GPUs"),
        (0, 0, "lpt", None, "must lie in 1–1024"),
        (4, -2, "eplb", None, "redundant slots must be a whole number ≥ 0"),
        (4, 10_000, "eplb", None, "redundant slots on this page"),
        (4, 0, "greedy", None, "method 'greedy' is not known"),
        (4, 0, "lpt", 10_000, "both windows need tokens"),
    ],
)
def test_bad_control_values_give_a_message_not_a_traceback(app, run, ep, redundant, method, fit, says):
    from routescope.dashboard.pages import placement

    fig, cards, layers, plan_div, msg, note = placement.update_placement(
        A, ep, redundant, method, run.moe_layers[0], fit
    )
    assert says in texts(msg) and "Traceback" not in texts(msg)
    assert cards is None and layers is None and plan_div is None and note is None
    assert says[:40] in fig.layout.annotations[0].text or fig.layout.annotations[0].text.endswith("…")


@pytest.mark.slow
def test_controls_read_the_url_and_fall_back_to_defaults(app, run):
    from dash import no_update

    from routescope.dashboard.pages import placement

    layers = run.moe_layers
    ep, red, method, options, layer, lo, hi, fit, hint = placement.placement_controls(
        A, f"#ep=8&redundant=4&method=eplb&layer={layers[2]}&fit=3"
    )
    assert (ep, red, method, layer, fit) == (8, 4, "eplb", layers[2], 3)
    assert [o["value"] for o in options] == layers
    steps = run.sql("SELECT min(step) AS lo, max(step) AS hi FROM tokens")
    assert (lo, hi) == (int(steps["lo"][0]), int(steps["hi"][0]) - 1) and "split" in hint
    # values the page cannot use fall back to the defaults; nothing is used as SQL or a path
    ep, red, method, _o, layer, _lo, _hi, fit, _h = placement.placement_controls(
        A, "#ep=-3&redundant=x&method=drop%20table&layer=99"
    )
    experts = run.num_experts(layers[0])
    assert ep == placement.default_ep_size(experts) and experts % ep == 0 and experts // ep >= 2
    assert (red, method, layer, fit) == (0, "lpt", layers[0], None)
    # a value already on the page wins over the URL (a live run's refresh keeps the view)
    assert placement.placement_controls(A, "#ep=8", 2, 0, "lpt", layers[1], None)[0] == 2
    assert no_update not in placement.placement_controls(A, None)


@pytest.mark.slow
def test_the_page_writes_its_controls_into_the_url(app):
    from routescope.dashboard.urlstate import fragment_for

    writers = [
        spec
        for spec in app.callback_map.values()
        if "app-url.hash" in str(spec["output"]) and any(d["id"] == "placement-ep" for d in spec["inputs"])
    ]
    assert len(writers) == 1
    assert [d["id"] for d in writers[0]["inputs"]] == [
        "placement-ep",
        "placement-redundant",
        "placement-method",
        "placement-layer",
        "placement-fit",
    ]
    values = {"ep": 4, "redundant": 0, "method": "lpt", "layer": 1, "fit": None}
    assert fragment_for("#run=0", values, {"redundant": 0, "method": "lpt"}) == "#run=0&ep=4&layer=1"


@pytest.mark.slow
def test_default_ep_size_leaves_two_experts_per_gpu():
    from routescope.dashboard.pages.placement import default_ep_size

    assert [default_ep_size(e) for e in (64, 16, 8, 6, 4, 3, 2)] == [8, 8, 4, 2, 2, 1, 1]
    assert np.all([e % default_ep_size(e) == 0 for e in range(1, 70)])


@pytest.mark.slow
def test_the_placement_page_never_imports_torch(run_path):
    """Drawing the page in a fresh process leaves torch and transformers out."""
    import subprocess
    import sys

    code = f"""
import sys
from routescope.dashboard.app import create_app
from routescope.dashboard.pages import placement
create_app([{str(run_path)!r}])
out = placement.update_placement({{"run": "0"}}, 2, 2, "eplb", None, 1)
print(sorted(m for m in ("torch", "transformers") if m in sys.modules), out[4] is None)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[] True"


@pytest.mark.slow
def test_a_run_that_cannot_be_read_is_a_message(tmp_path, app):
    from routescope.dashboard import runs as registry_module
    from routescope.dashboard.app import create_app
    from routescope.dashboard.pages import placement

    before = registry_module.get_registry()
    try:
        create_app([tmp_path / "gone"])
        out = placement.update_placement(A, 4, 0, "lpt", 0)
        assert "no such directory" in texts(out[4]) and out[1] is None
        controls = placement.placement_controls(A, "#ep=4")
        assert controls[3] == [] and controls[8] is None  # no layer options, no hint, no exception
    finally:
        registry_module.set_registry(before)


@pytest.mark.slow
def test_the_step_figure_is_the_sum_of_busiest_gpus_over_the_sum_of_means(app, run):
    """Issue 29: the page's model-level figure is `model_imbalance` (Σ max / Σ mean over
    layers), on the cards, as the table's last row and as the last bar group."""
    from routescope.analysis.expert_parallel import model_imbalance
    from routescope.dashboard.pages import placement
    from routescope.plots.placement import MODEL_LABEL

    _fig, cards, layers, _plan, msg, _note = placement.update_placement(A, 4, 0, "lpt", run.moe_layers[0])
    assert msg is None
    loads = run.expert_load()
    graph = layers.children[0]
    for card, trace, m in zip(cards, graph.figure.data, ("contiguous", "lpt")):
        expected = model_imbalance(evaluate_placement(loads, run.placement(4, method=m)))["imbalance"]
        assert f"{MODEL_LABEL}: Σ max / Σ mean {expected:.3f}" in texts(card)
        assert f"{expected:.4g}" in texts(layers)
        assert list(trace.x)[-1] == MODEL_LABEL and trace.y[-1] == pytest.approx(expected)

"""The dashboard pages beyond Load and Time (issue 15): entanglement normalised, Super
Experts stating their rule, Compare with guidance for one run, EP balancedness,
specialization against the expert's own share, tokens coloured by expert, every page's
controls in the URL, and the server answering quietly. Callbacks are called directly on a
run recorded from a real model (and a calibrated copy), checked against the Run API."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import routescope as rs
from tests.test_dashboard import add_calibration, record_demo_run, texts


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pages")
    a = record_demo_run(root / "run_a", seed=0)
    calibrated = root / "calibrated"
    shutil.copytree(a, calibrated)
    add_calibration(calibrated)
    return {"a": a, "calibrated": calibrated}


@pytest.fixture(scope="module")
def app(runs):
    from routescope.dashboard.app import create_app

    return create_app([runs["a"], runs["calibrated"]])


A, CAL = ({"run": key, "version": None} for key in ("0", "1"))


# -- entanglement ------------------------------------------------------------------------
@pytest.mark.slow
def test_entanglement_is_normalised_and_transition_rows_carry_counts(app, runs):
    from routescope.dashboard.pages import entanglement

    run = rs.open_run(runs["a"])
    ent = run.entanglement()
    _opts, pair, _top = entanglement.entanglement_controls(A)
    mi, trans, sankey, _msg = entanglement.update_entanglement(A, pair, 10)
    assert list(mi.data[0].y) == pytest.approx(ent["norm_mutual_info"].tolist())
    h_b = ent["mutual_info_bits"] + ent["cond_entropy_bits"]
    assert list(mi.data[1].y) == pytest.approx((ent["baseline_mutual_info_bits"] / h_b).tolist())
    ratio = ent["mutual_info_bits"] / ent["baseline_mutual_info_bits"]
    assert list(mi.data[2].y) == pytest.approx(ratio.tolist())
    assert mi.layout.yaxis2.type == "log"
    a, b = (int(v) for v in pair.split("-"))
    table = run.transition(a, b)
    rows = table.groupby("expert_a")["count"].sum() if "expert_a" in table.columns else None
    z = np.array(trans.data[0].z, dtype=float)
    for expert in range(run.num_experts(a)):
        n = int(rows.get(expert, 0)) if rows is not None else 0
        assert f"{expert} (n={n:,})" == trans.layout.yaxis.ticktext[expert]
        if n == 0:
            assert np.isnan(z[expert]).all()  # no token: an empty row, not a row of zeros
        else:
            assert np.nansum(z[expert]) == pytest.approx(1.0, abs=1e-5)
    links = sankey.data[0].link
    assert len(set(links.color)) > 1  # coloured by source expert, not one grey
    assert len(sankey.data[0].node.label) <= 10 * len(run.moe_layers)


# -- super experts -----------------------------------------------------------------------
@pytest.mark.slow
def test_super_experts_state_the_rule_and_link_channels(app, runs):
    from routescope.dashboard.pages import super_experts

    scatter, listing, massive, msg = super_experts.update_super_experts(CAL)
    assert msg is None
    run = rs.open_run(runs["calibrated"])
    classified = rs.classify_super_experts(
        run.expert_activations(), num_hidden_layers=int(run.manifest["num_hidden_layers"])
    )
    thresholds = classified.attrs["thresholds"]
    text = texts(listing)
    assert (
        f"{thresholds['percentile_threshold']:.4g}" in text and f"{thresholds['max_threshold']:.4g}" in text
    )
    stars = [t for t in scatter.data if t.name == "Super Expert (rule met)"]
    supers = classified[classified["is_super"]]
    assert len(supers) == 1 and len(stars) == 1
    assert list(stars[0].x) == supers["layer"].tolist()
    labels = next(t for t in scatter.data if t.mode == "text")
    star_label = [s.strip() for x, y, s in zip(labels.x, labels.y, labels.text) if y == stars[0].y[0]]
    assert star_label == [f"e{int(supers['expert'].iloc[0])}"]
    # add_calibration's Super Expert writes channel 7 and every residual channel is 3: no link
    assert "× median" in text and "no" in text.split("same channel?")[1]
    # the residual stream of add_calibration peaks at 900 over a median of 0.5: massive after layer 1 on
    assert "massive activations" in text and [b for b in massive.data[0].text] == [""] + ["massive"] * (
        int(run.manifest["num_hidden_layers"]) - 1
    )


def test_no_star_when_no_expert_meets_the_rule():
    from routescope import plots

    acts = pd.DataFrame(
        {"layer": [0, 0, 1], "expert": [0, 1, 0], "max_abs_output": [1.0, 2.0, 3.0], "is_super": [False] * 3}
    )
    fig = plots.super_expert_scatter(acts, 2.9, 0.3, searched_layers=[0])
    assert all("Super Expert" not in (t.name or "") for t in fig.data)


# -- compare -----------------------------------------------------------------------------
@pytest.mark.slow
def test_compare_with_one_run_shows_guidance_only(runs, app):
    from routescope.dashboard import runs as registry_module
    from routescope.dashboard.app import create_app
    from routescope.dashboard.pages import compare

    before = registry_module.get_registry()
    try:
        create_app([runs["a"]])
        *_figs, tables, msg, style = compare.update_compare(A, None, None)
        assert "Compare needs two different runs" in texts(msg) and style == {"display": "none"}
        assert tables is None
    finally:
        registry_module.set_registry(before)


# -- expert parallelism, specialization, tokens ------------------------------------------
@pytest.mark.slow
def test_overview_adds_ep_balancedness_for_an_ep_size(app, runs):
    from routescope.dashboard.pages import overview

    options, value = overview.overview_controls(A, "#ep=4")
    run = rs.open_run(runs["a"])
    experts = run.num_experts(run.moe_layers[0])
    assert value == "4" and [o["value"] for o in options][1:] == [
        str(n) for n in range(2, experts + 1) if experts % n == 0
    ]
    assert overview.overview_controls(A, "#ep=3")[1] == "off"  # 16 experts do not split over 3 GPUs
    health = overview.update_overview(A, "4")[1].children[0].figure
    expected = run.balance(ep_size=4)
    column = list(health.data[0].x).index("ep_balancedness")
    assert [row[column] for row in health.data[0].text] == [f"{v:.3f}" for v in expected["ep_balancedness"]]
    assert "ep_balancedness" not in overview.update_overview(A, "off")[1].children[0].figure.data[0].x


def test_specialization_lift_against_the_experts_own_share(app, runs):
    from routescope.dashboard.pages import specialization

    run = rs.open_run(runs["a"])
    layer = run.moe_layers[0]
    heat, _msg, caption = specialization.update_specialization(A, "domain", layer, "expert")
    spec = run.specialization(by="domain")
    load = run.expert_load().set_index(["layer", "expert"])["share"]
    rows = spec[spec["layer"] == layer]
    lift = np.array(heat.data[0].customdata, dtype=float)[..., 0]  # (value, expert) lift before log2
    values = list(heat.data[0].y)
    for _, row in rows.iterrows():
        overall = load[(layer, int(row["expert"]))]
        cell = lift[values.index(str(row["domain"])), list(heat.data[0].x).index(row["expert"])]
        if overall > 0:
            assert cell == pytest.approx(row["share"] / overall, rel=1e-4)
        else:
            assert np.isnan(cell)
    assert "overall share" in caption
    uniform = specialization.update_specialization(A, "domain", layer, "uniform")[0]
    assert np.array(uniform.data[0].customdata, dtype=float)[..., 0] == pytest.approx(
        np.array(rows.pivot(index="domain", columns="expert", values="lift"), dtype=float),
        rel=1e-4,
        nan_ok=True,
    )


def test_token_text_is_coloured_by_expert_and_labels_are_capped(app, runs):
    from routescope import plots
    from routescope.dashboard.pages import tokens

    run = rs.open_run(runs["a"])
    layer = run.moe_layers[-1]
    _opts, seq, _layer_opts, _layer, _start = tokens.tokens_controls(A)
    _lanes, _note, text, _msg = tokens.update_tokens(A, seq, 0, None, layer)
    routing = run.sql(
        "SELECT pos, expert FROM routing WHERE seq_id = ? AND layer = ? AND slot = 0 ORDER BY pos",
        [seq, layer],
    )
    assert len(text) == len(routing)
    for span, expert in zip(text, routing["expert"]):
        assert span.style["borderBottom"].endswith(plots.expert_color(int(expert)))
        assert f"top-1 expert {int(expert)}" in span.title
    n = 200
    lanes = pd.DataFrame(
        {"pos": range(n), "layer": 0, "token": [f"t{i}" for i in range(n)], "experts": [[1, 2]] * n}
    )
    fig = plots.expert_lanes(lanes.assign(weights=[[0.5, 0.5]] * n), 4)
    assert len(fig.layout.xaxis.tickvals) <= 80 and fig.layout.xaxis.tickangle == -90


def test_dead_experts_are_marked_on_compare_and_specialization_figures():
    from routescope import plots

    load = pd.DataFrame(
        {
            "layer": [0, 0, 0, 0],
            "expert": [0, 1, 2, 3],
            "share_a": [0.0, 0.5, 0.5, 0.0],
            "share_b": [0.5, 0.0, 0.5, 0.0],
        }
    )
    fig = plots.load_delta_heatmap(load)
    marks = {t.name: list(t.x) for t in fig.data[1:] if t.x[0] is not None}
    assert marks == {"dead in A only (no token)": [0], "dead in B only (no token)": [1], "dead in both": [3]}
    spec = pd.DataFrame(
        {
            "domain": ["code", "code", "math", "math"],
            "layer": 0,
            "expert": [0, 1, 0, 1],
            "tokens": [5, 0, 3, 3],
            "share": [1.0, 0.0, 0.5, 0.5],
            "lift": [2.0, 0.0, 1.0, 1.0],
        }
    )
    z = np.array(plots.specialization_heatmap(spec, "domain", 0).data[0].z, dtype=float)
    assert np.isnan(z[0, 1]) and not np.isnan(z[1, 1])  # code never went to expert 1: a black cell


def test_every_page_reads_its_controls_from_the_url(app, runs):
    from dash import no_update

    from routescope.dashboard.pages import compare, entanglement, specialization, tokens
    from routescope.dashboard.urlstate import fragment_for

    run = rs.open_run(runs["a"])
    layers = run.moe_layers
    pair = f"{layers[1]}-{layers[2]}"
    assert entanglement.entanglement_controls(A, None, f"#pair={pair}&paths=25")[1:] == (pair, 25)
    assert entanglement.entanglement_controls(A, None, "#pair=0-99&paths=7")[1:] == (
        f"{layers[0]}-{layers[1]}",
        10,
    )
    spec = specialization.specialization_controls(
        A, None, None, f"#label=domain&layer={layers[-1]}&lift=expert"
    )
    assert (spec[1], spec[3], spec[4]) == ("domain", layers[-1], "expert")
    seq = int(run.sql("SELECT max(seq_id) AS s FROM tokens")["s"][0])
    tok = tokens.tokens_controls(A, None, None, f"#seq={seq}&start=4&layer={layers[1]}")
    assert (tok[1], tok[3], tok[4]) == (seq, layers[1], 4)
    assert tokens.tokens_controls(A, None, None, "#start=-3")[4] is no_update
    assert compare.compare_controls(A, None, None, "#a=1&b=0")[1::2] == ("1", "0")
    assert compare.compare_controls(A, None, None, "#a=/etc&b=9")[1::2] == ("0", "1")
    # writing: defaults are left out, a change is written, no change is no write
    assert fragment_for("#run=0", {"paths": 10, "pair": pair}, {"paths": 10}) == f"#run=0&pair={pair}"
    assert fragment_for(f"#run=0&pair={pair}", {"pair": pair}, {}) is None


@pytest.mark.slow
def test_dashboard_command_serves_quietly(runs):
    """`routescope dashboard` answers HTTP through waitress and prints no development-server warning."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = "import sys; from routescope.cli import main; sys.exit(main())"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "dashboard", str(runs["a"]), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        status, deadline = None, time.monotonic() + 120
        while status is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_dash-layout", timeout=5) as response:
                    status = response.status
            except OSError:
                time.sleep(0.5)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert status == 200, (out, err)
    assert f"http://127.0.0.1:{port}/" in out
    assert "development server" not in out + err and "WARNING" not in err, err


@pytest.mark.slow
def test_serving_a_run_without_calibration_never_imports_torch(runs):
    """Every page of a recorded run drawn in a fresh process: torch and transformers stay out
    (tokens are decoded with the `tokenizers` library)."""
    import subprocess
    import sys

    code = f"""
import sys
from routescope.dashboard.app import create_app
from routescope.dashboard.pages import compare, entanglement, load, overview, specialization, super_experts, timeline, tokens
create_app([{str(runs["a"])!r}, {str(runs["a"])!r}])
st = {{"run": "0"}}
overview.update_overview(st, "4")
load.update_load(st, "all", None, None, None, "lift", None)
load.show_expert(st, {{"points": [{{"x": 1, "y": "L0"}}]}}, "all", None, None, None)
timeline.update_time(st, "all", None, None, None, "all", None, "lift")
entanglement.update_entanglement(st, None, 10)
specialization.update_specialization(st, "domain", 0, "expert")
super_experts.update_super_experts(st)
lanes = tokens.update_tokens(st, 0, 0)
compare.update_compare(st, "0", "1")
print(sorted(m for m in ("torch", "transformers") if m in sys.modules), lanes[3] is None)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[] True"


@pytest.mark.slow
def test_every_callback_targets_a_property_its_component_has(app):
    """Each Output, Input and State names a component of the shell or of a page layout, and
    a property that component has (a Div has no `figure`: such a callback updates nothing)."""
    from routescope.dashboard.pages import PAGES

    components: dict[str, object] = {}

    def walk(node: object) -> None:
        if isinstance(node, (list, tuple)):
            for child in node:
                walk(child)
            return
        if not hasattr(node, "_prop_names"):
            return
        node_id = getattr(node, "id", None)
        if isinstance(node_id, str):
            components[node_id] = node
        walk(getattr(node, "children", None))

    walk(app.layout)
    for page in PAGES:
        walk(page.layout())
    checked = 0
    for spec in app.callback_map.values():
        outputs = spec["output"] if isinstance(spec["output"], list) else [spec["output"]]
        targets = [(o.component_id, o.component_property) for o in outputs]
        targets += [(d["id"], d["property"]) for d in spec["inputs"] + spec["state"]]
        for component_id, prop in targets:
            if component_id.startswith("_pages"):
                continue  # Dash's own page routing
            assert component_id in components, component_id
            assert prop in components[component_id]._prop_names, f"{component_id}.{prop}"
            checked += 1
    assert checked > 100

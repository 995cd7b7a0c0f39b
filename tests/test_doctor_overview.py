"""The Overview of a run with many layers (issue 33 item 4): one layers x metric view instead of
one card per layer, the doctor's verdict first, alerts grouped and ranked (the ten that matter
most, then "N more" opening the full table). A 48-layer synthetic run with hot experts planted
in every layer and one dead expert."""

from __future__ import annotations

import numpy as np
import pytest

import routescope as rs
from tests.synthetic import sample_topk, write_run
from tests.test_dashboard import texts

LAYERS, E, K, TOKENS = 48, 16, 2, 1500


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    experts = {}
    for layer in range(LAYERS):
        weights = np.ones(E)
        weights[layer % E] = 1.0 + 3.0 * (layer + 1) / LAYERS  # hot, more so in later layers
        if layer == 7:
            weights[3] = 0.0  # dead
        experts[layer] = sample_topk(rng, np.tile(weights / weights.sum(), (TOKENS, 1)), K)
    return write_run(tmp_path_factory.mktemp("many") / "run", experts, E, step=np.arange(TOKENS) // 300)


@pytest.fixture(scope="module")
def state(run_dir):
    import routescope.dashboard.runs as registry_module
    from routescope.dashboard.app import create_app

    before = registry_module._CURRENT
    create_app([run_dir])
    yield {"run": "0", "version": None}
    registry_module._CURRENT = before


@pytest.mark.slow
def test_many_layers_read_at_a_glance(run_dir, state):
    from routescope.dashboard.pages import overview

    _summary, layers_view, _fig, alerts, msg, verdict = overview.update_overview(state)
    assert msg is None
    with rs.open_run(run_dir) as run:
        findings = run.doctor()
    shown = findings[findings["severity"] != "ok"]
    assert len(shown) > overview.TOP_ALERTS  # more findings than the list holds
    # the verdict heads the page, worst first: the dead expert of layer 7 is critical
    assert texts(verdict).startswith("Doctor: critical")
    # one view with a row per layer, not 48 cards
    health = layers_view.children[0].figure.data[0]
    assert len(health.y) == LAYERS and "doctor" in health.x and "Gini" in health.x
    # grouped, then the top ten ranked, then "N more" leading to the full table
    groups = alerts.children[0]
    assert groups.id == "overview-alert-groups"
    assert texts(groups.children[0]).startswith("dead_expert (critical): 1")
    top = alerts.children[1]
    assert top.id == "overview-alert-list" and len(top.children) == overview.TOP_ALERTS
    assert "dead_expert: layer 7 expert 3" in texts(top.children[0])
    more = alerts.children[2]
    assert more.id == "overview-alert-more"
    assert f"… and {len(shown) - overview.TOP_ALERTS} more" in texts(more.children[0])
    full = more.children[1]  # one paged table of every finding
    assert full.id == "overview-alert-table" and len(full.data) == len(shown)
    assert [row["finding"] for row in full.data] == list(shown["finding"])
    assert full.page_size < len(shown)  # paged in the browser, not a component per cell


@pytest.mark.slow
def test_rows_order_by_a_metric_worst_first(state):
    from routescope.dashboard.pages import overview

    by_layer = overview.update_overview(state, "off", "layer")[1].children[0].figure.data[0]
    assert list(by_layer.y) == [f"L{layer}" for layer in range(LAYERS)]
    by_findings = overview.update_overview(state, "off", "findings")[1].children[0].figure.data[0]
    assert by_findings.y[0] == "L7"  # the critical layer first
    by_cv = overview.update_overview(state, "off", "cv")[1].children[0].figure.data[0]
    cv_column = list(by_cv.x).index("cv")
    values = [float(row[cv_column]) for row in by_cv.text]
    assert values == sorted(values, reverse=True)

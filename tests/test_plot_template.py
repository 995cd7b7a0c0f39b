"""The dashboard makes TEMPLATE plotly's process default so figures are not validated against
it one by one; what the browser receives must not change."""

from __future__ import annotations

import json

import plotly.graph_objects as go
import plotly.io as pio
from plotly.io.json import to_json_plotly

from routescope.plots.style import TEMPLATE, base_layout, use_template_by_default


def test_the_default_template_serialises_the_same_figure(monkeypatch):
    monkeypatch.setattr(pio.templates, "default", "plotly")
    explicit = json.loads(to_json_plotly(base_layout(go.Figure(go.Bar(y=[1, 2])), "t", height=300)))
    assert base_layout(go.Figure(), "t").layout.template.layout.paper_bgcolor == "white"  # set on the figure
    use_template_by_default()
    assert pio.templates.default == TEMPLATE
    fig = base_layout(go.Figure(go.Bar(y=[1, 2])), "t", height=300)
    assert json.loads(to_json_plotly(fig)) == explicit

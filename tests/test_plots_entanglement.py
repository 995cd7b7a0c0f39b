"""The transition heatmap labels every row with its tokens while that is few labels, and
leaves the ticks to plotly beyond (each drawn label costs the browser a measurement; issue 33)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from routescope.plots.entanglement import MAX_ROW_LABELS, transition_heatmap


def transitions(num_experts: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    a, b = np.meshgrid(np.arange(num_experts), np.arange(num_experts), indexing="ij")
    return pd.DataFrame({"expert_a": a.ravel(), "expert_b": b.ravel(), "count": rng.integers(1, 50, a.size)})


def test_few_experts_label_every_row_with_its_tokens():
    trans = transitions(8)
    fig = transition_heatmap(trans, 0, 1, num_a=8, num_b=8)
    tokens = trans.groupby("expert_a")["count"].sum()
    assert list(fig.layout.yaxis.tickvals) == list(range(8))
    assert list(fig.layout.yaxis.ticktext) == [f"{a} (n={tokens[a]:,})" for a in range(8)]
    assert "n = its tokens" in fig.layout.yaxis.title.text


def test_many_experts_leave_the_ticks_to_plotly_and_keep_every_row():
    n = MAX_ROW_LABELS * 2
    fig = transition_heatmap(transitions(n), 0, 1, num_a=n, num_b=n)
    assert fig.layout.yaxis.tickvals is None and fig.layout.yaxis.ticktext is None
    assert fig.layout.yaxis.tickmode is None  # plotly's automatic ticks
    assert "n = its tokens" not in fig.layout.yaxis.title.text
    heat = fig.data[0]
    assert np.asarray(heat.z).shape == (n, n) and list(heat.y) == list(range(n))
    assert "%{y}" in heat.hovertemplate  # a row's expert is still named on hover

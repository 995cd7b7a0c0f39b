"""The expert-lanes axis title names its label step with a correct ordinal (issue 26, item 15)."""

from __future__ import annotations

import pandas as pd
import pytest

from routescope import plots
from routescope.plots.tokens import ordinal


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (1, "1st"),
        (2, "2nd"),
        (3, "3rd"),
        (4, "4th"),
        (11, "11th"),
        (12, "12th"),
        (13, "13th"),
        (21, "21st"),
        (22, "22nd"),
        (23, "23rd"),
        (101, "101st"),
        (111, "111th"),
    ],
)
def test_ordinal(n, text):
    assert ordinal(n) == text


@pytest.mark.parametrize(
    ("tokens", "title"),
    [(60, "token"), (200, "token (every 3rd labelled)"), (130, "token (every 2nd labelled)")],
)
def test_expert_lanes_axis_title(tokens, title):
    lanes = pd.DataFrame(
        {
            "pos": range(tokens),
            "layer": 0,
            "token": [f"t{i}" for i in range(tokens)],
            "experts": [[1, 2]] * tokens,
        }
    )
    fig = plots.expert_lanes(lanes, 4)
    assert fig.layout.xaxis.title.text == title

"""`routescope report RUN --html FILE`: one self-contained HTML file with the main figures."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from routescope.cli import main
from tests.synthetic import sample_topk, write_run


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    probs = 1.0 / np.arange(1, 17) ** 1.5
    probs = np.tile(probs / probs.sum(), (600, 1))
    experts = {layer: sample_topk(rng, probs, 2) for layer in (1, 2)}
    acts = {
        "layer": [1, 1, 2],
        "expert": [0, 1, 0],
        "shared": [False, False, False],
        "max_abs_output": [1.0, 900.0, 2.0],
        "channel": [3, 7, 3],
        "tokens_seen": [600, 600, 600],
    }
    return write_run(
        tmp_path / "run",
        experts,
        16,
        seq_len=60,
        num_hidden_layers=4,
        labels={"domain": ["<script>alert(1)</script>"] * 600},
        extra_tables={"expert_activations": acts},
    )


def plot_ids(text: str) -> list[str]:
    return re.findall(r'Plotly\.newPlot\(\s*"([^"]+)"', text)


@pytest.mark.slow
def test_html_report_is_one_offline_file_with_the_figures(run_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "nested" / "report.html"
    assert main(["report", str(run_dir), "--html", str(out)]) == 0
    assert "Balance per MoE layer" in capsys.readouterr().out  # the terminal report still prints
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    # plotly.js inlined once, no network fetch
    assert text.count("<script type='text/javascript'>") == 1
    assert not re.search(r"<script[^>]*\ssrc=", text)
    headings = re.findall(r"<h3>([^<]+)</h3>", text)
    for expected in (
        "Load balance per MoE layer",
        "Expert load",
        "Cross-layer entanglement",
        "Super Experts",
    ):
        assert any(h.startswith(expected) for h in headings), headings
    assert any(h.startswith("Expert-parallel placement, 8 GPUs") for h in headings)
    assert len(plot_ids(text)) == 5  # balance, load, entanglement, placement, super experts
    assert not list(out.parent.glob("*.tmp"))


@pytest.mark.slow
def test_html_report_follows_where_and_numbers_match_json(run_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(run_dir), "--where", "pos < 30", "--html", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    text = out.read_text(encoding="utf-8")
    assert "pos &lt; 30" in text  # the filter is shown, escaped
    assert "<script>alert(1)</script>" not in text  # user text never lands unescaped
    for row in doc["balance"]:  # the balance table of the file holds the same numbers
        assert f"{row['balancedness']:.4g}" in text


@pytest.mark.slow
def test_html_report_bad_name_exits_2(run_dir: Path, tmp_path: Path, capsys):
    assert main(["report", str(run_dir), "--html", str(tmp_path / "report.txt")]) == 2
    assert "must end in .html" in capsys.readouterr().err

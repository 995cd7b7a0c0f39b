"""The model-level figure of a placement (issue 29): Σ over layers of each layer's busiest GPU ÷
Σ of the mean GPU loads, never per-GPU loads added across layers. The loads here put the
heaviest expert of every layer on GPU 0 under the per-layer LPT plans (contiguous spreads them
over GPUs 0-3): LPT is better in every layer, and the per-GPU sum over layers would call
contiguous perfectly even. The HTML report, `routescope placement` and the dashboard's
Placement page must rank the plans the way every layer does."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import routescope as rs
from routescope.analysis.expert_parallel import compare_plans, model_imbalance
from routescope.analysis.placement import build_plan, evaluate_placement, gpu_loads
from routescope.importers import ImportedRun, counts_to_table, write_imported_run

LAYERS, EXPERTS, EP_SIZE = 4, 8, 4


def skewed_loads() -> pd.DataFrame:
    """Layer l: expert 2l carries 80 tokens, its contiguous neighbour 2l+1 carries 20, the rest
    8-18 (rotated per layer), so contiguous puts layer l's heaviest expert on GPU l."""
    rest = [8, 10, 12, 14, 16, 18]
    rows = []
    for layer in range(LAYERS):
        weight = np.zeros(EXPERTS, dtype=np.int64)
        weight[2 * layer], weight[2 * layer + 1] = 80, 20
        others = [e for e in range(EXPERTS) if e not in (2 * layer, 2 * layer + 1)]
        weight[others] = rest[layer:] + rest[:layer]
        rows += [{"layer": layer, "expert": e, "tokens": int(weight[e])} for e in range(EXPERTS)]
    return pd.DataFrame(rows)


def heaviest_gpu(plan: pd.DataFrame, layer: int) -> int:
    return int(plan.loc[(plan["layer"] == layer) & (plan["expert"] == 2 * layer), "gpu"].iloc[0])


def test_the_model_figure_ranks_plans_as_every_layer_does():
    loads = skewed_loads()
    plans = {m: build_plan(loads, EP_SIZE, 0, m) for m in ("contiguous", "lpt")}
    # the case of issue 29: per-layer LPT plans all put their heaviest expert on GPU 0
    assert [heaviest_gpu(plans["lpt"], ly) for ly in range(LAYERS)] == [0] * LAYERS
    assert [heaviest_gpu(plans["contiguous"], ly) for ly in range(LAYERS)] == list(range(LAYERS))
    per_layer, model = compare_plans(loads, plans)
    by_layer = per_layer.pivot(index="layer", columns="plan", values="imbalance")
    assert (by_layer["lpt"] < by_layer["contiguous"]).all()  # every layer: lpt is better
    figure = model.set_index("plan")["imbalance"]
    assert figure["lpt"] < figure["contiguous"]  # ... and so is the step
    # the figure is Σ max / Σ mean over layers
    for name, plan in plans.items():
        ev = evaluate_placement(loads, plan)
        expected = ev["max_gpu_load"].sum() / ev["mean_gpu_load"].sum()
        assert figure[name] == pytest.approx(expected)
        assert model_imbalance(ev)["ep_balancedness"] == pytest.approx(1 / expected)
    # by hand: contiguous puts 80 + 20 on one GPU in every layer; each layer's mean is 178 / 4
    assert figure["contiguous"] == pytest.approx(4 * 100 / (4 * loads["tokens"].sum() / LAYERS / EP_SIZE))
    # what the summed-over-layers figure would have said: the opposite ranking
    summed = {
        name: gpu_loads(loads, plan).groupby("gpu")["load"].sum().pipe(lambda s: s.max() / s.mean())
        for name, plan in plans.items()
    }
    assert summed["contiguous"] == pytest.approx(1.0) and summed["lpt"] > 1.5


@pytest.fixture(scope="module")
def skewed_run(tmp_path_factory) -> Path:
    """A run directory holding exactly these loads (per-expert counts, one step)."""
    loads = skewed_loads()
    counts = loads.pivot(index="layer", columns="expert", values="tokens").to_numpy()[None, :, :]
    imported = ImportedRun(
        engine="test",
        mode="counts",
        num_hidden_layers=LAYERS,
        num_experts=dict.fromkeys(range(LAYERS), EXPERTS),
        top_k=dict.fromkeys(range(LAYERS), 2),
        expert_counts=counts_to_table(counts, list(range(LAYERS))),
    )
    return write_imported_run(imported, tmp_path_factory.mktemp("skewed") / "run")


def test_the_html_report_ranks_lpt_better_in_figure_and_numbers(skewed_run):
    from routescope.commands.html_report import placement_section
    from routescope.plots.placement import MODEL_LABEL

    with rs.open_run(skewed_run) as run:
        heading, figure, caption, numbers = placement_section(run, None)
    assert heading == f"Expert-parallel placement, {EP_SIZE} GPUs"
    step = {trace.name.split(" (")[0]: trace.y[list(trace.x).index(MODEL_LABEL)] for trace in figure.data}
    assert step["lpt"] < step["contiguous"]
    assert all(len(trace.x) == LAYERS + 1 for trace in figure.data)  # every layer, then the step
    bars = {trace.name.split(" (")[0]: trace.y[:LAYERS] for trace in figure.data}
    assert all(a < b for a, b in zip(bars["lpt"], bars["contiguous"]))  # lpt lower in every layer
    assert re.search(r"lpt [\d.]+ < contiguous [\d.]+", caption)
    assert "not added up across layers" in caption and "busiest GPU" in caption
    assert "step (Σ max / Σ mean)" in numbers and "lpt max/mean" in numbers


@pytest.mark.slow
def test_the_placement_command_prints_the_model_figure(skewed_run):
    from routescope.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["placement", str(skewed_run), "--ep-size", str(EP_SIZE), "--json"]) == 0
    model = json.loads(out.getvalue())["model"]
    assert model["lpt"]["imbalance"] < model["contiguous"]["imbalance"]
    _, expected = compare_plans(
        skewed_loads(), {m: build_plan(skewed_loads(), EP_SIZE, 0, m) for m in ("contiguous", "lpt")}
    )
    assert model["lpt"]["imbalance"] == pytest.approx(expected.set_index("plan").loc["lpt", "imbalance"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["placement", str(skewed_run), "--ep-size", str(EP_SIZE)]) == 0
    row = next(line for line in out.getvalue().splitlines() if "step (Σ max / Σ mean)" in line)
    contiguous, lpt = (float(x) for x in re.findall(r"\d\.\d+", row)[:2])
    assert lpt < contiguous

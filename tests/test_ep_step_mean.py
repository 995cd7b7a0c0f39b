"""`ep_balance_step_mean` (SPEC 4.1 ep_balancedness per forward step, averaged): the bincount
path for plans with one GPU per expert must equal the per-row merge it replaces, zero loads,
idle (step, layer) cells and experts the plan leaves out included."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from routescope.analysis.expert_parallel import ep_balance_step_mean


def merged(step_loads: pd.DataFrame, plan: pd.DataFrame) -> pd.DataFrame:
    """The definition, row by row: each step's mean_g G_g / max_g G_g, averaged over steps."""
    ep_size = int(plan["gpu"].max()) + 1
    rows = step_loads[step_loads["tokens"] > 0].merge(
        plan[["layer", "gpu", "expert"]], on=["layer", "expert"]
    )
    per_gpu = rows.groupby(["step", "layer", "gpu"])["tokens"].sum()
    per_step = per_gpu.groupby(level=["step", "layer"]).agg(["sum", "max"])
    ratio = per_step["sum"] / ep_size / per_step["max"]
    return ratio.groupby(level="layer").mean().rename("ep_balancedness_step_mean").reset_index()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bincount_path_equals_the_definition(seed):
    rng = np.random.default_rng(seed)
    layers, experts, steps, ep = [1, 3, 4], 8, 12, 4
    grid = pd.MultiIndex.from_product(
        [range(steps), layers, range(experts)], names=["step", "layer", "expert"]
    )
    loads = grid.to_frame(index=False).assign(
        tokens=rng.poisson(3, len(grid)) * (rng.random(len(grid)) < 0.7)
    )
    loads.loc[(loads["layer"] == 4) & (loads["step"] < 5), "tokens"] = 0  # layer 4 idle early on
    plan = pd.DataFrame(
        [(layer, e // (experts // ep), e % (experts // ep), e) for layer in layers for e in range(experts)],
        columns=["layer", "gpu", "slot", "expert"],
    )
    if seed == 2:
        plan = plan[~((plan["layer"] == 3) & (plan["expert"] == 0))]  # an expert the plan leaves out
    got = ep_balance_step_mean(loads, plan)
    want = merged(loads, plan)
    assert list(got["layer"]) == list(want["layer"])
    np.testing.assert_allclose(
        got["ep_balancedness_step_mean"], want["ep_balancedness_step_mean"], rtol=1e-12
    )
    assert ((got["ep_balancedness_step_mean"] > 0) & (got["ep_balancedness_step_mean"] <= 1)).all()

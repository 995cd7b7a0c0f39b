"""balance() beyond the expert level: aux_loss_step_mean (per forward step, as training sees it)
and expert-parallel balancedness per GPU (contiguous or an explicit placement), each against
an independent NumPy computation on the planted run of test_analysis_metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import routescope as rs
from tests import analysis_reference as ref
from tests.synthetic import write_run
from tests.test_analysis_metrics import LAYERS, E, plant


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    data = plant(seed=4)
    path = write_run(
        tmp_path_factory.mktemp("balance") / "run",
        data["experts"],
        E,
        seq_id=data["seq_id"],
        pos=data["pos"],
        token_id=data["token_id"],
        step=data["step"],
        phase=data["phase"],
        labels={"domain": data["domain"]},
        router_probs=data["probs"],
        num_hidden_layers=6,
        parts=2,
    )
    with rs.open_run(path) as run:
        yield run, data


def test_aux_loss_step_mean_is_the_mean_of_per_step_losses(planted):
    run, data = planted
    bal = run.balance().set_index("layer")
    for layer in LAYERS:
        probs, experts = data["probs"][layer], data["experts"][layer]
        expected = ref.aux_loss_step_mean(probs, experts, data["step"], E)
        assert bal.loc[layer, "aux_loss_step_mean"] == pytest.approx(expected, rel=1e-9)
        # pooled and per-step values differ on this data: they are two definitions
        assert bal.loc[layer, "aux_loss"] == pytest.approx(ref.aux_loss(probs, experts, E), rel=1e-9)
    prefill = data["phase"] == "prefill"
    sub = run.balance(where="phase = 'prefill'").set_index("layer")
    for layer in LAYERS:
        expected = ref.aux_loss_step_mean(
            data["probs"][layer][prefill], data["experts"][layer][prefill], data["step"][prefill], E
        )
        assert sub.loc[layer, "aux_loss_step_mean"] == pytest.approx(expected, rel=1e-9)
    partial = run.balance(where="pos < 5")
    assert partial["aux_loss_step_mean"].isna().all()


@pytest.mark.parametrize("ep_size", [1, 2, 4, 8])
def test_ep_balancedness_contiguous(planted, ep_size):
    run, data = planted
    bal = run.balance(ep_size=ep_size).set_index("layer")
    per_gpu = E // ep_size
    for layer in LAYERS:
        loads = ref.load(data["experts"][layer], E)
        gpus = [e // per_gpu for e in range(E)]
        expected = ref.ep_balancedness(loads, gpus, list(range(E)), ep_size)
        assert bal.loc[layer, "ep_balancedness"] == pytest.approx(expected, rel=1e-12)
        assert bal.loc[layer, "ep_size"] == ep_size
    if ep_size == E:  # one expert per GPU: the expert-level balancedness
        assert np.allclose(bal["ep_balancedness"], bal["balancedness"])
    if ep_size == 1:
        assert (bal["ep_balancedness"] == 1.0).all()


def test_ep_balancedness_follows_where(planted):
    run, data = planted
    code = data["domain"] == "code"
    bal = run.balance(where="domain = 'code'", ep_size=2, aux_loss=False).set_index("layer")
    for layer in LAYERS:
        loads = ref.load(data["experts"][layer][code], E)
        expected = ref.ep_balancedness(loads, [e // 4 for e in range(E)], list(range(E)), 2)
        assert bal.loc[layer, "ep_balancedness"] == pytest.approx(expected, rel=1e-12)


def test_ep_balancedness_with_a_replicating_placement(planted):
    run, data = planted
    # 2 GPUs x 5 slots: the hot expert 0 of layer 1 on both GPUs, the others spread by hand
    gpu = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    expert = [0, 1, 2, 3, 4, 0, 5, 6, 7, 1]
    rows = [
        {"layer": layer, "gpu": g, "slot": i % 5, "expert": e}
        for layer in LAYERS
        for i, (g, e) in enumerate(zip(gpu, expert))
    ]
    plan = pd.DataFrame(rows)
    bal = run.balance(placement=plan, aux_loss=False).set_index("layer")
    for layer in LAYERS:
        expected = ref.ep_balancedness(ref.load(data["experts"][layer], E), gpu, expert, 2)
        assert bal.loc[layer, "ep_balancedness"] == pytest.approx(expected, rel=1e-12)
    # a plan from Run.placement is accepted as is, and beats the contiguous layout on layer 1
    lpt = run.placement(2, redundant=2)
    planned = run.balance(placement=lpt, aux_loss=False).set_index("layer")
    contiguous = run.balance(ep_size=2, aux_loss=False).set_index("layer")
    assert planned.loc[1, "ep_balancedness"] >= contiguous.loc[1, "ep_balancedness"]
    # a placement of one layer only leaves the others NaN
    one = run.balance(placement=plan[plan["layer"] == 3], aux_loss=False).set_index("layer")
    assert np.isnan(one.loc[1, "ep_balancedness"]) and not np.isnan(one.loc[3, "ep_balancedness"])


@pytest.mark.slow
def test_ep_arguments_are_checked(planted):
    run, _ = planted
    with pytest.raises(ValueError, match="does not split the experts contiguously"):
        run.balance(ep_size=3)
    with pytest.raises(ValueError, match="positive integer"):
        run.balance(ep_size=0)
    plan = run.placement(2, method="contiguous")
    with pytest.raises(ValueError, match="ep_size=4 but the placement uses 2 GPUs"):
        run.balance(ep_size=4, placement=plan)
    with pytest.raises(ValueError, match="missing"):
        run.balance(placement=plan.drop(columns="slot"))
    with pytest.raises(ValueError, match="have no slot"):
        run.balance(placement=plan.assign(expert=plan["expert"].replace(7, 6)))
    with pytest.raises(ValueError, match="not MoE layers"):
        run.balance(placement=plan.assign(layer=plan["layer"] + 1))


def test_ep_balancedness_step_mean(planted):
    """SGLang logs its utilization rate per batch and averages: the step mean, per layer."""
    run, data = planted
    gpu = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    expert = [0, 1, 2, 3, 4, 0, 5, 6, 7, 1]
    plan = pd.DataFrame(
        [
            {"layer": layer, "gpu": g, "slot": i % 5, "expert": e}
            for layer in LAYERS
            for i, (g, e) in enumerate(zip(gpu, expert))
        ]
    )
    for kwargs, gpus, experts_of_slot, n in (
        ({"ep_size": 4}, [e // 2 for e in range(E)], list(range(E)), 4),
        ({"placement": plan}, gpu, expert, 2),
    ):
        bal = run.balance(aux_loss=False, where="phase = 'decode'", **kwargs).set_index("layer")
        decode = data["phase"] == "decode"
        for layer in LAYERS:
            per_step = [
                ref.ep_balancedness(
                    ref.load(data["experts"][layer][decode & (data["step"] == s)], E),
                    gpus,
                    experts_of_slot,
                    n,
                )
                for s in np.unique(data["step"][decode])
            ]
            assert bal.loc[layer, "ep_balancedness_step_mean"] == pytest.approx(np.mean(per_step), rel=1e-12)
            pooled = ref.ep_balancedness(
                ref.load(data["experts"][layer][decode], E), gpus, experts_of_slot, n
            )
            assert bal.loc[layer, "ep_balancedness"] == pytest.approx(pooled, rel=1e-12)

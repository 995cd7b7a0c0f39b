"""Placement plans (routescope/analysis/placement.py), their engine files and the `placement` command.

Loads come from NumPy (Zipf-skewed, seeded) or from real run directories written by
tests/synthetic.py and read through DuckDB. Engine round trips re-read the exported files the
way SGLang (`expert_location.py`) and vLLM (`tools/eplb/generate_static_mapping.py`) do.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import routescope as rs
from routescope.analysis.placement import (
    build_plan,
    check_plan,
    evaluate_placement,
    gpu_loads,
    replicate,
    step_loads,
)
from routescope.cli import main
from routescope.export import placement as export
from tests.synthetic import sample_topk, write_run

SEEDS = range(12)
SHAPES = [(16, 4), (16, 8), (32, 4), (12, 3)]  # (E, ep_size)


def zipf_loads(seed: int, num_experts: int, layers: int = 3, skew: float = 1.2) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for layer in range(layers):
        share = 1.0 / np.arange(1, num_experts + 1) ** skew
        counts = rng.multinomial(5000, share[rng.permutation(num_experts)] / share.sum())
        rows += [{"layer": layer, "expert": e, "tokens": int(c)} for e, c in enumerate(counts)]
    return pd.DataFrame(rows)


def max_loads(loads: pd.DataFrame, plan: pd.DataFrame) -> np.ndarray:
    return evaluate_placement(loads, plan)["max_gpu_load"].to_numpy()


def reference_gpu_loads(loads: pd.DataFrame, plan: pd.DataFrame) -> dict[tuple[int, int], float]:
    """Per (layer, gpu), by loops: each slot carries its expert's tokens / that expert's slot count."""
    out: dict[tuple[int, int], float] = {}
    for layer, rows in plan.groupby("layer"):
        tokens = dict(zip(loads[loads.layer == layer].expert, loads[loads.layer == layer].tokens))
        copies = rows["expert"].value_counts().to_dict()
        for gpu, expert in zip(rows.gpu, rows.expert):
            out[(layer, gpu)] = out.get((layer, gpu), 0.0) + tokens[expert] / copies[expert]
    return out


# -- plans --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", ["contiguous", "lpt", "eplb"])
@pytest.mark.parametrize(("num_experts", "ep_size"), SHAPES)
def test_plans_are_valid(method, num_experts, ep_size):
    for seed, redundant in itertools.product(SEEDS[:4], (0, ep_size, 2 * ep_size)):
        loads = zipf_loads(seed, num_experts)
        plan = build_plan(loads, ep_size, redundant, method)
        assert list(plan.columns) == ["layer", "gpu", "slot", "expert"]
        assert check_plan(plan, num_experts) == ep_size
        per_gpu = (num_experts + redundant) // ep_size
        for _, rows in plan.groupby("layer"):
            assert len(rows) == num_experts + redundant
            assert rows.groupby("gpu").size().eq(per_gpu).all()
            assert set(rows.expert) == set(range(num_experts))
            assert sorted(rows.slot[rows.gpu == 0]) == list(range(per_gpu))


@pytest.mark.slow
@pytest.mark.parametrize(("num_experts", "ep_size"), SHAPES)
def test_lpt_is_never_worse_than_contiguous_in_sample(num_experts, ep_size):
    for seed, skew in itertools.product(SEEDS, (0.3, 1.2, 2.5)):
        loads = zipf_loads(seed, num_experts, skew=skew)
        contiguous = max_loads(loads, build_plan(loads, ep_size, 0, "contiguous"))
        lpt = max_loads(loads, build_plan(loads, ep_size, 0, "lpt"))
        assert (lpt <= contiguous + 1e-9).all(), (seed, skew, lpt, contiguous)


@pytest.mark.slow
def test_lpt_beats_contiguous_on_skewed_loads():
    wins = 0
    for seed in SEEDS:
        loads = zipf_loads(seed, 16, skew=1.0)
        wins += int(
            (
                max_loads(loads, build_plan(loads, 4, 0, "lpt"))
                < max_loads(loads, build_plan(loads, 4, 0, "contiguous"))
            ).all()
        )
    assert wins >= len(SEEDS) // 2


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lpt", "eplb"])
@pytest.mark.parametrize(("num_experts", "ep_size"), SHAPES)
def test_redundant_slots_never_worse_than_none(method, num_experts, ep_size):
    for seed in SEEDS:
        loads = zipf_loads(seed, num_experts, skew=1.5)
        base = max_loads(loads, build_plan(loads, ep_size, 0, method))
        for redundant in (ep_size, 2 * ep_size):
            more = max_loads(loads, build_plan(loads, ep_size, redundant, method))
            assert (more <= base + 1e-9).all(), (seed, redundant, more, base)


def test_replicate_minimises_the_largest_per_replica_load():
    """EPLB's greedy replication against brute force over every way to hand out the extra slots."""
    rng = np.random.default_rng(3)
    for _ in range(30):
        weight = rng.integers(1, 100, size=5).astype(float)
        extra = int(rng.integers(1, 5))
        best = min(
            max(weight / (1 + np.bincount(combo, minlength=5)))
            for combo in itertools.combinations_with_replacement(range(5), extra)
        )
        counts = replicate(weight, 5 + extra)
        assert counts.sum() == 5 + extra and counts.min() >= 1
        assert max(weight / counts) == pytest.approx(best)


# DeepSeek EPLB's README example (github.com/deepseek-ai/EPLB): 2 layers x 12 experts, 16
# physical slots, 4 groups, 2 nodes, 8 GPUs; its printed phy2log, two slots per GPU.
DEEPSEEK_WEIGHT = np.array(
    [
        [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
    ]
)
DEEPSEEK_PHY2LOG = np.array(
    [
        [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
        [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
    ]
)


def _per_gpu(plan: pd.DataFrame, layer: int) -> list[list[int]]:
    rows = plan[plan["layer"] == layer]
    return [sorted(rows.loc[rows["gpu"] == g, "expert"].tolist()) for g in range(int(rows["gpu"].max()) + 1)]


def test_eplb_matches_deepseeks_example_and_never_doubles_an_expert_on_a_gpu():
    loads = pd.DataFrame(
        [(layer, e, int(w)) for layer, row in enumerate(DEEPSEEK_WEIGHT) for e, w in enumerate(row)],
        columns=["layer", "expert", "tokens"],
    )
    plan = build_plan(loads, ep_size=8, redundant=4, method="eplb", num_groups=4, num_nodes=2)
    theirs = pd.DataFrame(
        [
            (layer, p // 2, p % 2, int(e))
            for layer, row in enumerate(DEEPSEEK_PHY2LOG)
            for p, e in enumerate(row)
        ],
        columns=["layer", "gpu", "slot", "expert"],
    )
    assert _per_gpu(plan, 0) == _per_gpu(theirs, 0)  # layer 0: DeepSeek's plan exactly
    np.testing.assert_allclose(max_loads(loads, plan), max_loads(loads, theirs))  # 156.0, 179.5
    for layer in (0, 1):
        for gpu, held in enumerate(_per_gpu(plan, layer)):
            assert len(set(held)) == len(held), f"layer {layer} GPU {gpu} holds {held}"


@pytest.mark.parametrize("method", ["lpt", "eplb"])
@pytest.mark.parametrize("seed", range(6))
def test_a_doubled_expert_stays_only_when_no_swap_could_remove_it(method, seed):
    """A GPU holding one expert twice is left only when every swap that would undo it raises the
    busiest GPU (checked by brute force over all single swaps)."""
    loads = zipf_loads(seed, 16, layers=2, skew=1.6)
    plan = build_plan(loads, ep_size=4, redundant=8, method=method)
    worst = max_loads(loads, plan)
    for layer, rows in plan.groupby("layer"):
        weight = loads[loads.layer == layer].sort_values("expert")["tokens"].to_numpy(dtype=float)
        experts, gpus = rows["expert"].to_numpy(), rows["gpu"].to_numpy()
        share = weight[experts] / np.bincount(experts, minlength=16)[experts]
        load = np.bincount(gpus, weights=share, minlength=4)
        for i in range(len(experts)):
            if np.sum((gpus == gpus[i]) & (experts == experts[i])) < 2:
                continue
            for j in range(len(experts)):
                g, h = gpus[i], gpus[j]
                if h == g or experts[j] == experts[i]:
                    continue
                if experts[i] in experts[gpus == h] or experts[j] in experts[gpus == g]:
                    continue
                pair = max(load[g] - share[i] + share[j], load[h] - share[j] + share[i])
                assert pair > worst[layer] * (1 + 1e-9), f"layer {layer}: slot {i} could move to GPU {h}"


def test_eplb_hierarchical_keeps_each_group_on_one_node():
    num_experts, groups, nodes, ep_size = 16, 4, 2, 4
    loads = zipf_loads(0, num_experts)
    plan = build_plan(loads, ep_size, 4, "eplb", num_groups=groups, num_nodes=nodes)
    check_plan(plan, num_experts)
    gpus_per_node = ep_size // nodes
    for _, rows in plan.groupby("layer"):
        node_of = rows.assign(node=rows.gpu // gpus_per_node, group=rows.expert // (num_experts // groups))
        assert node_of.groupby("group")["node"].nunique().eq(1).all()
        assert node_of.groupby("node")["group"].nunique().eq(groups // nodes).all()


def test_evaluate_splits_a_replicated_expert_evenly():
    loads = zipf_loads(5, 16)
    plan = build_plan(loads, 4, 8, "eplb")
    assert plan.groupby("layer")["expert"].apply(lambda s: s.value_counts().max()).max() > 1
    reference = reference_gpu_loads(loads, plan)
    got = gpu_loads(loads, plan)
    for row in got.itertuples():
        assert row.load == pytest.approx(reference[(row.layer, row.gpu)])
    summary = evaluate_placement(loads, plan)
    per_layer = got.groupby("layer")["load"]
    assert np.allclose(summary["ep_balancedness"], (per_layer.mean() / per_layer.max()).to_numpy())
    assert np.allclose(summary["routing_slots"], loads.groupby("layer")["tokens"].sum().to_numpy())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ep_size": 3}, "do not split evenly"),
        ({"ep_size": 0}, "ep_size must be a positive integer"),
        ({"ep_size": 4, "redundant": -1}, "redundant must be an integer"),
        ({"ep_size": 4, "method": "greedy"}, "method 'greedy' is not known"),
        ({"ep_size": 4, "method": "eplb", "num_groups": 5, "num_nodes": 1}, "does not divide"),
    ],
)
def test_bad_arguments_say_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_plan(zipf_loads(0, 16), **kwargs)


def test_an_invalid_plan_is_refused():
    loads = zipf_loads(0, 8)
    plan = build_plan(loads, 2, 0, "lpt")
    missing_expert = plan.assign(expert=plan.expert.where(plan.expert != 3, 2))
    with pytest.raises(ValueError, match=r"experts \[3\] have no slot"):
        evaluate_placement(loads, missing_expert)
    with pytest.raises(ValueError, match="slots 0..S-1 exactly once"):
        evaluate_placement(loads, plan.assign(slot=0))


# -- plans from runs ------------------------------------------------------------------------
@pytest.fixture
def skewed_run(tmp_path: Path) -> Path:
    """Two MoE layers (1 and 3 of 4), 16 experts, top-2, 8 steps; the hot experts drift after step 3."""
    rng = np.random.default_rng(7)
    tokens, num_experts = 4000, 16
    step = np.repeat(np.arange(8), tokens // 8)
    experts = {}
    for layer in (1, 3):
        base = 1.0 / np.arange(1, num_experts + 1) ** 1.3
        early, late = base[rng.permutation(num_experts)], base[rng.permutation(num_experts)]
        probs = np.where((step < 4)[:, None], 0.8 * early + 0.2 * late, 0.2 * early + 0.8 * late)
        experts[layer] = sample_topk(rng, probs / probs.sum(1, keepdims=True), 2)
    return write_run(tmp_path / "run", experts, num_experts, seq_len=50, step=step, num_hidden_layers=4)


def test_run_placement_uses_the_run_loads(skewed_run: Path):
    with rs.open_run(skewed_run) as run:
        plan = run.placement(4, redundant=4, method="eplb")
        assert sorted(plan.layer.unique()) == [1, 3]
        loads = run.expert_load()
        assert plan.equals(build_plan(loads, 4, 4, "eplb"))
        window = run.placement(4, where="step < 4")
        assert window.equals(build_plan(run.expert_load(where="step < 4"), 4, 0, "lpt"))
        steps = step_loads(run)
        assert sorted(steps.step.unique()) == list(range(8))
        summed = steps.groupby(["layer", "expert"], as_index=False)["tokens"].sum()
        merged = loads.merge(summed, on=["layer", "expert"], how="left", suffixes=("", "_steps")).fillna(0)
        assert (merged.tokens == merged.tokens_steps).all()


def test_balance_with_a_placement_agrees_with_evaluate(skewed_run: Path):
    with rs.open_run(skewed_run) as run:
        plan = run.placement(4, redundant=4, method="eplb", where="step < 4")
        balance = run.balance(where="step >= 4", placement=plan)
        expected = evaluate_placement(run.expert_load(where="step >= 4"), plan)
    assert np.allclose(balance["ep_balancedness"].to_numpy(), expected["ep_balancedness"].to_numpy())
    assert (balance["ep_balancedness"] < 1.0).all()


def test_out_of_sample_is_measured_on_the_next_window(skewed_run: Path):
    with rs.open_run(skewed_run) as run:
        early, late = run.expert_load(where="step < 4"), run.expert_load(where="step >= 4")
        plan = run.placement(4, method="lpt", where="step < 4")
        in_sample = evaluate_placement(early, plan)["imbalance"]
        out_of_sample = evaluate_placement(late, plan)["imbalance"]
        refit = evaluate_placement(late, run.placement(4, method="lpt", where="step >= 4"))["imbalance"]
    # a plan fitted to the early window is no better on the drifted window than one fitted to it
    assert (refit.to_numpy() <= out_of_sample.to_numpy() + 1e-9).all()
    assert (in_sample.to_numpy() >= 1.0).all() and (out_of_sample.to_numpy() >= 1.0).all()


# -- engine files ---------------------------------------------------------------------------
def sglang_logical_to_all_physical(
    physical_to_logical: np.ndarray, num_logical: int
) -> list[list[list[int]]]:
    """As SGLang `_compute_logical_to_all_physical_map` (python/sglang/srt/eplb/expert_location.py)."""
    out = [[[] for _ in range(num_logical)] for _ in range(physical_to_logical.shape[0])]
    for layer, row in enumerate(physical_to_logical):
        for physical, logical in enumerate(row):
            out[layer][int(logical)].append(physical)
    return out


def vllm_rank_load(logical_load: np.ndarray, physical_to_logical: np.ndarray, num_ranks: int) -> np.ndarray:
    """As vLLM `_rank_load_for_mapping` (tools/eplb/generate_static_mapping.py): [layers, ranks]."""
    replicas = np.zeros_like(logical_load, dtype=float)
    for i, row in enumerate(physical_to_logical):
        np.add.at(replicas[i], row, 1.0)
    per_replica = logical_load / np.maximum(replicas, 1)
    per_rank = physical_to_logical.shape[1] // num_ranks
    return np.stack(
        [
            np.take_along_axis(per_replica, physical_to_logical[:, r * per_rank : (r + 1) * per_rank], 1).sum(
                1
            )
            for r in range(num_ranks)
        ],
        axis=1,
    )


def vllm_logical_to_physical(p2l: np.ndarray, num_logical: int) -> tuple[np.ndarray, np.ndarray]:
    """As vLLM `EplbState._load_initial_mapping`: physical ids per logical expert in slot order
    (padded with -1) and the replica count (vLLM's EPLB tests show the expected layout)."""
    logcnt = np.zeros((p2l.shape[0], num_logical), dtype=np.int64)
    l2p = np.full((p2l.shape[0], num_logical, p2l.shape[1]), -1, dtype=np.int64)
    for layer, row in enumerate(p2l):
        for physical, logical in enumerate(row):
            l2p[layer, logical, logcnt[layer, logical]] = physical
            logcnt[layer, logical] += 1
    return l2p, logcnt


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_sglang_files_round_trip(skewed_run: Path, tmp_path: Path, suffix: str):
    with rs.open_run(skewed_run) as run:
        plan = run.placement(4, redundant=4, method="eplb")
        loads = run.expert_load()
    facts = {"moe_layers": [1, 3], "num_hidden_layers": 4, "num_experts": 16}
    path = export.write_plan(tmp_path / f"location{suffix}", "sglang", plan, facts)
    data = export._read_dict(path)
    p2l = np.asarray(data["physical_to_logical_map"])
    assert p2l.shape == (4, 20)  # decoder layers x physical experts
    assert (p2l[[0, 2]] == np.arange(20) % 16).all()  # dense layers: SGLang's trivial layout
    for layer in (1, 3):
        assert all(sglang_logical_to_all_physical(p2l, 16)[layer])  # every logical expert has a slot
    back = export.read_sglang_plan(path, [1, 3], ep_size=4)
    assert (
        back.sort_values(["layer", "gpu", "slot"]).reset_index(drop=True).equals(plan.reset_index(drop=True))
    )
    counts = export.write_loads(tmp_path / f"count{suffix}", "sglang", loads.assign(step=0), facts)
    assert np.asarray(export._read_dict(counts)["logical_count"]).shape == (4, 16)
    reread = export.read_sglang_loads(counts, [1, 3])
    assert (reread.tokens.to_numpy() == loads.sort_values(["layer", "expert"]).tokens.to_numpy()).all()


def test_vllm_files_round_trip(skewed_run: Path, tmp_path: Path):
    with rs.open_run(skewed_run) as run:
        plan = run.placement(4, redundant=4, method="lpt")
        steps = step_loads(run)
        loads = run.expert_load()
    facts = {
        "moe_layers": [1, 3],
        "num_hidden_layers": 4,
        "num_experts": 16,
        "ep_size": 4,
        "model": "synthetic",
    }
    mapping = export.write_plan(tmp_path / "mapping.jsonl", "vllm", plan, facts)
    record = json.loads(mapping.read_text().splitlines()[0])
    assert record["record_type"] == "eplb_initial_mapping" and record["version"] == 1
    assert record["num_slots"] == 20 and record["num_redundant_experts"] == 4
    assert sorted(record["initial_global_assignments"]) == ["0", "1"]  # MoE layers counted from 0
    back = export.read_vllm_plan(mapping, [1, 3], ep_size=4)
    assert back.reset_index(drop=True).equals(plan.reset_index(drop=True))

    stats = export.write_loads(tmp_path / "stats.jsonl", "vllm", steps, facts)
    records = [json.loads(line) for line in stats.read_text().splitlines()]
    assert records[0]["record_type"] == "eplb_load_meta" and records[0]["num_layers"] == 2
    assert [r["step"] for r in records[1:]] == list(range(8))
    reread = export.read_vllm_loads(stats, [1, 3])
    total = reread.groupby(["layer", "expert"], as_index=False)["tokens"].sum()
    assert (total.tokens.to_numpy() == loads.sort_values(["layer", "expert"]).tokens.to_numpy()).all()

    # vLLM's own per-rank load of the exported mapping equals our evaluation of the plan
    p2l = np.asarray([record["initial_global_assignments"][str(i)] for i in range(2)])
    l2p, logcnt = vllm_logical_to_physical(p2l, 16)
    assert (logcnt >= 1).all() and logcnt.sum() == 2 * 20
    for layer in range(2):  # every replica listed once, pointing back to its logical expert
        for expert in range(16):
            slots = l2p[layer, expert, : logcnt[layer, expert]]
            assert (p2l[layer, slots] == expert).all()
    logical = total.pivot(index="layer", columns="expert", values="tokens").to_numpy(dtype=float)
    ours = gpu_loads(loads, plan).pivot(index="layer", columns="gpu", values="load").to_numpy()
    assert np.allclose(vllm_rank_load(logical, p2l, 4), ours)


def test_reading_a_file_of_the_wrong_kind_names_it(tmp_path: Path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"something": 1}))
    with pytest.raises(ValueError, match="no 'physical_to_logical_map'"):
        export.read_sglang_plan(path, [0], ep_size=1)
    with pytest.raises(ValueError, match="no eplb_initial_mapping record"):
        export.read_vllm_plan(path, [0], ep_size=1)


# -- command --------------------------------------------------------------------------------
@pytest.mark.slow
def test_placement_command_writes_plan_and_engine_files(skewed_run: Path, tmp_path: Path, capsys):
    out = tmp_path / "plan.csv"
    assert (
        main(
            [
                "placement",
                str(skewed_run),
                "--ep-size",
                "4",
                "--redundant",
                "4",
                "--method",
                "eplb",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "contiguous_imbalance" in text and str(out) in text
    with rs.open_run(skewed_run) as run:
        expected = run.placement(4, redundant=4, method="eplb")
    assert pd.read_csv(out).equals(expected.reset_index(drop=True))

    args = ["placement", str(skewed_run), "--ep-size", "4", "--format", "vllm", "--json"]
    args += [
        "--out",
        str(tmp_path / "m.jsonl"),
        "--loads-out",
        str(tmp_path / "s.jsonl"),
        "--where",
        "step < 4",
    ]
    args += ["--evaluate-where", "step >= 4"]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["summary"]) == 2 and len(doc["plan"]) == 2 * 16
    assert all(row["lpt_imbalance"] >= 1.0 for row in doc["summary"])
    assert (tmp_path / "m.jsonl").is_file() and (tmp_path / "s.jsonl").is_file()


def test_placement_command_bad_input_exits_2(skewed_run: Path, capsys):
    assert main(["placement", str(skewed_run), "--ep-size", "3"]) == 2
    assert "do not split evenly" in capsys.readouterr().err
    assert main(["placement", str(skewed_run), "--ep-size", "4", "--out", "plan.bin"]) == 2
    assert "--format" in capsys.readouterr().err

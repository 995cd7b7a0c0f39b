"""Expert-parallel placement plans built from a run's expert loads, and their evaluation.

`build_plan(loads, ep_size, ...)` turns per-(layer, expert) loads into a plan with one row per
physical expert slot (`layer, gpu, slot, expert`); `evaluate_placement(loads, plan)` gives the
per-GPU load it implies (a replicated expert's load split evenly over its replicas). `Run.placement`,
the `placement` command, the exporters and benchmarks/placement.py call these. NumPy and pandas
only: reading a run never imports torch. Methods: `contiguous`; `lpt` (longest processing time
first, then pairwise swaps off the busiest GPU); `eplb` (DeepSeek's EPLB policy, hierarchical or
global, re-implemented from github.com/deepseek-ai/EPLB `eplb.py`). See docs/placement.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from routescope.analysis.querying import checks_selection, counts_only, query
from routescope.analysis.runview import RunView as Run  # a Protocol: run.py imports us, not back

PLAN_COLUMNS = ["layer", "gpu", "slot", "expert"]
METHODS = ("contiguous", "lpt", "eplb")
SWAP_ROUNDS = 64  # per layer: swaps tried off the busiest GPU before lpt stops improving


# -- checks -----------------------------------------------------------------------------
def _check_sizes(num_experts: int, ep_size: Any, redundant: Any) -> tuple[int, int, int]:
    """(ep_size, redundant, slots per GPU) when (E + redundant) splits evenly over ep_size GPUs."""
    if isinstance(ep_size, bool) or not isinstance(ep_size, (int, np.integer)) or ep_size < 1:
        raise ValueError(
            f"ep_size must be a positive integer (GPUs in the expert-parallel group), got {ep_size!r}"
        )
    if isinstance(redundant, bool) or not isinstance(redundant, (int, np.integer)) or redundant < 0:
        raise ValueError(
            f"redundant must be an integer >= 0 (extra expert slots in total), got {redundant!r}"
        )
    physical = num_experts + int(redundant)
    if physical % int(ep_size):
        fits = [r for r in range(0, 4 * int(ep_size)) if (num_experts + r) % int(ep_size) == 0][:3]
        raise ValueError(
            f"E + redundant = {num_experts} + {redundant} = {physical} slots do not split evenly over "
            f"ep_size={ep_size} GPUs; redundant values that fit: {', '.join(map(str, fits))}, ..."
        )
    return int(ep_size), int(redundant), physical // int(ep_size)


def load_matrix(loads: pd.DataFrame) -> tuple[list[int], np.ndarray]:
    """(layers, [layers, E] float loads) from a `layer, expert, tokens` frame (Run.expert_load)."""
    missing = {"layer", "expert", "tokens"} - set(loads.columns)
    if missing:
        raise ValueError(
            f"loads need columns layer, expert, tokens (as Run.expert_load returns); missing {sorted(missing)}"
        )
    layers = sorted(int(x) for x in loads["layer"].unique())
    sizes = {layer: int(loads.loc[loads["layer"] == layer, "expert"].max()) + 1 for layer in layers}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"every MoE layer must have the same number of experts for a placement; got {sizes}")
    num_experts = next(iter(sizes.values()), 0)
    matrix = np.zeros((len(layers), num_experts), dtype=np.float64)
    row = {layer: i for i, layer in enumerate(layers)}
    matrix[loads["layer"].map(row).to_numpy(), loads["expert"].to_numpy(dtype=np.int64)] = loads[
        "tokens"
    ].to_numpy(dtype=np.float64)
    return layers, matrix


# -- building blocks (one layer at a time) -----------------------------------------------
def replicate(weight: np.ndarray, num_physical: int) -> np.ndarray:
    """Replica count per expert: each redundant slot goes to the expert with the largest load per replica.

    DeepSeek EPLB `replicate_experts`: minimises the largest per-replica load greedily.
    """
    counts = np.ones(len(weight), dtype=np.int64)
    for _ in range(num_physical - len(weight)):
        counts[int(np.argmax(weight / counts))] += 1
    return counts


def balanced_packing(weight: np.ndarray, num_packs: int) -> np.ndarray:
    """Pack index per item: heaviest first onto the lightest pack that still has room (len/num_packs each).

    LPT with a capacity, as DeepSeek EPLB `balanced_packing`; ties go to the lower pack index.
    """
    capacity = len(weight) // num_packs
    pack = np.full(len(weight), -1, dtype=np.int64)
    load = np.zeros(num_packs)
    used = np.zeros(num_packs, dtype=np.int64)
    for item in np.argsort(-weight, kind="stable"):
        free = np.flatnonzero(used < capacity)
        target = free[int(np.argmin(load[free]))]
        pack[item] = target
        load[target] += weight[item]
        used[target] += 1
    return pack


def improve_by_swaps(
    weight: np.ndarray, pack: np.ndarray, num_packs: int, rounds: int = SWAP_ROUNDS
) -> np.ndarray:
    """Swap an item of the busiest pack with a lighter item elsewhere while that lowers the pair's maximum.

    Every accepted swap lowers the busiest pack's load and raises no other pack above it, so the
    maximum never grows; slot counts per pack do not change.
    """
    pack = pack.copy()
    for _ in range(rounds):
        load = np.bincount(pack, weights=weight, minlength=num_packs)
        top = int(np.argmax(load))
        mine, others = np.flatnonzero(pack == top), np.flatnonzero(pack != top)
        if not len(others):
            break
        delta = weight[mine][:, None] - weight[others][None, :]
        after = np.maximum(load[top] - delta, load[pack[others]][None, :] + delta)
        after[delta <= 0] = np.inf
        a, b = np.unravel_index(int(np.argmin(after)), after.shape)
        if not after[a, b] < load[top] * (1 - 1e-12):
            break
        pack[mine[a]], pack[others[b]] = pack[others[b]], top
    return pack


def slot_loads(weight: np.ndarray, experts: np.ndarray) -> np.ndarray:
    """Load of each physical slot: its expert's load split evenly over that expert's replicas."""
    counts = np.bincount(experts, minlength=len(weight))
    return weight[experts] / counts[experts]


def _gpu_max(weight: np.ndarray, experts: np.ndarray, gpu: np.ndarray, ep_size: int) -> float:
    return float(np.bincount(gpu, weights=slot_loads(weight, experts), minlength=ep_size).max())


def spread_replicas(
    weight: np.ndarray, experts: np.ndarray, gpu: np.ndarray, ep_size: int, gpus_per_node: int | None = None
) -> np.ndarray:
    """GPU per slot with no expert held twice by one GPU, where a swap allows it without raising
    the busiest GPU's load.

    A second replica on the GPU that already holds the expert balances nothing and wastes a slot.
    Each such replica is swapped with a slot of another GPU (of the same node when `gpus_per_node`
    is given: EPLB's hierarchical plan keeps each expert group on its node) that holds a different
    expert neither GPU would then hold twice; of the swaps that keep both GPUs at or below the
    current busiest load, the one with the lowest resulting pair maximum wins (then the closest
    slot load, then the lowest GPU). A duplicate no such swap can remove stays.
    """
    gpu = gpu.copy()
    share = slot_loads(weight, experts)
    per_node = gpus_per_node or ep_size
    for _ in range(len(experts)):
        load = np.bincount(gpu, weights=share, minlength=ep_size)
        held = [set(experts[gpu == g].tolist()) for g in range(ep_size)]
        _, first, counts = np.unique(gpu * len(weight) + experts, return_index=True, return_counts=True)
        if not (counts > 1).any():
            break
        dup = int(first[np.argmax(counts > 1)])
        g, e, w = int(gpu[dup]), int(experts[dup]), share[dup]
        best: tuple[float, float, int] | None = None
        pick = -1
        for j in range(len(experts)):
            h, f, v = int(gpu[j]), int(experts[j]), share[j]
            if h == g or h // per_node != g // per_node or f == e or e in held[h] or f in held[g]:
                continue
            pair = max(load[g] - w + v, load[h] - v + w)
            if pair > load.max() * (1 + 1e-12):
                continue
            key = (pair, abs(v - w), h)
            if best is None or key < best:
                best, pick = key, j
        if pick < 0:
            break
        gpu[dup], gpu[pick] = gpu[pick], g
    return gpu


# -- methods: each returns (expert, gpu) per physical slot of one layer -------------------
def contiguous_layer(
    weight: np.ndarray, ep_size: int, num_physical: int, **_: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Physical slot p holds expert p mod E on GPU p // slots: vLLM's initial layout (no loads used)."""
    physical = np.arange(num_physical)
    return physical % len(weight), physical // (num_physical // ep_size)


def _replicas(weight: np.ndarray, num_physical: int) -> tuple[np.ndarray, np.ndarray]:
    counts = replicate(weight, num_physical)
    experts = np.repeat(np.arange(len(weight)), counts)
    return experts, weight[experts] / counts[experts]


def lpt_layer(weight: np.ndarray, ep_size: int, num_physical: int, **_: Any) -> tuple[np.ndarray, np.ndarray]:
    """Replicate the hottest experts, LPT-pack the replicas, then swap off the busiest GPU.

    Guards: never worse than contiguous (refined) on these loads, and with redundant slots never
    worse than the plan without them (its layout, each GPU's extra slots holding copies of its own
    experts, gives the same GPU loads).
    """
    experts, loads = _replicas(weight, num_physical)
    candidates = [(experts, improve_by_swaps(loads, balanced_packing(loads, ep_size), ep_size))]
    base_experts, base_gpu = contiguous_layer(weight, ep_size, num_physical)
    base_loads = slot_loads(weight, base_experts)
    candidates.append((base_experts, improve_by_swaps(base_loads, base_gpu, ep_size)))
    if num_physical > len(weight) and len(weight) % ep_size == 0:
        candidates.append(
            _pad_with_local_copies(weight, *lpt_layer(weight, ep_size, len(weight)), num_physical, ep_size)
        )
    experts, gpu = min(candidates, key=lambda c: _gpu_max(weight, c[0], c[1], ep_size))
    return experts, spread_replicas(weight, experts, gpu, ep_size)


def _pad_with_local_copies(
    weight: np.ndarray, experts: np.ndarray, gpu: np.ndarray, num_physical: int, ep_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """A plan without redundancy, grown to num_physical slots by copying each GPU's hottest experts
    onto that same GPU: the load of every GPU stays exactly what it was."""
    extra = (num_physical - len(experts)) // ep_size
    add_e, add_g = [], []
    for g in range(ep_size):
        own = experts[gpu == g]
        hottest = own[np.argsort(-weight[own], kind="stable")]
        picks = np.resize(hottest, extra) if len(hottest) else np.zeros(0, dtype=np.int64)
        add_e.append(picks)
        add_g.append(np.full(len(picks), g))
    return np.concatenate([experts, *add_e]), np.concatenate([gpu, *add_g])


def eplb_layer(
    weight: np.ndarray, ep_size: int, num_physical: int, num_groups: int = 1, num_nodes: int = 1, **_: Any
) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek EPLB. Hierarchical: pack expert groups onto nodes (balanced_packing), replicate
    within each node, pack each node's replicas onto its GPUs. Global (1 group, 1 node): replicate
    over all experts, pack onto all GPUs. Guard: with redundant slots, never worse than R = 0."""
    num_experts = len(weight)
    group_size = num_experts // num_groups
    gpus_per_node = ep_size // num_nodes
    group_node = balanced_packing(weight.reshape(num_groups, group_size).sum(axis=1), num_nodes)
    experts_out, gpu_out = [], []
    for node in range(num_nodes):
        local = np.concatenate(
            [np.arange(g * group_size, (g + 1) * group_size) for g in np.flatnonzero(group_node == node)]
        )
        counts = replicate(weight[local], num_physical // num_nodes)
        experts = np.repeat(local, counts)
        loads = np.repeat(weight[local] / counts, counts)
        experts_out.append(experts)
        gpu_out.append(node * gpus_per_node + balanced_packing(loads, gpus_per_node))
    plan = np.concatenate(experts_out), np.concatenate(gpu_out)
    if num_physical > num_experts and num_experts % ep_size == 0:
        base = eplb_layer(weight, ep_size, num_experts, num_groups, num_nodes)
        padded = _pad_with_local_copies(weight, *base, num_physical, ep_size)
        if _gpu_max(weight, *padded, ep_size) < _gpu_max(weight, *plan, ep_size):
            plan = padded
    return plan[0], spread_replicas(weight, *plan, ep_size, gpus_per_node)


LAYER_METHODS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "contiguous": contiguous_layer,
    "lpt": lpt_layer,
    "eplb": eplb_layer,
}


def _check_hierarchy(
    num_experts: int, ep_size: int, num_groups: int | None, num_nodes: int
) -> tuple[int, int]:
    """(groups, nodes) for eplb: hierarchical when groups split over nodes, else global (1, 1), as DeepSeek does."""
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, (int, np.integer)) or num_nodes < 1:
        raise ValueError(f"num_nodes must be a positive integer, got {num_nodes!r}")
    if num_groups is None or (num_groups == 1 and num_nodes == 1):
        return 1, 1
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
        raise ValueError(
            f"num_groups must be a positive integer (expert groups of the router), got {num_groups!r}"
        )
    if num_experts % num_groups:
        raise ValueError(
            f"num_groups={num_groups} does not divide the {num_experts} experts into equal groups"
        )
    if ep_size % num_nodes:
        raise ValueError(f"ep_size={ep_size} GPUs do not split evenly over num_nodes={num_nodes}")
    if num_groups % num_nodes:
        return 1, 1  # DeepSeek: groups that do not split over nodes -> the global policy
    return int(num_groups), int(num_nodes)


# -- plans -------------------------------------------------------------------------------
def build_plan(
    loads: pd.DataFrame,
    ep_size: int,
    redundant: int = 0,
    method: str = "lpt",
    num_groups: int | None = None,
    num_nodes: int = 1,
) -> pd.DataFrame:
    """`layer, gpu, slot, expert`: one row per physical slot, (E + redundant) / ep_size slots per GPU.

    `loads`: `layer, expert, tokens` (Run.expert_load). `num_groups` / `num_nodes` select EPLB's
    hierarchical policy (groups packed onto nodes first) when num_groups is a multiple of num_nodes.
    """
    if method not in LAYER_METHODS:
        raise ValueError(f"method {method!r} is not known; use one of {', '.join(METHODS)}")
    layers, matrix = load_matrix(loads)
    if not layers:
        raise ValueError("no expert loads to place: the run (or the where= selection) has no MoE layer")
    num_experts = matrix.shape[1]
    ep_size, redundant, per_gpu = _check_sizes(num_experts, ep_size, redundant)
    groups, nodes = _check_hierarchy(num_experts, ep_size, num_groups, num_nodes)
    frames = []
    for layer, weight in zip(layers, matrix):
        experts, gpu = LAYER_METHODS[method](
            weight, ep_size, num_experts + redundant, num_groups=groups, num_nodes=nodes
        )
        order = np.lexsort((experts, gpu))
        experts, gpu = experts[order], gpu[order]
        frames.append(
            pd.DataFrame(
                {"layer": layer, "gpu": gpu, "slot": np.tile(np.arange(per_gpu), ep_size), "expert": experts}
            )
        )
    plan = pd.concat(frames, ignore_index=True).astype(
        {"layer": "int64", "gpu": "int64", "slot": "int64", "expert": "int64"}
    )
    plan.attrs.update(method=method, ep_size=ep_size, redundant=redundant)
    check_plan(plan, num_experts)
    return plan


def check_plan(plan: pd.DataFrame, num_experts: int) -> int:
    """ep_size of a valid plan; ValueError saying what is wrong otherwise.

    Valid: columns layer, gpu, slot, expert; per layer every GPU 0..N-1 holds slots 0..S-1 once,
    and every expert 0..E-1 has at least one slot.
    """
    missing = set(PLAN_COLUMNS) - set(plan.columns)
    if missing:
        raise ValueError(
            f"a placement plan needs columns {', '.join(PLAN_COLUMNS)}; missing {sorted(missing)}"
        )
    if plan.empty:
        raise ValueError("the placement plan has no rows")
    ep_size = int(plan["gpu"].max()) + 1
    if _plan_is_valid(plan, num_experts, ep_size):  # one vectorised pass; the loop below names faults
        return ep_size
    for layer, rows in plan.groupby("layer"):
        per_gpu = rows.groupby("gpu")["slot"].agg(["count", "nunique", "min", "max"])
        if len(per_gpu) != ep_size or per_gpu.index.min() != 0:
            raise ValueError(
                f"layer {layer}: the plan uses GPUs {sorted(per_gpu.index)}; expected 0..{ep_size - 1}"
            )
        slots = int(per_gpu["count"].iloc[0])
        bad = per_gpu[(per_gpu["count"] != slots) | (per_gpu["nunique"] != slots) | (per_gpu["min"] != 0)]
        if len(bad) or int(per_gpu["max"].max()) != slots - 1:
            raise ValueError(
                f"layer {layer}: every GPU must hold slots 0..S-1 exactly once; GPUs at fault: {list(bad.index)}"
            )
        experts = rows["expert"].to_numpy()
        if experts.min() < 0 or experts.max() >= num_experts:
            raise ValueError(f"layer {layer}: expert ids must lie in 0..{num_experts - 1}")
        absent = sorted(set(range(num_experts)) - set(experts.tolist()))
        if absent:
            raise ValueError(
                f"layer {layer}: experts {absent[:10]} have no slot; every expert needs at least one"
            )
    return ep_size


def _plan_is_valid(plan: pd.DataFrame, num_experts: int, ep_size: int) -> bool:
    """check_plan's rules for every layer at once (True: valid); False sends check_plan to the
    per-layer loop that says which rule a layer breaks."""
    per_gpu = plan.groupby(["layer", "gpu"])["slot"].agg(["count", "nunique", "min", "max"])
    gpus = per_gpu.reset_index().groupby("layer")["gpu"].agg(["count", "min", "max"])
    if not ((gpus["count"] == ep_size) & (gpus["min"] == 0) & (gpus["max"] == ep_size - 1)).all():
        return False
    slots = per_gpu.groupby(level="layer")["count"].transform("first")
    if not ((per_gpu["count"] == slots) & (per_gpu["nunique"] == slots) & (per_gpu["min"] == 0)).all():
        return False
    if not (per_gpu["max"] == slots - 1).all():
        return False
    experts = plan["expert"].to_numpy()
    if len(experts) and (experts.min() < 0 or experts.max() >= num_experts):
        return False
    covered = plan.groupby("layer")["expert"].nunique()
    return bool((covered == num_experts).all())


def gpu_loads(loads: pd.DataFrame, plan: pd.DataFrame) -> pd.DataFrame:
    """`layer, gpu, load`: tokens each GPU computes under the plan (replicas share their expert's load)."""
    layers, matrix = load_matrix(loads)
    ep_size = check_plan(plan, matrix.shape[1])
    unknown = sorted(set(plan["layer"].unique()) - set(layers))
    if unknown:
        raise ValueError(f"the plan places layers {unknown} that the loads do not have; loads cover {layers}")
    frames = []
    for layer, rows in plan.groupby("layer", sort=True):
        weight = matrix[layers.index(int(layer))]
        experts = rows["expert"].to_numpy(dtype=np.int64)
        load = np.bincount(rows["gpu"].to_numpy(), weights=slot_loads(weight, experts), minlength=ep_size)
        frames.append(pd.DataFrame({"layer": int(layer), "gpu": np.arange(ep_size), "load": load}))
    return pd.concat(frames, ignore_index=True)


def evaluate_placement(loads: pd.DataFrame, plan: pd.DataFrame) -> pd.DataFrame:
    """Per layer: ep_size, routing_slots (N = Σ L_e), max_gpu_load, mean_gpu_load, ep_balancedness (mean / max, SPEC 4.1),
    and imbalance (max / mean, 1.0 = perfectly even) of the loads under the plan."""
    per_gpu = gpu_loads(loads, plan)
    out = per_gpu.groupby("layer")["load"].agg(
        ep_size="count", routing_slots="sum", max_gpu_load="max", mean_gpu_load="mean"
    )
    out["ep_balancedness"] = out["mean_gpu_load"] / out["max_gpu_load"].where(out["max_gpu_load"] > 0)
    out["imbalance"] = out["max_gpu_load"] / out["mean_gpu_load"].where(out["mean_gpu_load"] > 0)
    return out.reset_index()


@checks_selection(name="placement")
def plan_for_run(
    run: Run,
    ep_size: int,
    redundant: int = 0,
    method: str = "lpt",
    where: str | None = None,
    num_groups: int | None = None,
    num_nodes: int = 1,
) -> pd.DataFrame:
    """`build_plan` on the run's expert loads over the tokens selected by `where`."""
    return build_plan(run.expert_load(where=where), ep_size, redundant, method, num_groups, num_nodes)


@checks_selection
def step_loads(run: Run, where: str | None = None) -> pd.DataFrame:
    """`step, layer, expert, tokens` per forward step (named query `step_expert_load`).

    A counts-only run (imported per-expert counters) gives its loads summed over the selected
    steps as one row set with step 0.
    """
    if counts_only(run):
        loads = run.expert_load(where=where)
        return loads.assign(step=0)[["step", "layer", "expert", "tokens"]]
    return query(run, "step_expert_load", where=where)

"""Independent NumPy references for the routing metrics (SPEC section 4), for the analysis tests.

Each takes the arrays a synthetic run was written from ((T, k) expert ids per layer) and
computes the metric directly from its definition, with no SQL and no shared code.
"""

from __future__ import annotations

from collections import Counter

import numpy as np


def load(experts: np.ndarray, num_experts: int) -> np.ndarray:
    return np.bincount(np.asarray(experts).ravel(), minlength=num_experts)


def balance(experts: np.ndarray, num_experts: int) -> dict[str, float]:
    loads = load(experts, num_experts).astype(float)
    mean = loads.sum() / num_experts
    share = loads / loads.sum()
    nz = share[share > 0]
    return {
        "tokens": int(np.asarray(experts).shape[0]),
        "cv": float(np.sqrt(((loads - mean) ** 2).sum() / num_experts) / mean),
        "max_violation": float((loads.max() - mean) / mean),
        "balancedness": float(mean / loads.max()),
        "norm_entropy": float(-(nz * np.log(nz)).sum() / np.log(num_experts)),
    }


def coactivation(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """(E, E) counts of ordered pairs of distinct slots of the same token."""
    counts = np.zeros((num_experts, num_experts), dtype=np.int64)
    for row in np.asarray(experts):
        for i, a in enumerate(row):
            for j, b in enumerate(row):
                if i != j:
                    counts[a, b] += 1
    return counts


def contingency(a: np.ndarray, b: np.ndarray, ea: int, eb: int) -> np.ndarray:
    table = np.zeros((ea, eb), dtype=np.int64)
    np.add.at(table, (np.asarray(a), np.asarray(b)), 1)
    return table


def entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def information(table: np.ndarray) -> dict[str, float]:
    n = table.sum()
    p = table / n
    pa = p.sum(1, keepdims=True)
    pb = p.sum(0, keepdims=True)
    nz = p > 0
    mi = float((p[nz] * np.log2(p[nz] / (pa * pb)[nz])).sum())
    hb = entropy_bits(table.sum(0))
    return {
        "mutual_info_bits": mi,
        "norm_mutual_info": mi / hb if hb > 0 else 0.0,
        "cond_entropy_bits": hb - mi,
        "top1_predictability": float(table.max(1).sum() / n),
        "entropy_a_bits": entropy_bits(table.sum(1)),
        "entropy_b_bits": hb,
    }


def pathways(experts: dict[int, np.ndarray]) -> Counter:
    layers = sorted(experts)
    return Counter(
        tuple(int(experts[layer][t, 0]) for layer in layers) for t in range(len(experts[layers[0]]))
    )


def repetition(slot0: np.ndarray, seq_id: np.ndarray, pos: np.ndarray) -> tuple[int, int]:
    """(pairs, repeats) of consecutive positions of the same sequence."""
    where = {(int(s), int(p)): int(e) for s, p, e in zip(seq_id, pos, slot0)}
    pairs = repeats = 0
    for (s, p), e in where.items():
        nxt = where.get((s, p + 1))
        if nxt is not None:
            pairs += 1
            repeats += int(nxt == e)
    return pairs, repeats


def aux_loss(probs: np.ndarray, experts: np.ndarray, num_experts: int) -> float:
    """E · Σ_e (L_e / T) · P̄_e from per-token probabilities and the chosen experts."""
    t = probs.shape[0]
    return float(num_experts * (load(experts, num_experts) / t * probs.mean(0)).sum())


def super_experts_reference(
    layer: np.ndarray, output_max: np.ndarray, total_layers: int, quantile: float = 99.5, times: int = 10
) -> set[int]:
    """Row indices flagged by the Super Experts paper code (eval_utils.py, BaseEvaluator):
    `_super_experts_analysis` keeps layer_index < round(total_layers * 0.75) (Python round),
    `_identify_super_experts` flags output_max > np.percentile(pool, 99.5) and
    > np.max(pool) // times, over that pool only."""
    include = round(total_layers * 0.75)
    rows = [i for i in range(len(layer)) if int(layer[i]) < include]
    pool = [float(output_max[i]) for i in rows]
    if not pool:
        return set()
    p = np.percentile(pool, quantile)
    top = np.max(pool) // times
    return {i for i in rows if output_max[i] > p and output_max[i] > top}


def aux_loss_step_mean(probs: np.ndarray, experts: np.ndarray, step: np.ndarray, num_experts: int) -> float:
    """Mean over forward steps of each step's aux_loss (what a training loop sees per batch)."""
    return float(
        np.mean([aux_loss(probs[step == s], experts[step == s], num_experts) for s in np.unique(step)])
    )


def ep_balancedness(
    loads: np.ndarray, gpu_of_slot: list[int], expert_of_slot: list[int], num_gpus: int
) -> float:
    """mean / max of per-GPU loads; an expert's load split evenly over the slots holding it
    (SGLang compute_utilization_rate over physical counts, without its 1e-5)."""
    replicas = Counter(expert_of_slot)
    gpu = [0.0] * num_gpus
    for g, e in zip(gpu_of_slot, expert_of_slot):
        gpu[g] += loads[e] / replicas[e]
    return float(np.mean(gpu) / max(gpu))


def repetition_top2(top2: np.ndarray, seq_id: np.ndarray, pos: np.ndarray) -> tuple[int, int]:
    """(pairs, pairs whose top-2 sets share an expert) over consecutive positions of a sequence."""
    where = {(int(s), int(p)): set(map(int, row[:2])) for s, p, row in zip(seq_id, pos, top2)}
    pairs = hits = 0
    for (s, p), chosen in where.items():
        nxt = where.get((s, p + 1))
        if nxt is not None:
            pairs += 1
            hits += int(bool(chosen & nxt))
    return pairs, hits


def olmoe_vocab(keys: list, experts: np.ndarray) -> dict:
    """OLMoE run_moe_analysis.py `print_avg` after `do_token_analysis_layers_experts --topk k`:
    per key the k experts of each of its tokens are appended in data order (`extend`); the top
    expert is `sorted(Counter(ids).items(), key=lambda x: -x[1])[0]` (first seen wins a tie) and
    its share is count / (len // k). Returns key -> (top_expert, share, occurrences, ties)."""
    k = experts.shape[1]
    ids: dict = {}
    for key, row in zip(keys, np.asarray(experts).tolist()):
        if key is not None:
            ids.setdefault(key, []).extend(row)
    out = {}
    for key, exp_ids in ids.items():
        counts = Counter(exp_ids)
        top, val = sorted(counts.items(), key=lambda x: -x[1])[0]
        out[key] = (top, val / (len(exp_ids) // k), len(exp_ids) // k, sum(v == val for v in counts.values()))
    return out

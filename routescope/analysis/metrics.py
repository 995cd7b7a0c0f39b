"""Routing-health metrics (SPEC section 4): each takes a Run plus parameters, returns a DataFrame.

The SQL lives in `queries/*.sql`; `querying.py` checks arguments, binds parameters, stacks
the named queries as CTEs and caches shared tables. `Run`'s metric methods delegate here; `METRICS` lists them so
they can be looped over (tests, reports). The one piece of user text that enters SQL is
the `where=` predicate, composed as `SELECT * FROM tokens WHERE (<where>)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from routescope.analysis.expert_parallel import ep_balance, ep_balance_step_mean, ep_plan
from routescope.analysis.querying import (  # noqa: F401 - compare, placement and tests read metrics.X
    ROUTER_STATS_HINT,
    _bind,
    build_counts_query,
    build_query,
    cached_frame,
    check_label,
    check_layer,
    check_where,
    checks_selection,
    counts_only,
    layer_params,
    query,
    require_first_choice,
    require_routing,
    token_count,
)
from routescope.analysis.runview import RunView as Run  # a Protocol: run.py imports us, not back
from routescope.analysis.sqlfiles import get_query


@checks_selection
def expert_load(run: Run, where: str | None = None) -> pd.DataFrame:
    """layer, expert, tokens, share: every expert of every MoE layer, zero-load ones included."""
    return query(run, "expert_load", where=where, uses=("expert_counts",))


@checks_selection
def balance(
    run: Run,
    where: str | None = None,
    aux_loss: bool | None = None,
    ep_size: int | None = None,
    placement: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Per MoE layer: tokens, cv, max_violation, balancedness, norm_entropy (+ aux_loss,
    aux_loss_step_mean) (+ ep_size, ep_balancedness).

    aux_loss=None adds the aux columns when the run has `router_stats`; True demands them. The
    statistics are per forward step, so a `where=` that splits a step leaves them NaN (True
    then raises). `ep_size=N` places the experts contiguously on N GPUs (E/N each) and adds
    ep_balancedness = mean / max of the per-GPU loads (pooled, and ep_balancedness_step_mean
    per forward step, averaged); `placement=` (layer, gpu, slot, expert) places them as
    given, a replicated expert's load split evenly over its replicas.
    """
    df = query(run, "balance", where=where, uses=("expert_counts",))
    df = _with_aux_loss(run, df, where, aux_loss)
    if ep_size is not None or placement is not None:
        loads = expert_load(run, where=where)
        plan = ep_plan(loads, ep_size, placement)
        df = df.merge(ep_balance(loads, plan), on="layer", how="left")
        steps = ep_balance_step_mean(step_expert_loads(run, where), plan)
        df = df.merge(steps.astype({"layer": df["layer"].dtype}), on="layer", how="left")
    return df


@checks_selection
def step_expert_loads(run: Run, where: str | None = None) -> pd.DataFrame:
    """step, layer, expert, tokens: routing rows per forward step (summed over ranks), from
    routing or, on a counts-only run, from its per-step `expert_counts`."""
    if counts_only(run):
        where = check_where(run, where)
        sql, needed = build_counts_query(where, "step_imported_expert_counts")
        return run.con.execute(sql, _bind("step_imported_expert_counts", needed, layer_params(run))).df()
    where = check_where(run, where)
    return cached_frame(run, "step_expert_load", where, lambda: query(run, "step_expert_load", where=where))


def _with_aux_loss(run: Run, df: pd.DataFrame, where: str | None, aux_loss: bool | None) -> pd.DataFrame:
    """`df` with aux_loss and aux_loss_step_mean when asked for (None: when router_stats exist)."""
    recorded = run.has_table("router_stats")
    if aux_loss is None:
        aux_loss, demanded = recorded, False
    else:
        demanded = bool(aux_loss)
    if not aux_loss:
        return df
    if not recorded:
        raise ValueError(f"aux_loss needs the router_stats table, which this run lacks: {ROUTER_STATS_HINT}")
    where = check_where(run, where)
    partial = 0 if where is None else int(query(run, "step_coverage", where=where)["partial_steps"].iloc[0])
    if partial:
        if demanded:
            raise ValueError(
                f"aux_loss cannot follow where={where!r}: it selects part of {partial} forward step(s), "
                "and router_stats are summed per step (filter whole steps, e.g. by phase, step or a label)"
            )
        return df.assign(aux_loss=math.nan, aux_loss_step_mean=math.nan)
    aux = query(run, "aux_loss", where=where)
    per_step = query(run, "aux_loss_step_mean", where=where)[["layer", "aux_loss_step_mean"]]
    return df.merge(aux, on="layer", how="left").merge(per_step, on="layer", how="left")


@checks_selection
def dead_experts(run: Run, max_share: float = 0.0, where: str | None = None) -> pd.DataFrame:
    """Experts with share <= max_share, with tokens_seen T and p_uniform_miss = (1 − k/E)^T."""
    if not 0.0 <= float(max_share) <= 1.0:
        raise ValueError(f"max_share must lie in [0, 1], got {max_share}")
    return query(run, "dead_experts", where=where, uses=("expert_counts",), max_share=float(max_share))


@checks_selection
def hot_experts(run: Run, factor: float = 2.0, where: str | None = None) -> pd.DataFrame:
    """Experts with share >= factor / E; ratio = share · E."""
    if not float(factor) > 0:
        raise ValueError(f"factor must be positive (a multiple of the uniform share 1/E), got {factor}")
    return query(run, "hot_experts", where=where, uses=("expert_counts",), factor=float(factor))


# -- co-activation and entanglement (SPEC 4.3, 4.4) ------------------------------------
@checks_selection
def coactivation(run: Run, layer: int, where: str | None = None) -> pd.DataFrame:
    """expert_a, expert_b, count, p_b_given_a over every ordered pair of distinct experts of `layer`."""
    require_routing(run, "coactivation")
    return query(run, "coactivation", where=where, layer=check_layer(run, layer))


def permute_pairs(counts: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The pair counts after a seeded random permutation of B across the tokens of each layer pair.

    Drawn without expanding the tokens: under a uniform random permutation of B the tokens of
    expert a (in ascending order of a) take a uniformly random subset of size n_a of the B
    values not yet taken, so row a of the permuted table is one multivariate hypergeometric
    draw from what is left. Both margins are kept exactly, the table has the permutation's
    distribution, and the cost is E_a × E_b per layer pair whatever the number of tokens.
    The draws depend only on the counts and `numpy.random.default_rng([seed, layer, next_layer])`.
    """
    counts = counts[counts["count"] > 0]
    if counts.empty:
        return counts.iloc[:0]
    layer = counts["layer"].to_numpy(dtype=np.int64)
    keys, pair = np.unique(layer * 65536 + counts["next_layer"].to_numpy(dtype=np.int64), return_inverse=True)
    pairs = np.stack([keys // 65536, keys % 65536], axis=1)
    a = counts["expert_a"].to_numpy(dtype=np.int64)
    b = counts["expert_b"].to_numpy(dtype=np.int64)
    rows, width = int(a.max()) + 1, int(b.max()) + 1
    tables = np.zeros((len(pairs), rows, width), dtype=np.int64)
    np.add.at(tables, (pair.reshape(-1), a, b), counts["count"].to_numpy(dtype=np.int64))
    joint = np.zeros_like(tables)
    for i, (layer, next_layer) in enumerate(pairs):
        need = tables[i].sum(axis=1)  # n_a
        left = tables[i].sum(axis=0)  # the B values not yet given out
        rng = np.random.default_rng([int(seed), int(layer), int(next_layer)])
        for row in np.flatnonzero(need):
            if need[row] == left.sum():  # the last row takes what is left
                joint[i, row] = left
            else:
                joint[i, row] = rng.multivariate_hypergeometric(left, int(need[row]), method="marginals")
            left = left - joint[i, row]
    index, expert_a, expert_b = np.nonzero(joint)
    return pd.DataFrame(
        {
            "layer": pairs[index, 0],
            "next_layer": pairs[index, 1],
            "expert_a": expert_a,
            "expert_b": expert_b,
            "count": joint[index, expert_a, expert_b],
        }
    )


def pair_counts_table(observed: pd.DataFrame, permuted: pd.DataFrame) -> pa.Table:
    cols = ["layer", "next_layer", "expert_a", "expert_b", "count"]
    return pa.table(
        {
            **{
                c: np.concatenate([observed[c].to_numpy(np.int64), permuted[c].to_numpy(np.int64)])
                for c in cols
            },
            "sample": np.repeat(np.array([0, 1], dtype=np.int64), [len(observed), len(permuted)]),
        }
    )


@checks_selection
def entanglement(run: Run, where: str | None = None, seed: int = 0) -> pd.DataFrame:
    """Per consecutive pair of MoE layers: MI of the slot-0 experts, normalized, H(B|A),
    top-1 predictability and the MI of a seeded permutation of B (`baseline_mutual_info_bits`)."""
    require_routing(run, "entanglement")
    require_first_choice(run, "entanglement", where)
    observed = query(run, "top1_pair_counts", where=where, uses=("top1_paths",))
    table = pair_counts_table(observed, permute_pairs(observed, seed))
    info = get_query("pair_information")
    df = run.con.from_arrow(table).query("pair_counts", info.sql).df()
    layers = sorted(run.moe_layers)
    pairs = pd.DataFrame({"layer": layers[:-1], "next_layer": layers[1:]}, dtype="int16")
    out = pairs.merge(
        df.astype({"layer": "int16", "next_layer": "int16"}), on=["layer", "next_layer"], how="left"
    )
    return out.astype({"tokens": "float64"}).fillna({"tokens": 0}).astype({"tokens": "int64"})


@checks_selection
def transition(run: Run, layer: int, next_layer: int, where: str | None = None) -> pd.DataFrame:
    """Full co-routing matrix of slot-0 experts between two MoE layers: expert_a, expert_b, count, p_b_given_a."""
    require_routing(run, "transition")
    require_first_choice(run, "transition", where)
    layer, next_layer = check_layer(run, layer), check_layer(run, next_layer)
    layers = sorted(run.moe_layers)
    consecutive = layers.index(layer) + 1 < len(layers) and layers[layers.index(layer) + 1] == next_layer
    # the rollups keep pairs of consecutive MoE layers only
    return query(run, "transition", where=where, rollup=consecutive, layer=layer, next_layer=next_layer)


@checks_selection
def pathways(run: Run, top: int = 20, where: str | None = None) -> pd.DataFrame:
    """The `top` most frequent slot-0 expert paths through all MoE layers: path, count, share."""
    require_routing(run, "pathways")
    require_first_choice(run, "pathways", where)
    if int(top) != top or int(top) < 1:
        raise ValueError(f"top must be a positive integer, got {top!r}")
    df = query(run, "pathways", where=where, uses=("top1_paths",), top=int(top))
    df["path"] = [[int(e) for e in p] for p in df["path"]]
    return df


# -- specialization (SPEC 4.5) ----------------------------------------------------------
@checks_selection
def specialization(run: Run, by: str, where: str | None = None) -> pd.DataFrame:
    """<by>, layer, expert, tokens, share, lift: each label value's load and its lift over 1/E."""
    require_routing(run, "specialization")
    label = check_label(run, by)
    df = query(run, "specialization", where=where, label=label)
    return df.rename(columns={"label_value": label})


# OLMoE's run_moe_analysis.py lists a token id under its top expert only with >= 10 occurrences.
OLMOE_MIN_OCCURRENCES = 10
VOCAB_KEYS = {"token": "vocab_counts_token", "next_token": "vocab_counts_next_token"}


@checks_selection
def vocab_specialization(
    run: Run, where: str | None = None, min_occurrences: int = 1, by: str = "token"
) -> pd.DataFrame:
    """Per layer and token id: occurrences, top_expert, top_share (OLMoE), ties, baseline k/E, lift.

    by="token" keys each routed token by its own id; by="next_token" by the ground-truth next
    token (OLMoE's `gt_next_token_to_exp`). Among experts with equal counts the one seen first
    in (seq_id, pos, slot) order wins, as OLMoE's stable sort of a Counter; `ties` says how many
    share the top count. `min_occurrences=OLMOE_MIN_OCCURRENCES` applies OLMoE's filter.
    """
    require_routing(run, "vocab_specialization")
    if by not in VOCAB_KEYS:
        raise ValueError(f"by must be one of {', '.join(map(repr, VOCAB_KEYS))}, got {by!r}")
    if int(min_occurrences) != min_occurrences or int(min_occurrences) < 1:
        raise ValueError(f"min_occurrences must be an integer >= 1, got {min_occurrences!r}")
    return query(
        run,
        "vocab_specialization",
        where=where,
        uses=(("vocab_counts", VOCAB_KEYS[by]),),
        min_occurrences=int(min_occurrences),
    )


@checks_selection
def token_specialization(run: Run, where: str | None = None, min_occurrences: int = 1) -> pd.DataFrame:
    """Per layer, OLMoE's "token specialization": the mean over token ids of top_share, for the
    input tokens (`specialization`) and the ground-truth next tokens (`next_token_specialization`),
    with how many ids each averages and the uniform baseline k/E."""
    parts = []
    for by, column in (("token", "specialization"), ("next_token", "next_token_specialization")):
        df = vocab_specialization(run, where=where, min_occurrences=min_occurrences, by=by)
        parts.append(
            df.groupby("layer")
            .agg(
                **{
                    column: ("top_share", "mean"),
                    f"{by}_ids": ("token_id", "count"),
                    "baseline": ("baseline", "first"),
                }
            )
            .reset_index()
        )
    out = pd.DataFrame({"layer": run.moe_layers}).astype({"layer": parts[0]["layer"].dtype})
    out = out.merge(parts[0], on="layer", how="left").merge(
        parts[1].drop(columns="baseline"), on="layer", how="left"
    )
    return out[
        ["layer", "token_ids", "specialization", "next_token_ids", "next_token_specialization", "baseline"]
    ]


@checks_selection
def repetition_rate(run: Run, where: str | None = None) -> pd.DataFrame:
    """Per layer: consecutive token pairs, repeats of the slot-0 expert, rate, baseline 1/E, Σ p_e²;
    and (k >= 2) repeats_top2, repetition_rate_top2 (top-2 sets share an expert, Mixtral Table 5's
    "first or second choice") with baseline_top2 = 1 − C(E−2,2)/C(E,2)."""
    require_routing(run, "repetition_rate")
    require_first_choice(run, "repetition_rate", where)
    return query(run, "repetition_rate", where=where, uses=("top1_paths",))


# -- Super Experts (SPEC 4.6) -----------------------------------------------------------
def expert_activations(run: Run) -> pd.DataFrame:
    """The calibration table per (layer, expert, shared): max_abs_output, channel, tokens_seen.

    `rs.classify_super_experts(df, num_hidden_layers)` adds `is_super`.
    """
    if not run.has_table("expert_activations"):
        raise ValueError(
            "this run has no expert_activations table: calibrate with rs.find_super_experts(...)"
        )
    return query(run, "expert_activations")


def hidden_stats(run: Run) -> pd.DataFrame:
    """Per decoder layer from the calibration: max_abs, median_abs, channel, seq_id, pos of the
    residual stream (massive activations: `classify_massive` adds is_massive)."""
    if not run.has_table("hidden_stats"):
        raise ValueError(
            "this run has no hidden_stats table: calibrate with rs.find_super_experts(..., out=RUN)"
        )
    return query(run, "hidden_stats")


def to_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """A metric frame's rows as plain Python values with NaN as None, ready for JSON."""
    out = []
    for row in df.to_dict(orient="records"):
        clean = {}
        for key, value in row.items():
            if hasattr(value, "tolist"):
                value = value.tolist()
            if isinstance(value, float) and math.isnan(value):
                value = None
            clean[str(key)] = value
        out.append(clean)
    return out


Metric = Callable[..., pd.DataFrame]

METRICS: dict[str, Metric] = {
    "expert_load": expert_load,
    "balance": balance,
    "dead_experts": dead_experts,
    "hot_experts": hot_experts,
    "coactivation": coactivation,
    "entanglement": entanglement,
    "transition": transition,
    "pathways": pathways,
    "specialization": specialization,
    "vocab_specialization": vocab_specialization,
    "token_specialization": token_specialization,
    "repetition_rate": repetition_rate,
}

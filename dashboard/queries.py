"""The data each dashboard page draws, as functions `f(run, *hashable_args) -> DataFrame | dict`.

Metrics come from the Run API (`run.expert_load()`, `run.balance()`, ...), with the page's
filter applied through `TokenFilter.call_with_where`. The few lookups the API has no method
for (filter choices, the tokens routed to one expert, one sequence's routing, calibration
tables) are parameterised SQL over the run's views through `run.sql(query, params)`, and
every one of them is bounded (LIMIT / window) so no callback ships more than it draws.
`QUERIES` maps names to functions; `RunRegistry.query` runs and caches them per run.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import pandas as pd

import routescope as rs
from routescope.dashboard.filters import TokenFilter, quote_identifier, step_axis
from routescope.dashboard.sampled import PATHWAYS_MAX, coactivation_view, pathways  # noqa: F401 - pages read PATHWAYS_MAX here

ALL = TokenFilter()
MAX_LABEL_VALUES = 200  # per label in a filter dropdown
MAX_SEQUENCES = 500  # in the Tokens page's sequence list
MAX_LANE_CELLS = 6144  # tokens × MoE layers drawn by the Tokens page at once
MAX_LANE_TOKENS = 256
TOP_TOKENS = 15  # tokens listed in an expert's details
MAX_STEP_BINS = 120  # columns of the Time page's expert × step heatmap
MIN_LIFT_OCCURRENCES = 5  # a token must occur this often before its lift is listed
SMALL_SAMPLE_PER_EXPERT = 30  # fewer routing slots per expert than this: warn that shares are noisy


# -- run facts ---------------------------------------------------------------------------
def summary(run: rs.Run) -> dict[str, Any]:
    """Manifest facts for the Overview page (small: no table scans beyond a count)."""
    m = run.manifest
    layers = run.moe_layers
    experts = sorted({run.num_experts(ly) for ly in layers})
    top_k = sorted({run.top_k(ly) for ly in layers})
    counts = run.sql("SELECT count(*) AS tokens, count(DISTINCT seq_id) AS sequences FROM tokens")
    return {
        "model_name": str(m.get("model_name", "")),
        "model_type": str(m.get("model_type", "")),
        "num_hidden_layers": int(m.get("num_hidden_layers", 0)),
        "moe_layers": layers,
        "num_experts": experts,
        "top_k": top_k,
        "top_k_by_layer": {ly: run.top_k(ly) for ly in layers},
        "num_shared_experts": m.get("num_shared_experts"),
        "tokens": int(counts["tokens"].iloc[0]),
        "manifest_tokens": int(m.get("tokens", 0) or 0),
        "sequences": int(counts["sequences"].iloc[0]),
        "labels": run.labels,
        "complete": run.complete,
        "verified": m.get("verified"),
        "unverified_reason": m.get("unverified_reason"),
        "transformers": (m.get("versions") or {}).get("transformers"),
        "created_at": m.get("created_at"),
        "updated_at": m.get("updated_at"),
        "tables": run.tables,
        # routing alerts rs.watch raised while training (docs/training.md), kept live in the manifest
        "training_alerts": list((m.get("training") or {}).get("alerts") or []),
    }


def filter_choices(run: rs.Run) -> dict[str, Any]:
    """Phases, label values (most frequent first, capped) and the step range present."""
    phases = run.sql("SELECT DISTINCT phase FROM tokens ORDER BY phase")["phase"].dropna().tolist()
    axis = step_axis(run)  # optimizer steps in a training run
    steps = run.sql(f"SELECT min({axis}) AS lo, max({axis}) AS hi FROM tokens")
    lo, hi = steps["lo"].iloc[0], steps["hi"].iloc[0]
    values: dict[str, list[str]] = {}
    for label in run.labels:
        col = quote_identifier(label)
        df = run.sql(
            f"SELECT {col} AS value, count(*) AS n FROM tokens WHERE {col} IS NOT NULL "
            "GROUP BY 1 ORDER BY n DESC, value LIMIT ?",
            [MAX_LABEL_VALUES],
        )
        values[label] = [str(v) for v in df["value"]]
    ranks = run.sql("SELECT DISTINCT rank FROM tokens WHERE rank IS NOT NULL ORDER BY rank")["rank"]
    return {
        "phases": phases,
        "labels": values,
        "ranks": [int(r) for r in ranks],
        "step_min": None if pd.isna(lo) else int(lo),
        "step_max": None if pd.isna(hi) else int(hi),
    }


# -- metrics through the Run API --------------------------------------------------------
def expert_load(run: rs.Run, flt: TokenFilter = ALL) -> pd.DataFrame:
    return flt.call_with_where(run, run.expert_load)


def balance(run: rs.Run, flt: TokenFilter = ALL, ep_size: int | None = None) -> pd.DataFrame:
    """run.balance(); with `ep_size`, also ep_balancedness for experts placed contiguously on
    that many GPUs (SPEC 4.1)."""
    if ep_size is None:
        return flt.call_with_where(run, run.balance)
    return flt.call_with_where(run, run.balance, ep_size=int(ep_size))


def dead_experts(run: rs.Run, flt: TokenFilter = ALL) -> pd.DataFrame:
    return flt.call_with_where(run, run.dead_experts)


def hot_experts(run: rs.Run, flt: TokenFilter = ALL) -> pd.DataFrame:
    return flt.call_with_where(run, run.hot_experts)


def doctor(run: rs.Run, flt: TokenFilter = ALL) -> pd.DataFrame:
    """run.doctor(): the findings that head the Overview (SPEC 4.8)."""
    return flt.call_with_where(run, run.doctor)


def coactivation(run: rs.Run, layer: int, flt: TokenFilter = ALL) -> pd.DataFrame:
    check_layer(run, layer)
    return flt.call_with_where(run, run.coactivation, layer)


def entanglement(run: rs.Run, flt: TokenFilter = ALL) -> pd.DataFrame:
    return flt.call_with_where(run, run.entanglement)


def transition(run: rs.Run, layer: int, next_layer: int, flt: TokenFilter = ALL) -> pd.DataFrame:
    check_layer(run, layer)
    check_layer(run, next_layer)
    return flt.call_with_where(run, run.transition, layer, next_layer)


def specialization(run: rs.Run, label: str, flt: TokenFilter = ALL) -> pd.DataFrame:
    if label not in run.labels:
        raise ValueError(f"label {label!r} is not a label of this run (labels: {', '.join(run.labels)})")
    return flt.call_with_where(run, run.specialization, by=label)


def repetition(run: rs.Run, flt: TokenFilter = ALL) -> pd.DataFrame:
    return flt.call_with_where(run, run.repetition_rate)


def check_layer(run: rs.Run, layer: int) -> None:
    if layer not in run.moe_layers:
        raise ValueError(f"layer {layer} is not a MoE layer of this run (MoE layers: {run.moe_layers})")


# -- lookups the API has no method for (bounded, parameterised) -------------------------
def expert_detail(run: rs.Run, layer: int, expert: int, flt: TokenFilter = ALL) -> dict[str, Any]:
    """One expert of one layer: its load, most frequent tokens, most co-activated experts."""
    check_layer(run, layer)
    if not 0 <= expert < run.num_experts(layer):
        raise ValueError(f"expert {expert} does not exist in layer {layer} (0..{run.num_experts(layer) - 1})")
    load = expert_load(run, flt)
    row = load[(load["layer"] == layer) & (load["expert"] == expert)]
    top, by_lift = top_tokens(run, layer, expert, flt)
    co = coactivation(run, layer, flt)
    partners = (
        co[(co["expert_a"] == expert) & (co["count"] > 0)].sort_values("p_b_given_a", ascending=False).head(8)
        if not co.empty
        else co
    )
    return {
        "layer": layer,
        "expert": expert,
        "tokens": int(row["tokens"].iloc[0]) if len(row) else 0,
        "share": float(row["share"].iloc[0]) if len(row) else 0.0,
        "num_experts": run.num_experts(layer),
        "top_tokens": top,
        "top_lift": by_lift,
        "partners": partners[["expert_b", "count", "p_b_given_a"]] if len(partners) else partners,
    }


def top_tokens(
    run: rs.Run, layer: int, expert: int, flt: TokenFilter = ALL
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The tokens routed to one expert, most frequent first and most over-represented first.

    Both frames: token_id, token, count (times routed here), occurrences (times seen at all
    under the filter), lift = (count / L_e) / (occurrences / T): how much more often the
    token appears among this expert's tokens than among all tokens (1.0 = as often).
    The lift list keeps tokens seen at least MIN_LIFT_OCCURRENCES times with lift above 1.
    """
    pred, params = flt.sql(run, alias="t")
    df = run.sql(
        "WITH sel AS (SELECT t.seq_id, t.pos, t.token_id FROM tokens t WHERE "
        + pred
        + "), hits AS (SELECT s.token_id, count(*) AS count FROM routing r JOIN sel s USING (seq_id, pos) "
        "WHERE r.layer = ? AND r.expert = ? GROUP BY s.token_id), "
        "totals AS (SELECT token_id, count(*) AS occurrences FROM sel GROUP BY token_id), "
        "scored AS (SELECT h.token_id, h.count, o.occurrences, "
        "(h.count / sum(h.count) OVER ()) / (o.occurrences / (SELECT count(*) FROM sel)) AS lift "
        "FROM hits h JOIN totals o USING (token_id)), "
        "ranked AS (SELECT *, row_number() OVER (ORDER BY count DESC, token_id) AS by_count, "
        "row_number() OVER (ORDER BY CASE WHEN occurrences >= ? THEN lift END DESC NULLS LAST, "
        "count DESC, token_id) AS by_lift FROM scored) "
        "SELECT * FROM ranked WHERE by_count <= ? OR (by_lift <= ? AND occurrences >= ?)",
        [*params, layer, expert, MIN_LIFT_OCCURRENCES, TOP_TOKENS, TOP_TOKENS, MIN_LIFT_OCCURRENCES],
    )
    ids = tuple(sorted({int(t) for t in df["token_id"]}))
    names = dict(zip(ids, token_strings(run, ids)))
    df["token"] = [names[int(t)] for t in df["token_id"]]
    columns = ["token_id", "token", "count", "occurrences", "lift"]
    by_count = df[df["by_count"] <= TOP_TOKENS].sort_values("by_count")[columns].reset_index(drop=True)
    keep = (df["by_lift"] <= TOP_TOKENS) & (df["occurrences"] >= MIN_LIFT_OCCURRENCES) & (df["lift"] > 1)
    by_lift = df[keep]
    return by_count, by_lift.sort_values("by_lift")[columns].reset_index(drop=True)


# -- time and ranks (per-bin balance computed here until the Run API has it) -------------
# One 128-bit key per token for the routing-tokens join: DuckDB joins on one integer column
# about 5x faster than on (seq_id, pos) (0.7 s against 4.5 s at 10M routing rows).
TOKEN_KEY = "((t.seq_id::HUGEINT << 32) + t.pos)"
ROUTING_KEY = "((r.seq_id::HUGEINT << 32) + r.pos)"


def step_loads(run: rs.Run, flt: TokenFilter = ALL, max_bins: int = MAX_STEP_BINS) -> pd.DataFrame:
    """Load per (step bin, layer, expert) with every expert present (zero when idle).

    Steps are cut into at most `max_bins` bins of equal width. Columns: step_lo, step_hi,
    layer, expert, tokens (L_e within the bin), share (within bin and layer), lift (share × E).
    """
    pred, params = flt.sql(run, alias="t")
    axis = step_axis(run)  # `step`, or `train_step` in a training run: a fixed column name
    bounds = run.sql(f"SELECT min(t.{axis}) AS lo, max(t.{axis}) AS hi FROM tokens t WHERE {pred}", params)
    lo, hi = bounds["lo"].iloc[0], bounds["hi"].iloc[0]
    columns = ["step_lo", "step_hi", "layer", "expert", "tokens", "share", "lift"]
    if pd.isna(lo):
        return pd.DataFrame(columns=columns)
    lo, hi = int(lo), int(hi)
    width = max(1, math.ceil((hi - lo + 1) / max(1, int(max_bins))))
    if "rollup_expert_counts" in run.rollups and axis == "step":  # summed rollup rows (SPEC 3.3)
        pred, params = flt.sql(run)
        counts = run.sql(
            f"SELECT (step - ?) // ? AS bin, layer, expert, sum(tokens)::BIGINT AS tokens "
            f"FROM rollup_expert_counts WHERE step IS NOT NULL AND {pred} GROUP BY ALL HAVING sum(tokens) > 0",
            [lo, width, *params],
        )
    else:
        counts = run.sql(
            f"SELECT (t.{axis} - ?) // ? AS bin, r.layer, r.expert, count(*) AS tokens FROM routing r "
            f"JOIN (SELECT {TOKEN_KEY} AS key, t.{axis} FROM tokens t WHERE {pred}) t ON {ROUTING_KEY} = t.key "
            "GROUP BY ALL",
            [lo, width, *params],
        )
    # every expert of a layer in every bin where that layer routed anything (zero when idle)
    experts = pd.DataFrame(
        [(layer, e) for layer in run.moe_layers for e in range(run.num_experts(layer))],
        columns=["layer", "expert"],
    )
    counts = counts.astype({"bin": "int64", "layer": "int64", "expert": "int64"})
    grid = counts[["bin", "layer"]].drop_duplicates().merge(experts, on="layer")
    df = grid.merge(counts, on=["bin", "layer", "expert"], how="left").fillna({"tokens": 0})
    df["tokens"] = df["tokens"].astype("int64")
    df["step_lo"] = lo + df["bin"].astype(int) * width
    df["step_hi"] = (df["step_lo"] + width - 1).clip(upper=hi)
    total = df.groupby(["bin", "layer"])["tokens"].transform("sum")
    experts = df.groupby(["bin", "layer"])["expert"].transform("count")
    df["share"] = df["tokens"] / total.where(total > 0)
    df["lift"] = df["share"] * experts
    return df[columns].sort_values(["layer", "step_lo", "expert"]).reset_index(drop=True)


def balance_over_steps(run: rs.Run, flt: TokenFilter = ALL) -> pd.DataFrame:
    """SPEC 4.1 balance metrics per (step bin, layer) of `step_loads(run, flt)`."""
    return balance_of_step_loads(step_loads(run, flt))


def balance_of_step_loads(loads: pd.DataFrame) -> pd.DataFrame:
    """cv, max_violation, balancedness, norm_entropy per (step bin, layer) of step_loads rows
    (`rs.balance_from_loads`, the analysis layer's formulas, over the cached counts)."""
    stats = rs.balance_from_loads(loads, ["step_lo", "step_hi", "layer"])
    return stats.sort_values(["layer", "step_lo"]).reset_index(drop=True)


def rank_loads(run: rs.Run, flt: TokenFilter = ALL) -> pd.DataFrame:
    """Load per (rank, layer, expert), every expert present: rank, layer, expert, tokens, share."""
    if "rollup_expert_counts" in run.rollups:  # summed rollup rows (SPEC 3.3)
        pred, params = flt.sql(run)
        counts = run.sql(
            "SELECT rank, layer, expert, sum(tokens)::BIGINT AS tokens FROM rollup_expert_counts "
            f"WHERE step IS NOT NULL AND {pred} GROUP BY ALL HAVING sum(tokens) > 0",
            params,
        )
    elif flt.is_empty:  # routing carries its rank (from the part's path): no join needed
        counts = run.sql("SELECT rank, layer, expert, count(*) AS tokens FROM routing GROUP BY ALL")
    else:
        pred, params = flt.sql(run, alias="t")
        counts = run.sql(
            "SELECT t.rank, r.layer, r.expert, count(*) AS tokens FROM routing r "
            f"JOIN (SELECT {TOKEN_KEY} AS key, t.rank FROM tokens t WHERE {pred}) t ON {ROUTING_KEY} = t.key "
            "GROUP BY ALL",
            params,
        )
    frames = []
    for rank in sorted(counts["rank"].dropna().unique()):
        for layer in run.moe_layers:
            part = counts[(counts["rank"] == rank) & (counts["layer"] == layer)].set_index("expert")["tokens"]
            part = (
                part.reindex(range(run.num_experts(layer)), fill_value=0).rename_axis("expert").reset_index()
            )
            part["rank"], part["layer"] = int(rank), layer
            frames.append(part)
    if not frames:
        return pd.DataFrame(columns=["rank", "layer", "expert", "tokens", "share"])
    df = pd.concat(frames, ignore_index=True)
    total = df.groupby(["rank", "layer"])["tokens"].transform("sum")
    df["share"] = df["tokens"] / total.where(total > 0)
    return df[["rank", "layer", "expert", "tokens", "share"]]


def sequences(run: rs.Run) -> pd.DataFrame:
    """The first sequences of the run with their length and labels, for the Tokens page."""
    labels = "".join(f", any_value({quote_identifier(lb)}) AS {quote_identifier(lb)}" for lb in run.labels)
    return run.sql(
        f"SELECT seq_id, count(*) AS tokens{labels} FROM tokens "
        "WHERE seq_id IN (SELECT DISTINCT seq_id FROM tokens ORDER BY seq_id LIMIT ?) "
        "GROUP BY seq_id ORDER BY seq_id",
        [MAX_SEQUENCES],
    )


def lane_window(run: rs.Run) -> int:
    """Tokens per Tokens-page window: the cell cap split over the MoE layers."""
    return max(8, min(MAX_LANE_TOKENS, MAX_LANE_CELLS // max(1, len(run.moe_layers))))


def lanes(run: rs.Run, seq_id: int, start: int) -> pd.DataFrame:
    """One sequence's routing for a window of positions: pos, layer, token, experts, weights."""
    window = lane_window(run)
    start = max(0, int(start))
    df = run.sql(
        "SELECT r.pos, r.layer, t.token_id, list(r.expert ORDER BY r.slot) AS experts, "
        "list(r.weight ORDER BY r.slot) AS weights "
        "FROM routing r JOIN tokens t USING (seq_id, pos) "
        "WHERE r.seq_id = ? AND r.pos >= ? AND r.pos < ? AND t.seq_id = ? AND t.pos >= ? AND t.pos < ? "
        "GROUP BY r.pos, r.layer, t.token_id ORDER BY r.pos, r.layer",
        [int(seq_id), start, start + window, int(seq_id), start, start + window],
    )
    ids = tuple(sorted({int(t) for t in df["token_id"]}))
    names = dict(zip(ids, token_strings(run, ids)))
    df["token"] = [names[int(t)] for t in df["token_id"]]
    return df


def sequence_length(run: rs.Run, seq_id: int) -> int:
    df = run.sql("SELECT count(*) AS n FROM tokens WHERE seq_id = ?", [int(seq_id)])
    return int(df["n"].iloc[0])


def comparison(run_a: rs.Run, run_b: rs.Run, saturation: bool = True) -> Any:
    """`routescope.compare(run_a, run_b)`: load and balance deltas, expert changes, and with
    `saturation` router saturation and token agreement (the slow part: the page asks for it in a
    callback of its own)."""
    return rs.compare(run_a, run_b, saturation=saturation)


def saturation_comparison(run_a: rs.Run, run_b: rs.Run) -> Any:
    """`comparison` with router saturation and token agreement: long on big runs, so the registry
    runs it on connections of its own (`APART`) and the pages' other queries do not wait for it."""
    return comparison(run_a, run_b, saturation=True)


# -- Super Experts -----------------------------------------------------------------------
def super_experts(run: rs.Run) -> dict[str, Any]:
    """Calibration rows classified by `rs.classify_super_experts` (SPEC 4.6) and its thresholds."""
    if not run.has_table("expert_activations"):
        return {"has_data": False}
    acts = run.expert_activations()
    experts = rs.classify_super_experts(acts, num_hidden_layers=int(run.manifest.get("num_hidden_layers", 0)))
    thresholds = experts.attrs.get("thresholds", {})
    return {
        "has_data": True,
        "experts": experts,
        "percentile_threshold": thresholds.get("percentile_threshold"),
        "max_threshold": thresholds.get("max_threshold"),
        "median": thresholds.get("median"),
        "pooled_experts": thresholds.get("pooled_experts"),
        "layers": thresholds.get("layers"),
    }


def hidden_stats(run: rs.Run) -> pd.DataFrame:
    """`run.hidden_stats()` (largest |hidden| per decoder layer, its channel, the median) with
    `is_massive` (|h| > 100 and > 1000 × median) from the calibration's own classifier."""
    if not run.has_table("hidden_stats"):
        return pd.DataFrame(columns=["layer", "max_abs", "median_abs", "channel", "is_massive"])
    return rs.classify_massive(run.hidden_stats())


# -- expert-parallel placement ----------------------------------------------------------
def placement(
    run: rs.Run, ep_size: int, redundant: int, method: str, fit_max_step: int | None = None
) -> dict[str, Any]:
    """The Placement page: a contiguous plan ("before") and a `method` plan ("after"), both
    built on the loads of steps <= fit_max_step (all tokens without it; the same plans as
    `run.placement(..., where="step <= X")`), and what each does on steps > fit_max_step
    (the same tokens without it): per-GPU loads and `evaluate_placement`, also in sample, and
    each plan's model-level figure (`model_imbalance`: Σ over layers of the busiest GPU ÷ Σ of the means)."""
    from routescope.analysis.expert_parallel import model_imbalance
    from routescope.analysis.placement import build_plan, evaluate_placement, gpu_loads

    split = fit_max_step is not None
    fit = TokenFilter(step_max=int(fit_max_step)) if split else ALL
    fit_loads = fit.call_with_where(run, run.expert_load)  # one scan serves both plans
    plans = {m: build_plan(fit_loads, ep_size, redundant, m) for m in ("contiguous", method)}
    test_loads = (
        TokenFilter(step_min=int(fit_max_step) + 1).call_with_where(run, run.expert_load)
        if split
        else fit_loads
    )
    evaluation = {m: evaluate_placement(test_loads, p) for m, p in plans.items()}
    return {
        "method": method,
        "plan": plans[method],
        "gpu_loads": {m: gpu_loads(test_loads, p) for m, p in plans.items()},
        "evaluation": evaluation,
        "model": {m: model_imbalance(ev) for m, ev in evaluation.items()},
        "in_sample": {m: evaluate_placement(fit_loads, p) for m, p in plans.items()},
        "fit_slots": fit_loads.groupby("layer")["tokens"].sum().to_dict(),
        "test_slots": test_loads.groupby("layer")["tokens"].sum().to_dict(),
        "test_loads": test_loads[["layer", "expert", "tokens"]],
    }


# -- token strings -----------------------------------------------------------------------
def token_strings(run: rs.Run, token_ids: tuple[int, ...]) -> list[str]:
    """Decoded tokens when the manifest's model_name is a local folder with a tokenizer, else ids."""
    tokenizer = load_tokenizer(str(run.manifest.get("model_name", "")))
    if tokenizer is None:
        return [str(t) for t in token_ids]
    out = []
    for t in token_ids:
        try:
            out.append(tokenizer.decode([int(t)]))
        except Exception:
            out.append(str(t))
    return out


@functools.lru_cache(maxsize=8)
def load_tokenizer(model_name: str) -> Any:
    """A tokenizer from a local folder only (never a download); None when there is none.

    `tokenizer.json` is read with the `tokenizers` library (no torch import on the dashboard
    host); other folders fall back to transformers' AutoTokenizer.
    """
    path = Path(model_name) if model_name else None
    if path is None or not path.is_dir():
        return None
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    if (path / "tokenizer.json").is_file():  # the `tokenizers` library reads it without torch
        try:
            from tokenizers import Tokenizer

            return Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception:
            pass
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception:
        return None


# queries the registry runs on connections of their own: long, and nothing else waits for them
APART = frozenset({"saturation_comparison"})
QUERIES = {
    "summary": summary,
    "filter_choices": filter_choices,
    "expert_load": expert_load,
    "balance": balance,
    "dead_experts": dead_experts,
    "hot_experts": hot_experts,
    "doctor": doctor,
    "coactivation": coactivation,
    "entanglement": entanglement,
    "transition": transition,
    "pathways": pathways,
    "coactivation_view": coactivation_view,
    "specialization": specialization,
    "repetition": repetition,
    "expert_detail": expert_detail,
    "step_loads": step_loads,
    "balance_over_steps": balance_over_steps,
    "rank_loads": rank_loads,
    "sequences": sequences,
    "lanes": lanes,
    "lane_window": lane_window,
    "sequence_length": sequence_length,
    "comparison": comparison,
    "saturation_comparison": saturation_comparison,
    "super_experts": super_experts,
    "hidden_stats": hidden_stats,
    "placement": placement,
}

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
from pathlib import Path
from typing import Any

import pandas as pd

import routescope as rs
from dashboard.filters import TokenFilter, quote_identifier

ALL = TokenFilter()
MAX_LABEL_VALUES = 200  # per label in a filter dropdown
MAX_SEQUENCES = 500  # in the Tokens page's sequence list
MAX_LANE_CELLS = 6144  # tokens × MoE layers drawn by the Tokens page at once
MAX_LANE_TOKENS = 256
TOP_TOKENS = 15  # tokens listed in an expert's details
PATHWAYS_MAX = 60


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
        "created_at": m.get("created_at"),
        "updated_at": m.get("updated_at"),
        "tables": run.tables,
    }


def filter_choices(run: rs.Run) -> dict[str, Any]:
    """Phases, label values (most frequent first, capped) and the step range present."""
    phases = run.sql("SELECT DISTINCT phase FROM tokens ORDER BY phase")["phase"].dropna().tolist()
    steps = run.sql("SELECT min(step) AS lo, max(step) AS hi FROM tokens")
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
    return {
        "phases": phases,
        "labels": values,
        "step_min": None if pd.isna(lo) else int(lo),
        "step_max": None if pd.isna(hi) else int(hi),
    }


# -- metrics through the Run API --------------------------------------------------------
def expert_load(run: rs.Run, flt: TokenFilter = ALL) -> pd.DataFrame:
    return flt.call_with_where(run, run.expert_load)


def balance(run: rs.Run, flt: TokenFilter = ALL) -> pd.DataFrame:
    return flt.call_with_where(run, run.balance)


def dead_experts(run: rs.Run, flt: TokenFilter = ALL) -> pd.DataFrame:
    return flt.call_with_where(run, run.dead_experts)


def hot_experts(run: rs.Run, flt: TokenFilter = ALL) -> pd.DataFrame:
    return flt.call_with_where(run, run.hot_experts)


def coactivation(run: rs.Run, layer: int, flt: TokenFilter = ALL) -> pd.DataFrame:
    check_layer(run, layer)
    return flt.call_with_where(run, run.coactivation, layer)


def entanglement(run: rs.Run, flt: TokenFilter = ALL) -> pd.DataFrame:
    return flt.call_with_where(run, run.entanglement)


def transition(run: rs.Run, layer: int, next_layer: int, flt: TokenFilter = ALL) -> pd.DataFrame:
    check_layer(run, layer)
    check_layer(run, next_layer)
    return flt.call_with_where(run, run.transition, layer, next_layer)


def pathways(run: rs.Run, top: int, flt: TokenFilter = ALL) -> pd.DataFrame:
    top = max(1, min(int(top), PATHWAYS_MAX))
    return flt.call_with_where(run, run.pathways, top=top)


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
    pred, params = flt.sql(run, alias="t")
    top = run.sql(
        "SELECT t.token_id, count(*) AS count FROM routing r JOIN tokens t USING (seq_id, pos) "
        f"WHERE r.layer = ? AND r.expert = ? AND {pred} GROUP BY t.token_id "
        "ORDER BY count DESC, t.token_id LIMIT ?",
        [layer, expert, *params, TOP_TOKENS],
    )
    top["token"] = token_strings(run, tuple(int(t) for t in top["token_id"]))
    co = coactivation(run, layer, flt)
    partners = (
        co[co["expert_a"] == expert].sort_values("p_b_given_a", ascending=False).head(8)
        if not co.empty
        else co
    )
    return {
        "layer": layer,
        "expert": expert,
        "tokens": int(row["tokens"].iloc[0]) if len(row) else 0,
        "share": float(row["share"].iloc[0]) if len(row) else 0.0,
        "num_experts": run.num_experts(layer),
        "top_tokens": top[["token_id", "token", "count"]],
        "partners": partners[["expert_b", "count", "p_b_given_a"]] if len(partners) else partners,
    }


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


def comparison(run_a: rs.Run, run_b: rs.Run) -> Any:
    """`routescope.compare(run_a, run_b)`: load and balance deltas, expert changes, saturation."""
    return rs.compare(run_a, run_b)


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
        "layers": thresholds.get("layers"),
    }


def hidden_stats(run: rs.Run) -> pd.DataFrame:
    """Largest |hidden| per decoder layer, its channel and the median, from hidden_stats."""
    if not run.has_table("hidden_stats"):
        return pd.DataFrame(columns=["layer", "max_abs", "median_abs", "channel"])
    return run.sql(
        "SELECT layer, max(max_abs) AS max_abs, arg_max(channel, max_abs) AS channel, "
        "median(median_abs) AS median_abs FROM hidden_stats GROUP BY layer ORDER BY layer"
    )


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
    """A tokenizer from a local folder only (never a download); None when there is none."""
    path = Path(model_name) if model_name else None
    if path is None or not path.is_dir():
        return None
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception:
        return None


QUERIES = {
    "summary": summary,
    "filter_choices": filter_choices,
    "expert_load": expert_load,
    "balance": balance,
    "dead_experts": dead_experts,
    "hot_experts": hot_experts,
    "coactivation": coactivation,
    "entanglement": entanglement,
    "transition": transition,
    "pathways": pathways,
    "specialization": specialization,
    "repetition": repetition,
    "expert_detail": expert_detail,
    "sequences": sequences,
    "lanes": lanes,
    "lane_window": lane_window,
    "sequence_length": sequence_length,
    "comparison": comparison,
    "super_experts": super_experts,
    "hidden_stats": hidden_stats,
}

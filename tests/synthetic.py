"""Synthetic runs written straight in the SPEC section 3 format, with structure a test plants.

`write_run(path, experts={layer: (T, k) int array}, num_experts=E, ...)` writes
manifest.json, tokens and routing parts (and router_stats / router_tokens when router
probabilities are given, or any extra table) with pyarrow and the schemas of
`routescope.schema`, without touching the capture layer. Tests compare the analysis layer
against NumPy references computed from the same arrays.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from routescope import schema


def _per_layer(value: int | Mapping[int, int], layers: Sequence[int]) -> dict[int, int]:
    if isinstance(value, Mapping):
        return {int(layer): int(value[layer]) for layer in layers}
    return {int(layer): int(value) for layer in layers}


def _write_part(
    run_dir: Path, table: str, columns: dict[str, Any], index: int, labels: Sequence[str] = ()
) -> None:
    target = schema.schema_for(table, tuple(labels))
    arrays = [
        pa.array(np.asarray(columns[f.name]) if f.name in columns else None, type=f.type) for f in target
    ]
    out = run_dir / table / "rank=0" / f"part-{index:05d}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_arrays(arrays, schema=target), out)


def _chunks(n: int, parts: int) -> list[np.ndarray]:
    return [c for c in np.array_split(np.arange(n), max(1, parts)) if len(c)] or [np.arange(0)]


def write_run(
    path: str | Path,
    experts: Mapping[int, np.ndarray],
    num_experts: int | Mapping[int, int],
    *,
    seq_len: int | None = None,
    seq_id: np.ndarray | None = None,
    pos: np.ndarray | None = None,
    token_id: np.ndarray | None = None,
    step: np.ndarray | None = None,
    phase: Sequence[str] | str = "prefill",
    labels: Mapping[str, Sequence[str | None]] | None = None,
    weights: bool | Mapping[int, np.ndarray] = True,
    router_probs: Mapping[int, np.ndarray] | None = None,
    extra_tables: Mapping[str, Mapping[str, Any]] | None = None,
    num_hidden_layers: int | None = None,
    model_type: str = "synthetic",
    complete: bool = True,
    parts: int = 1,
) -> Path:
    """Write a run directory and return its path.

    experts: per MoE layer, the (T, k) expert ids chosen for each token (slot order).
    seq_len: split the T tokens into sequences of this length (default: one sequence);
      or pass seq_id / pos arrays of length T. token_id defaults to pos % 97.
    step: forward-step index per token (default 0); phase: one value or one per token.
    labels: label name -> T values (None for no value).
    weights: True writes softmax-like weights, False omits the column (weights=False
      recording), or per layer a (T, k) float array.
    router_probs: per layer (T, E) probabilities; writes router_stats per (step, layer,
      expert) and router_tokens (entropy, margin) like the recorder.
    extra_tables: table name -> columns, written as one part (e.g. expert_activations).
    parts: number of parts the tokens are split over (every table's rows follow them).
    """
    run_dir = Path(path)
    run_dir.mkdir(parents=True, exist_ok=True)
    layers = sorted(int(layer) for layer in experts)
    chosen = {layer: np.asarray(experts[layer], dtype=np.int64) for layer in layers}
    n = chosen[layers[0]].shape[0] if layers else 0
    top_k = {layer: chosen[layer].shape[1] for layer in layers}
    e_per_layer = _per_layer(num_experts, layers)
    if seq_id is None or pos is None:
        length = seq_len or max(n, 1)
        seq_id = np.arange(n) // length
        pos = np.arange(n) % length
    seq_id, pos = np.asarray(seq_id, dtype=np.int64), np.asarray(pos, dtype=np.int32)
    token_id = np.asarray(pos % 97 if token_id is None else token_id, dtype=np.int32)
    step = np.zeros(n, dtype=np.int32) if step is None else np.asarray(step, dtype=np.int32)
    phase_arr = np.asarray([phase] * n if isinstance(phase, str) else list(phase), dtype=object)
    label_names = list(labels or {})
    label_cols = {name: np.asarray(list(values), dtype=object) for name, values in (labels or {}).items()}
    rng = np.random.default_rng(0)

    for index, rows in enumerate(_chunks(n, parts)):
        tokens = {
            "seq_id": seq_id[rows],
            "pos": pos[rows],
            "token_id": token_id[rows],
            "step": step[rows],
            "phase": phase_arr[rows],
            **{name: col[rows] for name, col in label_cols.items()},
        }
        _write_part(run_dir, schema.TOKENS, tokens, index, label_names)
        routing: dict[str, list[np.ndarray]] = {c: [] for c in schema.ROUTING_COLUMNS}
        for layer in layers:
            k = top_k[layer]
            routing["seq_id"].append(np.repeat(seq_id[rows], k))
            routing["pos"].append(np.repeat(pos[rows], k))
            routing["layer"].append(np.full(len(rows) * k, layer))
            routing["slot"].append(np.tile(np.arange(k), len(rows)))
            routing["expert"].append(chosen[layer][rows].reshape(-1))
            if isinstance(weights, Mapping):
                routing["weight"].append(np.asarray(weights[layer], dtype=np.float32)[rows].reshape(-1))
            else:
                w = rng.random((len(rows), k)).astype(np.float32)
                routing["weight"].append(np.sort(w / w.sum(1, keepdims=True), axis=1)[:, ::-1].reshape(-1))
        cols = {c: np.concatenate(v) if v else np.zeros(0) for c, v in routing.items()}
        target = schema.schema_for(schema.ROUTING)
        if weights is False:
            target = target.remove(target.get_field_index("weight"))
        table = pa.Table.from_arrays([pa.array(cols[f.name], type=f.type) for f in target], schema=target)
        out = run_dir / schema.ROUTING / "rank=0" / f"part-{index:05d}.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out)
        if router_probs is not None:
            _write_router_tables(run_dir, index, rows, layers, chosen, router_probs, seq_id, pos, step)

    for table_name, columns in (extra_tables or {}).items():
        _write_part(run_dir, table_name, dict(columns), 0)

    manifest = {
        "format_version": schema.FORMAT_VERSION,
        "model_type": model_type,
        "num_hidden_layers": num_hidden_layers
        if num_hidden_layers is not None
        else (max(layers) + 1 if layers else 0),
        "moe_layers": layers,
        "num_experts": {str(layer): e_per_layer[layer] for layer in layers},
        "top_k": {str(layer): top_k[layer] for layer in layers},
        "labels": label_names,
        "tokens": int(n),
        "complete": complete,
        "router_stats": router_probs is not None,
        "weights": weights is not False,
    }
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return run_dir


def _write_router_tables(
    run_dir: Path,
    index: int,
    rows: np.ndarray,
    layers: list[int],
    chosen: dict[int, np.ndarray],
    router_probs: Mapping[int, np.ndarray],
    seq_id: np.ndarray,
    pos: np.ndarray,
    step: np.ndarray,
) -> None:
    stats: dict[str, list[np.ndarray]] = {c: [] for c in schema.ROUTER_STATS_COLUMNS}
    rtok: dict[str, list[np.ndarray]] = {c: [] for c in schema.ROUTER_TOKENS_COLUMNS}
    for layer in layers:
        probs = np.asarray(router_probs[layer], dtype=np.float64)[rows]
        e = probs.shape[1]
        for s in np.unique(step[rows]):
            in_step = step[rows] == s
            stats["step"].append(np.full(e, s))
            stats["layer"].append(np.full(e, layer))
            stats["expert"].append(np.arange(e))
            stats["prob_sum"].append(probs[in_step].sum(0))
            stats["tokens"].append(np.bincount(chosen[layer][rows][in_step].reshape(-1), minlength=e)[:e])
        top2 = -np.sort(-probs, axis=1)[:, :2]
        plogp = np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0)
        rtok["seq_id"].append(seq_id[rows])
        rtok["pos"].append(pos[rows])
        rtok["layer"].append(np.full(len(rows), layer))
        rtok["entropy"].append(-plogp.sum(1) / np.log(e))
        rtok["margin"].append(top2[:, 0] - top2[:, 1])
    _write_part(run_dir, schema.ROUTER_STATS, {c: np.concatenate(v) for c, v in stats.items()}, index)
    _write_part(run_dir, schema.ROUTER_TOKENS, {c: np.concatenate(v) for c, v in rtok.items()}, index)


def sample_topk(rng: np.random.Generator, probs: np.ndarray, k: int) -> np.ndarray:
    """(T, k) distinct experts per row drawn from per-row probabilities (Gumbel top-k), best first."""
    probs = np.atleast_2d(probs)
    scores = np.log(np.clip(probs, 1e-300, None)) + rng.gumbel(size=probs.shape)
    return np.argsort(-scores, axis=1)[:, :k]

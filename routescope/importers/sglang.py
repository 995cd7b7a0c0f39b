"""Import SGLang expert-distribution-recorder dumps (torch.save'd dicts) into a run directory.

Layouts follow `python/sglang/srt/eplb/expert_distribution.py` (sgl-project/sglang; older
releases: `python/sglang/srt/managers/expert_distribution.py`):

- `per_token` mode (`_DetailAccumulator.dump`): `{"records": [...], "last_physical_to_logical_map":
  [num_layers, num_physical_experts]}`, each record with `topk_ids_of_layer` [num_layers,
  num_tokens, top_k] (physical expert ids, -1 = unused slot) and optionally `forward_pass_id`,
  `rank`, `input_ids`, `positions`, `extend_seq_lens`, `forward_mode`  -> tokens + routing.
- `per_pass` mode: the same records without `topk_ids_of_layer` but with
  `global_physical_count` [num_layers, num_physical_experts]  -> counts-only (one step a pass).
- `stat` / `stat_approx` modes (`_StatAccumulator.dump`): `{"logical_count": [buffered_passes,
  num_layers, num_logical_experts]}` (also accepted: [num_layers, num_logical_experts])
  -> counts-only (one step a buffered pass; all-zero passes, unused buffer slots, dropped).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from routescope import schema
from routescope.importers import (
    ImportedRun,
    ImportFormatError,
    counts_to_table,
    sequences_to_tables,
)

FORWARD_MODE_DECODE = 2  # sglang ForwardMode.DECODE (model_executor/forward_batch_info.py)
EXPECTED = (
    "an SGLang expert-distribution dump: a dict with 'records' (per_token / per_pass mode, records "
    "holding 'topk_ids_of_layer' [num_layers, num_tokens, top_k] or 'global_physical_count' "
    "[num_layers, num_physical_experts]) or 'logical_count' ([passes,] num_layers, num_logical_experts; "
    "stat / stat_approx mode)"
)


def load_dump(path: str | Path) -> dict[str, Any]:
    """torch.load a dump with weights_only=True (tensors, lists, ints: no code runs)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SGLang dump {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ImportFormatError(
            f"{path}: could not be read with torch.load(weights_only=True): {exc}"
        ) from None
    if not isinstance(data, dict):
        raise ImportFormatError(f"{path}: got a {type(data).__name__}; expected {EXPECTED}")
    return data


def detect_mode(data: dict[str, Any], path: Path) -> str:
    if "logical_count" in data:
        return "stat"
    records = data.get("records")
    if isinstance(records, list):
        if any(isinstance(r, dict) and "topk_ids_of_layer" in r for r in records):
            return "per_token"
        if all(isinstance(r, dict) and "global_physical_count" in r for r in records) and records:
            return "per_pass"
    keys = ", ".join(map(str, data)) or "none"
    raise ImportFormatError(f"{path}: keys {keys}; expected {EXPECTED}")


def import_sglang(
    paths: list[str | Path], top_k: int | None = None, num_experts: int | None = None
) -> ImportedRun:
    """Parse one or more dumps of the same mode (e.g. one per rank) into an ImportedRun."""
    loaded = [(Path(p), load_dump(p)) for p in paths]
    modes = {detect_mode(data, path) for path, data in loaded}
    if len(modes) > 1:
        raise ImportFormatError(f"dumps mix recorder modes {sorted(modes)}; import one mode at a time")
    mode = modes.pop()
    if mode == "per_token":
        return _per_token(loaded, num_experts)
    if top_k is None:
        raise ValueError(
            f"SGLang {mode} dumps hold counts only, not top-k: pass --top-k K (experts per token)"
        )
    return _counts(loaded, mode, top_k, num_experts)


# -- per_token ---------------------------------------------------------------------------
def _physical_map(data: dict[str, Any], num_layers: int) -> np.ndarray | None:
    mapping = data.get("last_physical_to_logical_map")
    if mapping is None:
        return None
    mapping = _array(mapping)
    if mapping.ndim != 2 or mapping.shape[0] != num_layers:
        raise ImportFormatError(
            f"last_physical_to_logical_map has shape {tuple(mapping.shape)}; expected [num_layers={num_layers}, "
            "num_physical_experts]"
        )
    return mapping.astype(np.int64)


def _to_logical(ids: np.ndarray, mapping: np.ndarray | None) -> np.ndarray:
    """Physical expert ids [L, T, K] -> logical ids via the map; -1 stays -1."""
    if mapping is None:
        return ids
    out = np.full(ids.shape, -1, dtype=np.int64)
    for layer in range(ids.shape[0]):
        valid = ids[layer] >= 0
        out[layer][valid] = mapping[layer][ids[layer][valid]]
    return out


def _per_token(loaded: list[tuple[Path, dict]], num_experts: int | None) -> ImportedRun:
    entries = []  # (forward_pass_id, rank, record, mapping, path, index)
    num_layers = None
    for path, data in loaded:
        records = data["records"]
        for index, record in enumerate(records):
            if "topk_ids_of_layer" not in record:
                raise ImportFormatError(
                    f"{path}: record {index} lacks 'topk_ids_of_layer'; expected {EXPECTED}"
                )
            ids = _array(record["topk_ids_of_layer"])
            if ids.ndim != 3:
                raise ImportFormatError(
                    f"{path}: record {index}: topk_ids_of_layer has shape {tuple(ids.shape)}; expected "
                    "[num_layers, num_tokens, top_k] (SGLang per_token mode)"
                )
            if num_layers is None:
                num_layers = ids.shape[0]
            elif ids.shape[0] != num_layers:
                raise ImportFormatError(
                    f"{path}: record {index} has {ids.shape[0]} layers, earlier records {num_layers}"
                )
            entries.append(
                (record.get("forward_pass_id", index), record.get("rank", 0), record, ids, path, data)
            )
    if num_layers is None:
        raise ImportFormatError(f"no records in {', '.join(str(p) for p, _ in loaded)}")
    entries.sort(key=lambda e: (e[0], e[1]))
    step_of = {fid: step for step, fid in enumerate(sorted({e[0] for e in entries}))}
    maps = {id(data): _physical_map(data, num_layers) for _, data in loaded}

    sequences: list[dict[str, Any]] = []
    used = np.zeros(num_layers, dtype=bool)
    max_expert = -1
    for fid, rank, record, ids, path, data in entries:
        ids = _to_logical(ids.astype(np.int64), maps[id(data)])
        tokens = ids.shape[1]
        if tokens == 0:
            continue
        used |= (ids >= 0).any(axis=(1, 2))
        max_expert = max(max_expert, int(ids.max()))
        per_token = ids.transpose(1, 0, 2)  # [T, L, K]
        token_ids = _optional_list(record, "input_ids", tokens, path)
        positions = _optional_list(record, "positions", tokens, path)
        mode = record.get("forward_mode")
        phase = schema.PHASE_DECODE if mode == FORWARD_MODE_DECODE else schema.PHASE_PREFILL
        for start, stop in _segments(record, tokens, mode):
            n = stop - start
            sequences.append(
                {
                    "experts": per_token[start:stop],
                    "pos": positions[start:stop] if positions is not None else np.arange(n),
                    "token_ids": token_ids[start:stop] if token_ids is not None else np.full(n, -1),
                    "step": np.full(n, step_of[fid]),
                    "phase": np.full(n, phase, dtype=object),
                    "labels": {"source_rank": np.full(n, str(rank), dtype=object)},
                }
            )
    layers = [int(layer) for layer in np.flatnonzero(used)]
    for seq in sequences:
        seq["experts"] = seq["experts"][:, layers, :]
    tokens, routing, top_k = sequences_to_tables(sequences, layers)
    experts = _num_experts(num_experts, loaded, max_expert)
    return ImportedRun(
        engine="sglang",
        mode="per_token",
        num_hidden_layers=num_layers,
        num_experts={layer: experts for layer in layers},
        top_k=top_k,
        tokens=tokens,
        routing=routing,
        labels=["source_rank"],
        extra={"forward_passes": len(step_of)},
    )


def _segments(record: dict, tokens: int, mode: Any) -> list[tuple[int, int]]:
    """Token ranges of the requests in one forward: extend_seq_lens when they add up, else one per token."""
    lens = record.get("extend_seq_lens")
    if mode != FORWARD_MODE_DECODE and lens is not None:
        lens = [int(x) for x in _array(lens).reshape(-1)]
        if sum(lens) == tokens and all(x > 0 for x in lens):
            bounds = np.cumsum([0, *lens])
            return list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))
    return [(i, i + 1) for i in range(tokens)]


def _optional_list(record: dict, key: str, tokens: int, path: Path) -> np.ndarray | None:
    value = record.get(key)
    if value is None:
        return None
    value = _array(value).reshape(-1)
    if len(value) != tokens:
        raise ImportFormatError(f"{path}: record field {key!r} has {len(value)} entries for {tokens} tokens")
    return value.astype(np.int64)


# -- counts (per_pass, stat, stat_approx) ------------------------------------------------
def _counts(loaded: list[tuple[Path, dict]], mode: str, top_k: int, num_experts: int | None) -> ImportedRun:
    blocks = []
    for path, data in loaded:
        if mode == "stat":
            counts = _array(data["logical_count"])
            if counts.ndim == 2:
                counts = counts[None]
            if counts.ndim != 3:
                raise ImportFormatError(
                    f"{path}: logical_count has shape {tuple(counts.shape)}; expected [passes, num_layers, "
                    "num_logical_experts] or [num_layers, num_logical_experts] (SGLang stat mode)"
                )
            blocks.append(counts.astype(np.int64))
        else:
            records = sorted(data["records"], key=lambda r: (r.get("forward_pass_id", 0), r.get("rank", 0)))
            per_pass = []
            for index, record in enumerate(records):
                counts = _array(record["global_physical_count"]).astype(np.int64)
                if counts.ndim != 2:
                    raise ImportFormatError(
                        f"{path}: record {index}: global_physical_count has shape {tuple(counts.shape)}; "
                        "expected [num_layers, num_physical_experts] (SGLang per_pass mode)"
                    )
                per_pass.append(_physical_counts_to_logical(counts, _physical_map(data, counts.shape[0])))
            blocks.append(np.stack(per_pass))
    shapes = {b.shape[1:] for b in blocks}
    if len(shapes) != 1:
        raise ImportFormatError(f"dumps disagree on [num_layers, num_experts]: {sorted(shapes)}")
    counts = np.concatenate(blocks)
    counts = counts[counts.reshape(len(counts), -1).sum(axis=1) > 0]  # unused circular-buffer slots
    num_layers, width = counts.shape[1:]
    layers = [int(layer) for layer in np.flatnonzero(counts.sum(axis=(0, 2)) > 0)]
    experts = num_experts or width
    if experts < width and counts[:, :, experts:].any():
        raise ValueError(f"--num-experts {experts} is smaller than the expert ids in the dump ({width})")
    table = counts_to_table(counts[:, layers, :experts], layers)
    return ImportedRun(
        engine="sglang",
        mode=mode,
        num_hidden_layers=num_layers,
        num_experts={layer: experts for layer in layers},
        top_k={layer: int(top_k) for layer in layers},
        expert_counts=table,
        extra={"forward_passes": len(counts)},
    )


def _physical_counts_to_logical(counts: np.ndarray, mapping: np.ndarray | None) -> np.ndarray:
    if mapping is None:
        return counts
    logical = np.zeros((counts.shape[0], int(mapping.max()) + 1), dtype=np.int64)
    for layer in range(counts.shape[0]):
        np.add.at(logical[layer], mapping[layer], counts[layer])
    return logical


# -- helpers -----------------------------------------------------------------------------
def _array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _num_experts(given: int | None, loaded: list[tuple[Path, dict]], max_expert: int) -> int:
    if given:
        if given <= max_expert:
            raise ValueError(f"--num-experts {given} is too small: the dump has expert id {max_expert}")
        return int(given)
    for _, data in loaded:
        mapping = data.get("last_physical_to_logical_map")
        if mapping is not None:
            return max(int(_array(mapping).max()) + 1, max_expert + 1)
    return max_expert + 1

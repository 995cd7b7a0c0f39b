"""Import vLLM "routed experts" arrays ([num_tokens, num_moe_layers, top_k] per request) into a run.

vLLM's capturer (`vllm/model_executor/layers/fused_moe/routed_experts_capturer.py`) keeps,
for every token of a request, the top-k expert ids of each MoE layer, and hands them back
per request as `routed_experts` (a numpy array [num_tokens, num_moe_layers, top_k]) on the
request output. Accepted files (one request = one sequence):

- `.npy`: one array [T, L, K];
- `.npz`: every 3-D array is one request (in file order); a 1-D integer array named
  `<name>_token_ids` gives that request's token ids, `<name>_prompt_len` its prompt length;
- `.pt`: a tensor / array [T, L, K], a list of them, or a list of dicts with `routed_experts`
  and optional `token_ids` / `prompt_token_ids` (as saved from request outputs);
- `.json` / `.jsonl`: objects with `routed_experts` (nested lists) and optional
  `prompt_token_ids` / `token_ids`, or OpenAI-style responses whose `choices` hold them.

The middle axis counts MoE layers, not decoder layers: pass `moe_layers` (decoder-layer
index of each MoE layer) to record real layer numbers; by default MoE layer i is layer i.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from routescope import schema
from routescope.importers import ImportedRun, ImportFormatError, sequences_to_tables

EXPECTED = "a vLLM routed_experts array of shape [num_tokens, num_moe_layers, top_k] (integer expert ids)"


def import_vllm(
    path: str | Path, moe_layers: list[int] | None = None, num_experts: int | None = None
) -> ImportedRun:
    """Parse a file of routed-experts arrays into an ImportedRun (tokens + routing, no weights)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vLLM routed-experts file {path} does not exist")
    requests = _read_requests(path)
    if not requests:
        raise ImportFormatError(f"{path}: no routed_experts arrays found; expected {EXPECTED}")
    shapes = set()
    for name, req in requests:
        experts = req["routed_experts"]
        if experts.ndim != 3 or not np.issubdtype(experts.dtype, np.integer):
            raise ImportFormatError(
                f"{path}: {name} has shape {tuple(experts.shape)} and dtype {experts.dtype}; expected {EXPECTED}"
            )
        shapes.add(experts.shape[1])
    if len(shapes) != 1:
        raise ImportFormatError(f"{path}: requests disagree on the number of MoE layers: {sorted(shapes)}")
    num_moe = shapes.pop()
    layers = list(range(num_moe)) if moe_layers is None else [int(x) for x in moe_layers]
    if len(layers) != num_moe or len(set(layers)) != num_moe:
        raise ValueError(f"--moe-layers lists {len(layers)} layers, the arrays have {num_moe} MoE layers")

    sequences = []
    max_expert = -1
    for step, (_, req) in enumerate(requests):
        experts = req["routed_experts"].astype(np.int64)
        n = experts.shape[0]
        max_expert = max(max_expert, int(experts.max()) if experts.size else -1)
        token_ids = req.get("token_ids")
        if token_ids is None or len(token_ids) < n:
            token_ids = np.full(n, -1)
        prompt_len = req.get("prompt_len")
        phase = np.full(n, schema.PHASE_PREFILL, dtype=object)
        if prompt_len is not None:
            phase[int(prompt_len) :] = schema.PHASE_DECODE
        sequences.append(
            {
                "experts": experts,
                "pos": np.arange(n),
                "token_ids": np.asarray(token_ids[:n]),
                "step": np.full(n, step),
                "phase": phase,
            }
        )
    if num_experts is not None and num_experts <= max_expert:
        raise ValueError(f"--num-experts {num_experts} is too small: the file has expert id {max_expert}")
    experts_per_layer = int(num_experts or max_expert + 1)
    tokens, routing, top_k = sequences_to_tables(sequences, layers)
    return ImportedRun(
        engine="vllm",
        mode="routed_experts",
        num_hidden_layers=max(layers) + 1,
        num_experts={layer: experts_per_layer for layer in layers},
        top_k=top_k,
        tokens=tokens,
        routing=routing,
        extra={
            "requests": len(requests),
            "num_experts_inferred": num_experts is None,
            "layer_numbering": "moe_index" if moe_layers is None else "decoder_layer",
        },
    )


def _read_requests(path: Path) -> list[tuple[str, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return [("array", {"routed_experts": np.load(path, allow_pickle=False)})]
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        out = []
        for key, array in arrays.items():
            if array.ndim == 3:
                req = {"routed_experts": array, "token_ids": arrays.get(f"{key}_token_ids")}
                if f"{key}_prompt_len" in arrays:
                    req["prompt_len"] = int(arrays[f"{key}_prompt_len"].reshape(-1)[0])
                out.append((key, req))
            elif not key.endswith(("_token_ids", "_prompt_len")):
                raise ImportFormatError(
                    f"{path}: array {key!r} has shape {tuple(array.shape)}; expected {EXPECTED}"
                )
        return out
    if suffix == ".pt":
        import torch

        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ImportFormatError(
                f"{path}: could not be read with torch.load(weights_only=True): {exc}"
            ) from None
        items = data if isinstance(data, list) else [data]
        return [(f"item {i}", _request(item, path, f"item {i}")) for i, item in enumerate(items)]
    if suffix in (".json", ".jsonl"):
        text = path.read_text(encoding="utf-8")
        try:
            objects = (
                [json.loads(line) for line in text.splitlines() if line.strip()]
                if suffix == ".jsonl"
                else None
            )
            if objects is None:
                loaded = json.loads(text)
                objects = loaded if isinstance(loaded, list) else [loaded]
        except ValueError as exc:
            raise ImportFormatError(f"{path}: not valid JSON: {exc}") from None
        flat = []
        for obj in objects:
            flat += (
                obj["choices"] if isinstance(obj, dict) and isinstance(obj.get("choices"), list) else [obj]
            )
        return [(f"request {i}", _request(obj, path, f"request {i}")) for i, obj in enumerate(flat)]
    raise ImportFormatError(f"{path}: unknown file type {suffix!r}; use .npy, .npz, .pt, .json or .jsonl")


def _request(item: Any, path: Path, name: str) -> dict[str, Any]:
    if isinstance(item, dict):
        if item.get("routed_experts") is None:
            keys = ", ".join(map(str, item)) or "none"
            raise ImportFormatError(
                f"{path}: {name} has no 'routed_experts' (keys: {keys}); expected {EXPECTED}"
            )
        experts = item["routed_experts"]
        if isinstance(experts, str):
            raise ImportFormatError(
                f"{path}: {name}: routed_experts is a string (encoded?); expected nested lists: {EXPECTED}"
            )
        prompt = item.get("prompt_token_ids")
        completion = item.get("token_ids")
        token_ids = None
        if prompt is not None or completion is not None:
            token_ids = np.asarray([*(_list(prompt) or []), *(_list(completion) or [])], dtype=np.int64)
        req = {"routed_experts": _numpy(experts), "token_ids": token_ids}
        if prompt is not None:
            req["prompt_len"] = len(_list(prompt))
        return req
    return {"routed_experts": _numpy(item)}


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except ValueError as exc:
        raise ImportFormatError(f"routed_experts is ragged ({exc}); expected {EXPECTED}") from None


def _list(value: Any) -> list | None:
    if value is None:
        return None
    return _numpy(value).reshape(-1).tolist()

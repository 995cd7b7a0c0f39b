"""Import vLLM routed-experts arrays (one request = one sequence) into a run directory.

vLLM's capturer (`vllm/model_executor/layers/fused_moe/routed_experts_capturer.py`) keeps,
for every token, the top-k expert ids of each layer. Two response layouts exist:

- before 0.21: one int32 array per request, [prompt + output - 1, num_hidden_layers, top_k];
  the middle axis is the decoder layer and dense layers hold zeros (the buffer is zeroed
  and only MoE layers write to it); the last generated token is never fed back, so it has
  no row;
- 0.21 and later: int16 [tokens, MoE layers, top_k] with -1 for rows never computed;
  `prompt_routed_experts` and `prompt_token_ids` at the response level, each choice's
  `routed_experts` and `token_ids` for the generated part.

`files.py` reads the files; this module places rows at their positions and phases,
picks the MoE layers and builds the tables. docs/scale_out.md lists the rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from routescope import schema
from routescope.importers.core.tables import ImportedRun, ImportFormatError, sequences_to_tables
from routescope.importers.vllm.files import EXPECTED, RequestData, read_requests


def import_vllm(
    path: str | Path,
    moe_layers: list[int] | None = None,
    num_experts: int | None = None,
    prompt_len: int | None = None,
) -> ImportedRun:
    """Parse a file of routed-experts arrays into an ImportedRun (tokens + routing, no weights).

    A bare array (no prompt ids or length beside it) cannot tell prompt rows from generated
    ones: its phase is `unknown`, unless `prompt_len` gives the prompt length of such requests.
    """
    if num_experts is not None and num_experts < 1:
        raise ValueError(f"--num-experts must be a positive integer, got {num_experts}")
    if prompt_len is not None and prompt_len < 0:
        raise ValueError(f"--prompt-len must be 0 or more, got {prompt_len}")
    path, requests = read_requests(path)
    if prompt_len is not None:
        for req in requests:
            if req.prompt_ids is None and req.output_ids is None and req.prompt_len is None:
                req.prompt_len = prompt_len
    width, top_k = _check_arrays(requests, path)
    split = any(r.prompt is not None or r.output is not None for r in requests)
    sequences, dropped, phases_known = _sequences(requests, path)
    if not sequences:
        raise ImportFormatError(f"{path}: every row is -1 (never computed); nothing to import")
    columns, layers, numbering, dense, hidden = _select_layers(
        sequences, width, top_k, split, moe_layers, path
    )
    for seq in sequences:
        seq["experts"] = seq["experts"][:, columns, :]
    max_expert = max(int(seq["experts"].max()) for seq in sequences)
    if num_experts is not None and num_experts <= max_expert:
        raise ValueError(f"--num-experts {num_experts} is too small: {path} has expert id {max_expert}")
    tokens, routing, top_k_seen = sequences_to_tables(sequences, layers)
    experts = int(num_experts or max_expert + 1)
    return ImportedRun(
        engine="vllm",
        mode="routed_experts",
        num_hidden_layers=hidden,
        num_experts={layer: experts for layer in layers},
        top_k=top_k_seen,
        tokens=tokens,
        routing=routing,
        extra={
            "requests": len(requests),
            "layout": "prompt + output parts (vLLM >= 0.21)"
            if split
            else "one array per request (vLLM < 0.21)",
            "layer_numbering": numbering,
            "dense_layers_dropped": dense,
            "rows_never_computed": dropped,
            "phases_known": phases_known,
            "num_experts_inferred": num_experts is None,
        },
    )


def _check_arrays(requests: list[RequestData], path: Path) -> tuple[int, int]:
    shapes = set()
    empty = []
    for req in requests:
        for part in ("combined", "prompt", "output"):
            array = getattr(req, part)
            if array is None:
                continue
            what = f"{req.name}" if part == "combined" else f"{req.name} ({part} part)"
            if array.size == 0:  # e.g. [] for a one-token completion, whose only token is never fed back
                empty.append((req, part))
                continue
            if array.ndim != 3 or not np.issubdtype(array.dtype, np.integer):
                raise ImportFormatError(
                    f"{path}: {what} has shape {tuple(array.shape)} and dtype {array.dtype}; expected {EXPECTED}"
                )
            if array.min() < -1:
                raise ImportFormatError(
                    f"{path}: {what} holds expert id {int(array.min())}; ids are >= 0, and -1 marks a row never computed"
                )
            shapes.add(array.shape[1:])
            setattr(req, part, array.astype(np.int64))
    if len(shapes) > 1:
        raise ImportFormatError(f"{path}: requests disagree on [layers, top_k]: {sorted(shapes)}")
    if not shapes:
        raise ImportFormatError(f"{path}: every routed_experts array is empty; nothing to import")
    width, top_k = shapes.pop()
    for req, part in empty:
        setattr(req, part, np.zeros((0, width, top_k), dtype=np.int64))
    return width, top_k


def _sequences(requests: list[RequestData], path: Path) -> tuple[list[dict[str, Any]], int, bool]:
    """Per request: rows, positions, token ids and phases; rows that are all -1 are dropped."""
    sequences, dropped, phases_known = [], 0, True
    prompt_lens: dict[int, int] = {}
    for step, req in enumerate(requests):
        if req.combined is not None:
            rows, pos, ids, plen, known = _combined(req, path)
        else:
            rows, pos, ids, plen = _split(req, path, prompt_lens)
            known = True
        prompt_lens[step] = plen
        phases_known &= known
        never = (rows == -1).all(axis=(1, 2))
        partial = (rows == -1).any(axis=(1, 2)) & ~never
        if partial.any():
            row = int(np.flatnonzero(partial)[0])
            raise ImportFormatError(
                f"{path}: {req.name}: token at position {int(pos[row])} mixes -1 with expert ids; "
                "-1 may only fill a whole row (a token never computed)"
            )
        dropped += int(never.sum())
        keep = ~never
        if not keep.any():
            continue
        phase = (
            np.where(pos < plen, schema.PHASE_PREFILL, schema.PHASE_DECODE).astype(object)
            if known
            else np.full(len(pos), schema.PHASE_UNKNOWN, dtype=object)
        )
        sequences.append(
            {
                "seq_id": step,
                "experts": rows[keep],
                "pos": pos[keep],
                "token_ids": ids[keep],
                "step": np.full(int(keep.sum()), step),
                "phase": phase[keep],
            }
        )
    return sequences, dropped, phases_known


def _combined(req: RequestData, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, bool]:
    """vLLM < 0.21: row i is the token at position i; prompt rows first, the last output token has none."""
    rows = req.combined
    n = rows.shape[0]
    if req.prompt_ids is not None and req.output_ids is not None:
        p, o = len(req.prompt_ids), len(req.output_ids)
        allowed = {p} if o == 0 else {p + o - 1, p + o}
        if n not in allowed:
            raise ImportFormatError(
                f"{path}: {req.name} has {n} rows for {p} prompt and {o} generated tokens; vLLM returns "
                f"prompt + generated - 1 = {p + o - 1} rows (the last generated token is never fed back)"
            )
        return rows, np.arange(n), _pad(req.prompt_ids + req.output_ids, n), p, True
    if req.output_ids is not None:
        o = len(req.output_ids)
        p = n - max(o - 1, 0)
        if p < 0:
            raise ImportFormatError(
                f"{path}: {req.name} has {n} rows, fewer than its {o} generated tokens - 1"
            )
        return rows, np.arange(n), _pad([-1] * p + req.output_ids, n), p, True
    if req.prompt_ids is not None or req.prompt_len is not None:
        p = len(req.prompt_ids) if req.prompt_ids is not None else int(req.prompt_len)
        if n < p:
            raise ImportFormatError(f"{path}: {req.name} has {n} rows for a {p}-token prompt")
        ids = req.prompt_ids if req.prompt_ids is not None else (req.token_ids or [])  # --prompt-len
        return rows, np.arange(n), _pad(ids, n), p, True
    if req.token_ids is not None and len(req.token_ids) < n:
        raise ImportFormatError(f"{path}: {req.name} has {n} rows but only {len(req.token_ids)} token ids")
    return rows, np.arange(n), _pad(req.token_ids or [], n), n, False


def _split(
    req: RequestData, path: Path, prompt_lens: dict[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """vLLM >= 0.21: prompt rows at 0..P-1 (imported once per response), generated rows from P on."""
    width_k = (req.output if req.output is not None else req.prompt).shape[1:]
    prompt = req.prompt if req.prompt is not None else np.zeros((0, *width_k), dtype=np.int64)
    output = req.output if req.output is not None else np.zeros((0, *width_k), dtype=np.int64)
    if req.shares_prompt_with is not None:
        p = len(req.prompt_ids) if req.prompt_ids is not None else prompt_lens.get(req.shares_prompt_with, 0)
    else:
        p = len(req.prompt_ids) if req.prompt_ids is not None else prompt.shape[0]
        if req.prompt is not None and prompt.shape[0] != p:
            raise ImportFormatError(
                f"{path}: {req.name}: prompt_routed_experts has {prompt.shape[0]} rows for {p} prompt tokens"
            )
    if req.output_ids is not None:
        o = len(req.output_ids)
        if output.shape[0] not in ({0} if o == 0 else {o - 1, o}):
            raise ImportFormatError(
                f"{path}: {req.name}: routed_experts has {output.shape[0]} rows for {o} generated tokens; "
                f"expected {max(o - 1, 0)} (the last generated token is never fed back)"
            )
    rows = np.concatenate([prompt, output])
    pos = np.concatenate([np.arange(prompt.shape[0]), p + np.arange(output.shape[0])])
    ids = np.concatenate(
        [_pad(req.prompt_ids or [], prompt.shape[0]), _pad(req.output_ids or [], output.shape[0])]
    )
    return rows, pos, ids, p


def _pad(ids: list[int], n: int) -> np.ndarray:
    out = np.full(n, -1, dtype=np.int64)
    ids = ids[:n]
    out[: len(ids)] = ids
    return out


def _select_layers(
    sequences: list[dict], width: int, top_k: int, split: bool, moe_layers: list[int] | None, path: Path
) -> tuple[list[int], list[int], str, list[int], int]:
    """(columns of the layer axis to keep, their layer numbers, numbering, dense columns, num_hidden_layers)."""
    if moe_layers is not None:
        if len(moe_layers) == width:
            return (
                list(range(width)),
                list(moe_layers),
                "decoder_layer (--moe-layers)",
                [],
                max(moe_layers) + 1,
            )
        if max(moe_layers) < width:
            dense = [c for c in range(width) if c not in moe_layers]
            return sorted(moe_layers), sorted(moe_layers), "decoder_layer (axis index)", dense, width
        raise ValueError(
            f"--moe-layers lists {len(moe_layers)} layers up to {max(moe_layers)}, but {path} has a layer axis of "
            f"{width}: give one decoder-layer index per axis entry, or a subset of 0..{width - 1}"
        )
    # A top-k row of zeros is impossible for distinct experts, so an all-zero column is a dense
    # layer of the pre-0.21 decoder-layer axis (a top-1 column only in that layout).
    stacked = np.concatenate([seq["experts"] for seq in sequences])
    all_zero = (stacked == 0).all(axis=(0, 2))
    dense = [int(c) for c in np.flatnonzero(all_zero)] if (top_k >= 2 or not split) else []
    columns = [c for c in range(width) if c not in dense]
    if not columns:
        raise ImportFormatError(f"{path}: every layer holds only zeros (dense); no MoE routing to import")
    if split:
        return columns, columns, "moe_index (pass --moe-layers for decoder-layer numbers)", dense, width
    numbering = "decoder_layer (dense layers detected)" if dense else "axis index"
    return columns, columns, numbering, dense, width

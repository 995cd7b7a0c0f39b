"""vLLM server responses with routed experts -> `Turn`s (responses.py places them).

Two layouts, both read per choice (OpenAI-compatible `choices`, or `outputs` of an offline
`RequestOutput` saved as JSON):

- **newest server** (`--enable-return-routed-experts`): `choices[i].routed_experts` is
  base64 of `np.save` bytes (uint8 / uint16), shape `(num_tokens - 1 - start,
  num_hidden_layers, top_k)`, decoded as vLLM's own test does
  (`tests/entrypoints/openai/test_return_routed_experts.py`: `np.load(BytesIO(b64decode(s)))`).
  `start` is the request's `routed_experts_prompt_start` (vllm/sampling_params.py, PR #51906:
  "skip the first routed_experts_prompt_start prompt tokens from the returned routing data").
- **0.21 split**: `prompt_routed_experts` at the response level (`[prompt, MoE layers, k]`,
  int16, -1 for rows never computed) and each choice's `routed_experts` for the generated
  tokens (`[output - 1, MoE layers, k]`; a trailing row for the last token is dropped).

Token ids: `prompt_token_ids` (choice or response, with `return_token_ids`) or --prompts,
and the choice's `token_ids`. Arrays may also be nested lists (offline outputs as JSON) or
`{data, shape, dtype[, start]}` packs (a `start` there is the prompt start).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from routescope.importers.core.errors import ImportFormatError
from routescope.importers.core.model_layout import MoELayout
from routescope.importers.core.turns import Lookup, Turn, session_of, start_of, to_moe_rows, token_ids
from routescope.importers.vllm.files import decode_array

PROMPT_KEYS = ("prompt_token_ids", "input_ids", "prompt_ids")
START_KEY = "routed_experts_prompt_start"


def _array(value: Any, label: str, what: str) -> np.ndarray:
    array = decode_array(value, Path(label), what)  # base64 .npy, nested lists or a {data, shape, dtype} pack
    if array.size == 0:
        return array.reshape(0, 0, 0) if array.ndim != 3 else array
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.integer):
        raise ImportFormatError(
            f"{label}: {what} has shape {tuple(array.shape)} and dtype {array.dtype}; expected integer "
            "[tokens, layers, top_k]"
        )
    return array


def turns_of(
    record: dict[str, Any], step: int, prompt: list[int] | None, layout: MoELayout, name: str
) -> list[Turn]:
    """One response record (or a request/response pair) -> one turn per choice."""
    request = record.get("request") if isinstance(record.get("request"), dict) else {}
    response = record.get("response") if isinstance(record.get("response"), dict) else record
    children = response.get("choices", response.get("outputs"))
    if isinstance(children, list) and children:
        parts = [c for c in children if isinstance(c, dict)]
        labels = [f"{name} choice {c.get('index', j)}" for j, c in enumerate(parts)]
    else:
        parts, labels = [response], [name]
    turns = []
    for part, label in zip(parts, labels, strict=True):
        find = Lookup(part, response, record, request, request.get("sampling_params"))
        rid = response.get("id", response.get("request_id"))
        label = f"{label} (id {rid})" if rid is not None else label
        prompt_ids = token_ids(find.get(*PROMPT_KEYS), label, "prompt token ids")
        prompt_ids = prompt if prompt_ids is None else prompt_ids
        if prompt_ids is None:
            raise ImportFormatError(
                f"{label}: no prompt token ids (looked for {', '.join(PROMPT_KEYS)}; ask the server with "
                "return_token_ids=true); pass --prompts FILE with one id list per record"
            )
        output_ids = token_ids(part.get("token_ids", part.get("output_ids")), label, "token_ids")
        if output_ids is None:
            raise ImportFormatError(
                f"{label}: no generated token ids ('token_ids'); ask with return_token_ids=true"
            )
        packed = part.get("routed_experts")
        packed_start = (
            packed.get("start") if isinstance(packed, dict) else None
        )  # {data, shape, dtype, start}
        start = start_of(find.get(START_KEY) if packed_start is None else packed_start, label, START_KEY)
        if response.get("prompt_routed_experts") is not None:
            rows = _split_rows(response, part, prompt_ids, output_ids, start, layout, label)
        else:
            if part.get("routed_experts") is None:
                raise ImportFormatError(
                    f"{label}: no routed_experts; start the server with --enable-return-routed-experts"
                )
            rows = _array(part["routed_experts"], label, "routed_experts")
            if rows.size == 0:
                rows = np.zeros((0, layout.num_hidden_layers, layout.top_k), dtype=np.int64)
            rows = to_moe_rows(rows, layout, label, "routed_experts")
        turns.append(Turn(label, prompt_ids, output_ids, start, rows, session_of(record), step))
    return turns


def _split_rows(
    response: dict,
    part: dict,
    prompt_ids: list[int],
    output_ids: list[int],
    start: int,
    layout: MoELayout,
    label: str,
) -> np.ndarray:
    """vLLM 0.21: prompt rows (response level) + generated rows (choice) on the MoE-layer axis."""
    p, o = len(prompt_ids), len(output_ids)
    empty = np.zeros((0, len(layout.moe_layers), layout.top_k), dtype=np.int64)
    prompt = _array(response["prompt_routed_experts"], label, "prompt_routed_experts")
    prompt = to_moe_rows(prompt, layout, label, "prompt_routed_experts") if prompt.size else empty
    output = (
        _array(part["routed_experts"], label, "routed_experts")
        if part.get("routed_experts") is not None
        else None
    )
    output = (
        to_moe_rows(output, layout, label, "routed_experts") if output is not None and output.size else empty
    )
    if prompt.shape[0] != p - start:
        raise ImportFormatError(
            f"{label}: prompt_routed_experts has {prompt.shape[0]} rows; expected one per prompt token from "
            f"position {start}: {p - start}"
        )
    if output.shape[0] not in ({0} if o == 0 else {o - 1, o}):
        raise ImportFormatError(
            f"{label}: routed_experts has {output.shape[0]} rows for {o} generated tokens; expected {max(o - 1, 0)} "
            "(the last generated token is never fed back)"
        )
    rows = np.concatenate([prompt, output[: max(o - 1, 0)]])
    return rows[: max(p + o - 1 - start, 0)]

"""SGLang server responses with `return_routed_experts=True` -> `Turn`s (responses.py places them).

Wire format, from sgl-project/sglang `python/sglang/srt/state_capturer/routed_experts_wire.py`
(`encode_routed_experts_for_wire` / `extract_routed_experts_from_meta_info`): base64 of a
flat row-major array `(positions, num_hidden_layers, top_k)` whose dtype is
`routed_experts_dtype` (`int32`, `uint16` or `uint8`; absent = `int32`, the older payload).
Positions cover `[routed_experts_start_len, seqlen - 1)` (`state_capturer/base.py`,
`get_topk`). Where the payload sits:

- native `/generate`: `meta_info.routed_experts` (+ `routed_experts_dtype`,
  `routed_experts_start_len`), output ids in `output_ids` or `meta_info.output_token_logprobs`;
- OpenAI-compatible `/v1/completions`, `/v1/chat/completions`: per choice, in
  `sgl_ext.routed_experts` (or the choice's `meta_info` when `return_meta_info` is set).

A record may also wrap the exchange as `{"request": {...}, "response": {...}}`; the prompt
ids are read from `input_ids` / `prompt_token_ids` (record, request or choice) or --prompts.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np

from routescope.importers.core.errors import ImportFormatError
from routescope.importers.core.model_layout import MoELayout
from routescope.importers.core.turns import Lookup, Turn, session_of, start_of, to_moe_rows, token_ids

# The dtypes SGLang sends (routed_experts_wire._WIRE_DTYPES), little-endian on the wire.
WIRE_DTYPES = {"int32": np.dtype("<i4"), "uint16": np.dtype("<u2"), "uint8": np.dtype("u1")}
PROMPT_KEYS = ("input_ids", "prompt_token_ids", "prompt_ids")


def decode_wire(payload: Any, dtype_name: Any, layout: MoELayout, name: str) -> np.ndarray:
    """Base64 flat payload -> [positions, num_hidden_layers, top_k] (the decoder-layer axis)."""
    if dtype_name is None:
        dtype_name = "int32"
    key = dtype_name.strip().lower() if isinstance(dtype_name, str) else None
    if key not in WIRE_DTYPES:
        raise ImportFormatError(
            f"{name}: routed_experts_dtype {dtype_name!r} is not one SGLang sends; expected "
            f"{', '.join(WIRE_DTYPES)} (absent means int32)"
        )
    if not isinstance(payload, str):
        raise ImportFormatError(
            f"{name}: routed_experts is a {type(payload).__name__}; expected a base64 string"
        )
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImportFormatError(f"{name}: routed_experts is not base64") from None
    dtype = WIRE_DTYPES[key]
    row = layout.num_hidden_layers * layout.top_k
    if len(raw) % dtype.itemsize or (len(raw) // dtype.itemsize) % row:
        raise ImportFormatError(
            f"{name}: routed_experts holds {len(raw)} bytes ({len(raw) / dtype.itemsize:g} {key} values), not a "
            f"whole number of rows of num_hidden_layers x top_k = {layout.num_hidden_layers} x {layout.top_k} "
            f"{key} values; is routed_experts_dtype right, and is --model the served model's config?"
        )
    values = np.frombuffer(raw, dtype=dtype).astype(np.int64)
    return values.reshape(-1, layout.num_hidden_layers, layout.top_k)


def turns_of(
    record: dict[str, Any], step: int, prompt: list[int] | None, layout: MoELayout, name: str
) -> list[Turn]:
    """One record (native or OpenAI-compatible response, or a request/response pair) -> its turns."""
    request = record.get("request") if isinstance(record.get("request"), dict) else {}
    response = record.get("response") if isinstance(record.get("response"), dict) else record
    choices = response.get("choices")
    if isinstance(choices, list) and choices:
        parts = [c for c in choices if isinstance(c, dict)]
        labels = [f"{name} choice {c.get('index', j)}" for j, c in enumerate(parts)]
    else:
        parts, labels = [response], [name]
    turns = []
    for part, label in zip(parts, labels, strict=True):
        meta = part.get("meta_info") if isinstance(part.get("meta_info"), dict) else {}
        find = Lookup(
            part.get("sgl_ext"),
            meta,
            part,
            response.get("sgl_ext"),
            response.get("meta_info"),
            response,
            record,
            request,
            request.get("sampling_params"),
        )
        rid = find.get("id", "rid")
        label = f"{label} (rid {rid})" if rid is not None else label
        payload = find.get("routed_experts")
        if payload is None:
            raise ImportFormatError(
                f"{label}: no routed_experts (looked in meta_info and sgl_ext); send the request with "
                "return_routed_experts=True to a server started with --enable-return-routed-experts"
            )
        prompt_ids = token_ids(find.get(*PROMPT_KEYS), label, "prompt token ids")
        if prompt_ids is None:
            prompt_ids = prompt
        if prompt_ids is None:
            raise ImportFormatError(
                f"{label}: no prompt token ids (looked for {', '.join(PROMPT_KEYS)} in the record, its request "
                "and meta_info); pass --prompts FILE with one id list per record"
            )
        turns.append(
            Turn(
                name=label,
                prompt_ids=prompt_ids,
                output_ids=_output_ids(find, meta, response, label),
                start=start_of(find.get("routed_experts_start_len"), label, "routed_experts_start_len"),
                rows=to_moe_rows(
                    decode_wire(payload, find.get("routed_experts_dtype"), layout, label),
                    layout,
                    label,
                    "routed_experts",
                ),
                session=session_of(record),
                step=step,
            )
        )
    return turns


def _output_ids(find: Lookup, meta: dict, response: dict, label: str) -> list[int]:
    ids = token_ids(find.get("output_ids", "token_ids", "completion_token_ids"), label, "output token ids")
    if ids is not None:
        return ids
    for source in (meta, response.get("meta_info")):
        logprobs = source.get("output_token_logprobs") if isinstance(source, dict) else None
        if isinstance(logprobs, list):  # (logprob, token_id, text) per generated token
            ids = [entry[1] if isinstance(entry, list) and len(entry) > 1 else None for entry in logprobs]
            return token_ids(ids, label, "meta_info.output_token_logprobs token ids") or []
    raise ImportFormatError(
        f"{label}: no output token ids (looked for output_ids, token_ids and meta_info.output_token_logprobs)"
    )

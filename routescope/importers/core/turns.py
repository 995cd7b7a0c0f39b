"""What the engine decoders (`sglang/responses.py`, `vllm/responses.py`) build and share: the
`Turn` a response record becomes, a key looked up across a record's nested dicts, and the
checks of token ids, starts, sessions and routed-expert rows. `responses.py` places the
turns into sequences; keeping these here lets it import the decoders without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from routescope.importers.core.errors import ImportFormatError
from routescope.importers.core.model_layout import MoELayout


@dataclass
class Turn:
    """One generation as a server returned it (one choice of one response record)."""

    name: str  # "record 3 choice 1 (rid ...)": how errors name the request
    prompt_ids: list[int]
    output_ids: list[int]
    start: int  # first position the rows cover
    rows: np.ndarray  # [covered positions, layers (decoder or MoE axis), top_k]; a row of -1: never computed
    session: str | None = None
    step: int = 0  # index of the record in the file


class Lookup:
    """A key searched in several dicts of one record, in order (choice first, then response, request)."""

    def __init__(self, *containers: Any) -> None:
        self.containers = [c for c in containers if isinstance(c, dict)]

    def get(self, *keys: str) -> Any:
        for container in self.containers:
            for key in keys:
                if container.get(key) is not None:
                    return container[key]
        return None


def token_ids(value: Any, name: str, what: str) -> list[int] | None:
    """A list of non-negative ints (or None when absent); ImportFormatError naming the request otherwise."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value
    ):
        raise ImportFormatError(f"{name}: {what} must be a list of non-negative token ids")
    return list(value)


def start_of(value: Any, name: str, key: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ImportFormatError(f"{name}: {key} is {value!r}; expected a non-negative integer")
    return value


def session_of(record: dict[str, Any]) -> str | None:
    request = record.get("request") if isinstance(record.get("request"), dict) else {}
    params = request.get("session_params") if isinstance(request.get("session_params"), dict) else {}
    metadata = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
    for value in (record.get("session_id"), metadata.get("session_id"), params.get("id")):
        if value is not None:
            return str(value)
    return None


def to_moe_rows(rows: np.ndarray, layout: MoELayout, name: str, what: str) -> np.ndarray:
    """[positions, layers, k] on the decoder-layer axis or the MoE axis -> [positions, MoE layers, k] int64."""
    width, k = rows.shape[1], rows.shape[2]
    moe = list(layout.moe_layers)
    if k != layout.top_k:
        raise ImportFormatError(f"{name}: {what} has top-k {k}; the model config says {layout.top_k}")
    if width == layout.num_hidden_layers:
        rows = rows[:, moe, :]
    elif width != len(moe):
        raise ImportFormatError(
            f"{name}: {what} has {width} layers; expected {layout.num_hidden_layers} (every decoder layer) "
            f"or {len(moe)} (the MoE layers {moe}) for this model config"
        )
    rows = rows.astype(np.int64)
    never = (rows == -1).all(axis=(1, 2))
    bad = ((rows < 0) | (rows >= layout.num_experts)) & ~never[:, None, None]
    if bad.any():
        pos, layer, slot = (int(x) for x in np.argwhere(bad)[0])
        raise ImportFormatError(
            f"{name}: {what} row {pos} holds expert id {int(rows[pos, layer, slot])} in layer {moe[layer]}; "
            f"the model has experts 0..{layout.num_experts - 1} (a whole row of -1 marks a token never computed)"
        )
    return rows

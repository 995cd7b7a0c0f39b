"""Calibration batches turned into model inputs: dicts passed through, text tokenized.

Used by `capture/calibration/activations.py`; a batch that is neither raises ValueError naming its number.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def iter_model_inputs(
    batches: Iterable[Any], tokenizer: Any = None, max_length: int = 512, device: torch.device | None = None
) -> Iterator[dict[str, Any]]:
    """Model-input dicts from dicts (passed through) or strings / lists of strings (tokenized)."""
    for number, batch in enumerate(batches):
        if isinstance(batch, str) or (
            isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], str)
        ):
            if tokenizer is None:
                raise ValueError(
                    f"calibration batch {number} is text; pass tokenizer= to tokenize it, or give dicts with input_ids"
                )
            texts = [batch] if isinstance(batch, str) else list(batch)
            if getattr(tokenizer, "pad_token", None) is None:
                tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
            batch = tokenizer(
                texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length
            )
            batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        elif not isinstance(batch, dict) and hasattr(batch, "keys"):
            batch = dict(batch)
        if not isinstance(batch, dict) or ("input_ids" not in batch and "inputs_embeds" not in batch):
            raise ValueError(
                f"calibration batch {number} must be a dict of model inputs with input_ids "
                f"(or a string with tokenizer=), got {type(batch).__name__}"
            )
        if device is not None:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        yield batch


def token_shape(batch: dict[str, Any]) -> tuple[int, int]:
    ids = batch.get("input_ids")
    if ids is None:
        ids = batch["inputs_embeds"][..., 0]
    if ids.dim() == 1:
        raise ValueError("calibration input_ids must be 2-D [batch, sequence]")
    return int(ids.shape[0]), int(ids.shape[1])

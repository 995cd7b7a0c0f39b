"""Which modality each token of a forward is: text, or an image, video or audio placeholder.

The recorder calls `token_modality` once per forward with the forward's keyword arguments.
The answer comes from what the model is given: `mm_token_type_ids` (transformers'
processors: 0 text, 1 image, 2 video, 3 audio), else the config's image / video / audio
token ids; a token nothing marks is text. The result stays on the model's device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

# The code of a modality is its index, the same numbers as transformers' mm_token_type_ids.
MODALITIES: tuple[str, ...] = ("text", "image", "video", "audio")
TEXT, IMAGE, VIDEO, AUDIO = range(len(MODALITIES))

# Config keys that name a placeholder token of each modality (the names differ by family).
TOKEN_ID_KEYS: dict[int, tuple[str, ...]] = {
    IMAGE: ("image_token_id", "image_token_index", "image_token"),
    VIDEO: ("video_token_id", "video_token_index", "video_token"),
    AUDIO: ("audio_token_id", "audio_token_index", "audio_token"),
}


def placeholder_ids(config: Any) -> dict[int, list[int]]:
    """modality code -> the token ids that stand for it, from a model config (and its
    sub-configs' top level). Empty for a text-only model."""
    found: dict[int, list[int]] = {}
    for code, keys in TOKEN_ID_KEYS.items():
        ids: list[int] = []
        for key in keys:
            value = getattr(config, key, None) if config is not None else None
            values = value if isinstance(value, (list, tuple)) else [value]
            ids += [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]
        if ids:
            found[code] = sorted(set(ids))
    return found


def token_modality(
    input_ids: torch.Tensor | None,
    kwargs: Mapping[str, Any],
    config: Any = None,
    ids_by_modality: dict[int, list[int]] | None = None,
) -> torch.Tensor | None:
    """Modality codes [B, S] (int8, on the inputs' device) for the forward's tokens, or None
    when nothing marks any token (then every token is text).

    `input_ids` is the forward's [B, S] ids (None with inputs_embeds alone). `kwargs` are the
    forward's keyword arguments; `mm_token_type_ids` there wins, and when it is wider than
    S (a whole sequence given with only the new tokens' ids) its last S columns are used.
    Otherwise the ids of `ids_by_modality` (default: `placeholder_ids(config)`) decide.
    """
    types = kwargs.get("mm_token_type_ids")
    width = input_ids.shape[1] if input_ids is not None else None
    if isinstance(types, torch.Tensor) and types.dim() == 2 and (width is None or types.shape[1] >= width):
        if width is not None:
            types = types[:, types.shape[1] - width :]
        if input_ids is not None and types.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"mm_token_type_ids has {types.shape[0]} rows but input_ids has {input_ids.shape[0]}; "
                "pass one row of token types per sequence"
            )
        bad = (types < 0) | (types >= len(MODALITIES))
        return torch.where(bad, TEXT, types).to(torch.int8)
    if input_ids is None:
        return None
    table = placeholder_ids(config) if ids_by_modality is None else ids_by_modality
    if not table:
        return None
    codes = torch.zeros(input_ids.shape, dtype=torch.int8, device=input_ids.device)
    for code, ids in table.items():
        marks = torch.isin(input_ids, torch.tensor(ids, dtype=input_ids.dtype, device=input_ids.device))
        codes.masked_fill_(marks, code)
    return codes


def modality_names(codes: Any) -> Any:
    """numpy array of modality names for an array of codes (what the tokens table stores)."""
    import numpy as np

    return np.asarray(MODALITIES, dtype=object)[np.asarray(codes, dtype=np.int64)]

"""Super Expert calibration (SPEC 4.6) and residual-stream statistics (massive activations).

`find_super_experts` and `calibrate` run the model over a few calibration batches with the
scoped hooks of `capture/calibration/calibrator.py` and turn the device-side maxima into DataFrames,
classified by `routescope.analysis.superexperts`; with `out=` they also write the
`expert_activations` and `hidden_stats` tables of a run. The jobs live in their own modules:
experts.py (which experts a model has), recompute.py (one expert's output), maxima.py
(running statistics), calibrator.py (hooks), calibration_inputs.py (batches and text),
calibration_writer.py (storage). The names they define are re-exported here for callers
of the single-module layout (the `super-experts` command, `rs.prune_experts`, tests).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from routescope import schema
from routescope.analysis.superexperts import (
    DEFAULT_QUANTILE,
    DEFAULT_RATIO,
    MASSIVE_ABS,
    MASSIVE_LAYER_FRACTION,
    MASSIVE_MEDIAN_RATIO,
    Calibration,
    classify_massive,
    classify_super_experts,
    massive_layer_count,
)
from routescope.capture.calibration.calibrator import Calibrator
from routescope.capture.calibration.inputs import iter_model_inputs, model_device, token_shape
from routescope.capture.calibration.maxima import MEDIAN_SAMPLE_CAP, ExpertMaxima, HiddenMaxima, MedianSample
from routescope.capture.calibration.recompute import expert_down_output
from routescope.capture.calibration.writer import write_calibration
from routescope.capture.discovery import text_config
from routescope.capture.experts import (
    SHARED_EXPERT_NAMES,
    ExpertSite,
    ExpertsLayout,
    SharedExpert,
    decoder_layers,
    find_expert_sites,
    is_recomputable_experts,
)


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    tokenizer: Any = None,
    quantile: float = DEFAULT_QUANTILE,
    ratio: float = DEFAULT_RATIO,
    layers: Iterable[int] | int | None = None,
    out: str | Path | None = None,
    *,
    max_length: int = 512,
    progress: bool = True,
) -> Calibration:
    """One calibration pass: the per-expert maxima with `is_super`, and the hidden-state statistics."""
    sites = find_expert_sites(model)
    config = text_config(model)
    num_hidden_layers = int(getattr(config, "num_hidden_layers", 0) or 0) or max(s.layer for s in sites) + 1
    device = model_device(model)
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    started = time.perf_counter()
    tokens = sequences = count = 0
    layers_hooked = decoder_layers(model, sites)
    with Calibrator(model, sites, layers_hooked, median_cap=MEDIAN_SAMPLE_CAP) as cal, torch.no_grad():
        bar = tqdm(
            iter_model_inputs(batches, tokenizer, max_length, device),
            total=total,
            desc="calibrating",
            unit="batch",
            disable=not progress,
        )
        for batch in bar:
            rows, length = token_shape(batch)
            mask = batch.get("attention_mask")
            valid = (
                mask.to(device).bool()
                if mask is not None
                else torch.ones(rows, length, dtype=torch.bool, device=device)
            )
            if valid.shape != (rows, length):
                raise ValueError(f"attention_mask has shape {tuple(valid.shape)}, input_ids {(rows, length)}")
            cal.valid = valid
            cal.positions = valid.long().cumsum(dim=1) - 1
            cal.seq_offset = sequences
            model(**batch)
            sequences += rows
            tokens += int(valid.sum())
            count += 1
            bar.set_postfix(tokens=tokens)
        bar.close()
    if tokens == 0:
        raise ValueError(
            "calibration data is empty: the batches held no tokens; pass at least one batch of "
            "input_ids (or text with tokenizer=) with a nonzero attention_mask"
        )
    experts = _experts_frame(sites, cal)
    experts = classify_super_experts(experts, num_hidden_layers, quantile, ratio, layers)
    thresholds = experts.attrs["thresholds"]
    experts = experts.sort_values(
        ["max_abs_output", "layer", "shared", "expert"], ascending=[False, True, True, True], kind="stable"
    ).reset_index(drop=True)
    experts.attrs["thresholds"] = thresholds
    hidden = classify_massive(_hidden_frame(cal))
    result = Calibration(experts, hidden, tokens, sequences, count, time.perf_counter() - started, thresholds)
    if out is not None:
        write_calibration(model, sites, result, out)
    return result


def _experts_frame(sites: list[ExpertSite], cal: Calibrator) -> pd.DataFrame:
    parts = []
    for site in sites:
        for shared, stats in ((False, cal.routed.get(site.layer)), (True, cal.shared.get(site.layer))):
            if stats is None:
                continue
            parts.append(
                pd.DataFrame(
                    {
                        "layer": site.layer,
                        "expert": np.arange(stats.max.numel()),
                        "shared": shared,
                        "max_abs_output": stats.max.cpu().numpy(),
                        "channel": stats.channel.cpu().numpy(),
                        "tokens_seen": stats.tokens.cpu().numpy(),
                    }
                )
            )
    df = pd.concat(parts, ignore_index=True)
    return df.astype(
        {"layer": "int64", "expert": "int64", "shared": bool, "channel": "int64", "tokens_seen": "int64"}
    )


def _hidden_frame(cal: Calibrator) -> pd.DataFrame:
    rows = [
        {
            "layer": layer,
            "max_abs": float(stats.max),
            "median_abs": stats.sample.median(),
            "channel": int(stats.channel),
            "seq_id": int(stats.seq),
            "pos": int(stats.pos),
        }
        for layer, stats in sorted(cal.hidden.items())
    ]
    columns = list(schema.HIDDEN_STATS_COLUMNS)
    return pd.DataFrame(rows, columns=columns)


def find_super_experts(
    model: nn.Module,
    batches: Iterable[Any],
    tokenizer: Any = None,
    quantile: float = DEFAULT_QUANTILE,
    ratio: float = DEFAULT_RATIO,
    layers: Iterable[int] | int | None = None,
    out: str | Path | None = None,
    *,
    max_length: int = 512,
    progress: bool = True,
) -> pd.DataFrame:
    """Super Experts of `model` (SPEC 4.6) from a calibration pass over `batches`.

    One row per routed and shared expert of every MoE layer: layer, expert, shared,
    max_abs_output, channel, tokens_seen, ratio_to_median, is_super; sorted by
    max_abs_output, largest first. `attrs["thresholds"]` holds the two thresholds and the
    layers searched, `attrs["hidden_stats"]` the per-layer residual-stream statistics as
    records (layer, max_abs, median_abs, channel, seq_id, pos, ratio_to_median, is_massive;
    `calibrate` returns them as a DataFrame). With `out=` the
    `expert_activations` and `hidden_stats` tables are written into that run directory.
    """
    result = calibrate(
        model, batches, tokenizer, quantile, ratio, layers, out, max_length=max_length, progress=progress
    )
    experts = result.experts
    # records, not a DataFrame: pandas compares attrs with == when concatenating frames
    experts.attrs["hidden_stats"] = result.hidden.to_dict("records")
    experts.attrs["tokens"] = result.tokens
    return experts


__all__ = [
    "DEFAULT_QUANTILE",
    "DEFAULT_RATIO",
    "MASSIVE_ABS",
    "MASSIVE_LAYER_FRACTION",
    "MASSIVE_MEDIAN_RATIO",
    "MEDIAN_SAMPLE_CAP",
    "SHARED_EXPERT_NAMES",
    "Calibration",
    "ExpertMaxima",
    "ExpertSite",
    "ExpertsLayout",
    "HiddenMaxima",
    "MedianSample",
    "SharedExpert",
    "calibrate",
    "classify_massive",
    "classify_super_experts",
    "decoder_layers",
    "expert_down_output",
    "find_expert_sites",
    "find_super_experts",
    "is_recomputable_experts",
    "iter_model_inputs",
    "massive_layer_count",
    "write_calibration",
]

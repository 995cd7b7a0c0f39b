"""Storage of a calibration: the `expert_activations` and `hidden_stats` tables of a run.

`write_calibration` writes both (rank 0) through the store's `PartWriter`, replacing an
earlier calibration's parts, and records the thresholds in the manifest (a directory that
is not a run yet gets a fresh manifest). Called by `capture/activations.py`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from routescope import schema
from routescope.analysis.superexperts import MASSIVE_ABS, MASSIVE_MEDIAN_RATIO, Calibration
from routescope.capture.discovery import text_config
from routescope.capture.experts import ExpertSite
from routescope.store.layout import table_dir
from routescope.store.manifest import MANIFEST_NAME, read_manifest, write_manifest
from routescope.store.writer import PartWriter


@dataclass
class _Tables:
    tables: dict[str, dict[str, np.ndarray]]

    def to_tables(self) -> dict[str, dict[str, np.ndarray]]:
        return self.tables


def _columns(df: pd.DataFrame, table: str) -> dict[str, np.ndarray]:
    types = schema.TABLE_COLUMNS[table]
    return {name: df[name].to_numpy(dtype=dtype.to_pandas_dtype()) for name, dtype in types.items()}


def write_calibration(
    model: nn.Module, sites: list[ExpertSite], result: Calibration, out: str | Path
) -> Path:
    """Write `expert_activations` and `hidden_stats` (rank 0) into run `out`, replacing earlier ones.

    A directory that is not a run yet gets a manifest (tokens 0, complete) so `open_run` reads it.
    """
    run_dir = Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = run_dir / MANIFEST_NAME
    manifest = read_manifest(run_dir) if manifest_path.exists() else _new_manifest(model, sites)
    tables = {
        schema.EXPERT_ACTIVATIONS: _columns(result.experts, schema.EXPERT_ACTIVATIONS),
        schema.HIDDEN_STATS: _columns(result.hidden, schema.HIDDEN_STATS),
    }
    old = {name: sorted(table_dir(run_dir, name, 0).glob("part-*")) for name in tables}
    writer = PartWriter(run_dir, rank=0)
    try:
        writer.submit(_Tables(tables))
    finally:
        writer.close()
    for paths in old.values():  # the new parts are in place: drop the previous calibration's
        for path in paths:
            path.unlink(missing_ok=True)
    thresholds = {k: v for k, v in result.thresholds.items() if not (isinstance(v, float) and math.isnan(v))}
    manifest["super_experts"] = {
        **thresholds,
        "tokens": result.tokens,
        "sequences": result.sequences,
        "batches": result.batches,
        "super_experts": [
            [int(r.layer), "shared" if r.shared else int(r.expert)]
            for r in result.experts[result.experts["is_super"]].itertuples()
        ],
        "massive_abs": MASSIVE_ABS,
        "massive_median_ratio": MASSIVE_MEDIAN_RATIO,
    }
    write_manifest(run_dir, manifest)
    return run_dir


def _new_manifest(model: nn.Module, sites: list[ExpertSite]) -> dict[str, Any]:
    import transformers

    import routescope

    config = text_config(model)
    return {
        "format_version": schema.FORMAT_VERSION,
        "model_type": getattr(config, "model_type", type(model).__name__),
        "model_name": getattr(config, "_name_or_path", "") or type(model).__name__,
        "model_class": type(model).__name__,
        "num_hidden_layers": int(getattr(config, "num_hidden_layers", 0) or 0),
        "moe_layers": [s.layer for s in sites],
        "num_experts": {str(s.layer): s.router.num_experts for s in sites},
        "top_k": {str(s.layer): s.router.top_k for s in sites},
        "router_kind": {str(s.layer): s.router.adapter.name for s in sites},
        "num_shared_experts": max(len(s.shared) for s in sites),
        "labels": [],
        "tokens": 0,
        "steps": 0,
        "complete": True,
        "rank": 0,
        "world_size": 1,
        "versions": {
            "routescope": routescope.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }

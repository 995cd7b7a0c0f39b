"""Storage of a calibration: the `expert_activations` and `hidden_stats` tables of a run.

`write_calibration` writes both (rank 0) through the store (`store.rundir.replace_parts`),
replacing an earlier calibration's parts, and records the thresholds in the manifest (a directory that
is not a run yet gets a fresh manifest). Called by `capture/calibration/activations.py`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from torch import nn

from routescope import schema
from routescope.analysis.superexperts import MASSIVE_ABS, MASSIVE_MEDIAN_RATIO, Calibration
from routescope.capture.experts import ExpertSite
from routescope.capture.facts import model_manifest, now
from routescope.store.manifest import MANIFEST_NAME, read_manifest
from routescope.store.rundir import RunDirectory, replace_parts


def _columns(df: pd.DataFrame, table: str) -> dict[str, np.ndarray]:
    types = schema.TABLE_COLUMNS[table]
    return {name: df[name].to_numpy(dtype=dtype.to_pandas_dtype()) for name, dtype in types.items()}


def write_calibration(
    model: nn.Module,
    sites: list[ExpertSite],
    result: Calibration,
    out: str | Path,
    wait: bool | float = False,
) -> Path:
    """Write `expert_activations` and `hidden_stats` (rank 0) into run `out`, replacing earlier ones.

    A directory that is not a run yet gets a manifest (tokens 0, complete) so `open_run` reads it.
    Holds the run's writer lock (rank 0) from reading the manifest to writing it back, so a
    recording in progress is never overwritten: RunBusyError, or `wait` for it.
    """
    run_dir = Path(out)
    with RunDirectory(run_dir) as directory:
        directory.lock(wait)
        return _write_locked(model, sites, result, directory)


def _write_locked(
    model: nn.Module, sites: list[ExpertSite], result: Calibration, directory: RunDirectory
) -> Path:
    run_dir = directory.path
    manifest = read_manifest(run_dir) if (run_dir / MANIFEST_NAME).exists() else _new_manifest(model, sites)
    tables = {
        schema.EXPERT_ACTIVATIONS: _columns(result.experts, schema.EXPERT_ACTIVATIONS),
        schema.HIDDEN_STATS: _columns(result.hidden, schema.HIDDEN_STATS),
    }
    # the new parts land before the previous calibration's go (store.rundir.replace_parts)
    replace_parts(
        run_dir,
        {name: pa.Table.from_pydict(cols, schema=schema.schema_for(name)) for name, cols in tables.items()},
    )
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
    directory.write_manifest(manifest)
    return run_dir


def _new_manifest(model: nn.Module, sites: list[ExpertSite]) -> dict[str, Any]:
    """A run that holds only a calibration: the store's manifest, no token, complete."""
    manifest = model_manifest(
        model,
        [s.router for s in sites],
        steps=0,
        rank=0,
        world_size=1,
        created_at=now(),
    )
    manifest.update(num_shared_experts=max(len(s.shared) for s in sites), complete=True)
    return manifest

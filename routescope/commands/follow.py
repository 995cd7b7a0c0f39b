"""`routescope report RUN --follow`: the latest step's balance table, printed as a run grows.

For a run still being written (a training run recorded by `rs.watch(..., out_dir=...)`, or any
live `rs.record`), re-read the run every `interval` seconds and print the balance of the
newest step each time a new one lands: by `train_step` (optimizer step) when the tokens carry
one, else by forward `step`. New alerts from the manifest (`training.alerts`) are printed
once. Stops when the run's manifest says complete, or after `timeout` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from routescope import schema

BALANCE_COLUMNS = ["layer", "tokens", "cv", "max_violation", "balancedness", "norm_entropy"]


def step_column(run: Any) -> str:
    """`train_step` when the run's tokens carry it, else `step`."""
    columns = run.sql("SELECT * FROM tokens LIMIT 0").columns
    return schema.TRAIN_STEP if schema.TRAIN_STEP in columns else "step"


def open_when_ready(path: Path, timeout: float | None, interval: float) -> Any:
    """Open the run, waiting for its manifest while the writer has not created it yet."""
    import routescope as rs

    started = time.monotonic()
    while True:
        try:
            return rs.open_run(path)
        except (FileNotFoundError, rs.RunFormatError):
            if timeout is not None and time.monotonic() - started > timeout:
                raise
            time.sleep(interval)


def follow(
    path: str | Path,
    interval: float = 2.0,
    timeout: float | None = None,
    where: str | None = None,
    emit: Callable[[str], None] = print,
) -> int:
    """Print each new latest step's balance until the run is complete; returns the steps shown."""
    started = time.monotonic()
    run = open_when_ready(Path(path), timeout, interval)
    shown, last, alerts_seen = 0, None, 0
    try:
        while True:
            complete = run.complete
            if run.manifest.get("tokens"):
                column = step_column(run)
                latest = run.sql(f"SELECT max({column}) AS s FROM tokens")["s"].iloc[0]
                if latest is not None and latest == latest and latest != last:
                    last = int(latest)
                    predicate = f"{column} = {last}" + (f" AND ({where})" if where else "")
                    table = run.balance(where=predicate)
                    state = "" if complete else "  (run still being written: this step may still grow)"
                    emit(f"{column} {last}: {int(table['tokens'].max() if len(table) else 0)} tokens{state}")
                    emit(table[[c for c in BALANCE_COLUMNS if c in table.columns]].to_string(index=False))
                    shown += 1
            alerts = run.manifest.get("training", {}).get("alerts", [])
            for alert in alerts[alerts_seen:]:
                detail = alert.get("text") or f"{alert['value']:.3f}"  # older runs: no text
                emit(
                    f"alert: layer {alert['layer']} {alert['kind']} {detail} at train_step {alert['train_step']}"
                )
            alerts_seen = len(alerts)
            if complete or (timeout is not None and time.monotonic() - started > timeout):
                return shown
            time.sleep(interval)
            run.refresh()
    finally:
        run.close()

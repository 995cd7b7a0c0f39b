"""What an analysis function needs from an opened run, as a Protocol.

`routescope.analysis.run.Run` satisfies it; metrics.py, placement.py and the other analysis
modules annotate with `RunView` instead of importing `Run`, so that run.py can import them
without an import cycle (run -> metrics, never back; tests/test_architecture.py checks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import duckdb
import pandas as pd


class RunView(Protocol):
    """An opened run: its DuckDB connection (views `tokens`, `routing`, ...) and manifest facts."""

    path: Path
    con: duckdb.DuckDBPyConnection
    manifest: dict[str, Any]

    @property
    def labels(self) -> list[str]: ...

    @property
    def moe_layers(self) -> list[int]: ...

    def num_experts(self, layer: int) -> int: ...

    def top_k(self, layer: int) -> int: ...

    def has_table(self, table: str) -> bool: ...

    def expert_load(self, where: str | None = None) -> pd.DataFrame: ...

"""The Run object: a recorded run directory opened for analysis through DuckDB.

`open_run` checks the manifest and every Parquet part, then exposes the tables as DuckDB
views (`tokens`, `routing`, and the optional tables). The metric methods bind the named
queries of `routescope/analysis/queries/`; the CLI, dashboard and notebooks call these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from routescope.analysis.database import create_views
from routescope.store.layout import list_parts, list_tables
from routescope.store.manifest import read_manifest


class Run:
    """A run directory opened for reading. Use `open_run(path)` to make one."""

    def __init__(self, path: Path, skip_corrupt: bool = False, threads: int | None = None) -> None:
        self.path = Path(path)
        self.skip_corrupt = skip_corrupt
        self.con = duckdb.connect(":memory:")
        if threads:
            self.con.execute(f"SET threads = {int(threads)}")
        self.skipped: list[Path] = []
        self.manifest: dict[str, Any] = {}
        self.refresh()

    def refresh(self) -> Run:
        """Re-read the manifest and pick up parts written since the run was opened."""
        self.manifest = read_manifest(self.path)
        self.skipped = create_views(self.con, self.path, self.labels, skip_corrupt=self.skip_corrupt)
        return self

    # -- manifest facts ----------------------------------------------------------------
    @property
    def labels(self) -> list[str]:
        return list(self.manifest.get("labels", []))

    @property
    def moe_layers(self) -> list[int]:
        return [int(layer) for layer in self.manifest["moe_layers"]]

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete", False))

    def num_experts(self, layer: int) -> int:
        return int(self.manifest["num_experts"][str(layer)])

    def top_k(self, layer: int) -> int:
        return int(self.manifest["top_k"][str(layer)])

    @property
    def tables(self) -> list[str]:
        """Tables with at least one finished part."""
        return list_tables(self.path)

    def has_table(self, table: str) -> bool:
        return bool(list_parts(self.path, table))

    # -- queries -----------------------------------------------------------------------
    def sql(self, query: str, params: dict[str, Any] | list[Any] | None = None) -> pd.DataFrame:
        """Run SQL over the run's views and return a DataFrame; values go in `params`."""
        return self.con.execute(query, params).df()

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        m = self.manifest
        state = "complete" if self.complete else "INCOMPLETE"
        return (
            f"Run({str(self.path)!r}, model_type={m.get('model_type')!r}, "
            f"moe_layers={len(self.moe_layers)}, tokens={m.get('tokens')}, {state})"
        )


def open_run(path: str | Path, skip_corrupt: bool = False) -> Run:
    """Open a run directory for analysis.

    FileNotFoundError when `path` does not exist; RunFormatError (naming the file) when it
    is not a run or holds a corrupt part, unless `skip_corrupt=True`, which reads the rest
    and lists the skipped parts in `Run.skipped`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no run at {path}: the path does not exist")
    return Run(path, skip_corrupt=skip_corrupt)

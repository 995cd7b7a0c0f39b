"""Analysis layer: DuckDB views over a run directory and the routing-health metrics."""

from routescope.analysis.run import Run, open_run

__all__ = ["Run", "open_run"]

"""Analysis layer: DuckDB views over a run directory and the routing-health metrics."""

from routescope.analysis.opening import open_run
from routescope.analysis.run import Run

__all__ = ["Run", "open_run"]

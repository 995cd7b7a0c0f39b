"""Live export of routing numbers from a recording process (Prometheus)."""

from routescope.export.prometheus import RoutingExporter

__all__ = ["RoutingExporter"]

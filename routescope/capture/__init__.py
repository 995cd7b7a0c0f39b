"""Capture layer: router discovery and the hooks that record routing decisions."""

from routescope.capture.discovery import RouterSite, find_routers
from routescope.capture.recorder import Recorder, RunExistsError, record

__all__ = ["Recorder", "RouterSite", "RunExistsError", "find_routers", "record"]

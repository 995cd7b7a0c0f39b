"""Capture layer: router discovery and the hooks that record routing decisions.

Everything here needs torch, so the names load on first use (PEP 562): importing
`routescope.capture` alone, as `import routescope` may, stays cheap and torch-free.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

LAZY: dict[str, str] = {
    "Recorder": "routescope.capture.recording.recorder",
    "RunExistsError": "routescope.capture.recording.recorder",
    "record": "routescope.capture.recording.recorder",
    "RouterSite": "routescope.capture.discovery",
    "find_routers": "routescope.capture.discovery",
}

if TYPE_CHECKING:
    from routescope.capture.discovery import RouterSite, find_routers
    from routescope.capture.recording.recorder import Recorder, RunExistsError, record


def __getattr__(name: str) -> Any:
    module = LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'routescope.capture' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(LAZY))


__all__ = ["Recorder", "RouterSite", "RunExistsError", "find_routers", "record"]

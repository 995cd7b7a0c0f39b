"""The routescope web dashboard: `create_app(run_paths)` builds it, `serve(...)` runs it.

Started by `routescope dashboard RUN [RUN ...]` (dashboard/command.py). It reads runs only
through the public Python API and draws its figures with `routescope.plots`. Dash is
imported on first use, so `routescope --help` stays fast.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from routescope.dashboard import app

        return getattr(app, name)
    raise AttributeError(f"module 'routescope.dashboard' has no attribute {name!r}")

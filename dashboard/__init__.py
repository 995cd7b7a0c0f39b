"""The routescope web dashboard: `create_app(run_paths)` builds it, `serve(...)` runs it.

Started by `routescope dashboard RUN [RUN ...]` (dashboard/command.py). It reads runs only
through the public Python API and draws its figures with `routescope.plots`.
"""

from dashboard.app import create_app, serve

__all__ = ["create_app", "serve"]

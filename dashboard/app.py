"""The Dash app: a shell (run picker, page links, live-run refresh) around one page per file.

`create_app(run_paths)` serves exactly the runs it is given: the browser picks one by its
index from a dropdown and can open nothing else. `create_app` reads nothing from disk until a
page asks for it; `serve` runs it on 127.0.0.1 by default and opens the run shown first while
the browser loads (`start_ahead`).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dash
from dash import Input, Output, State, ctx, dcc, html, no_update

from routescope.dashboard.components import TABLE_CSS, message
from routescope.dashboard.javascript import serve_javascript
from routescope.dashboard.pages import PAGES
from routescope.dashboard.queries import APART, QUERIES
from routescope.dashboard.runs import RunRegistry, RunUnavailable, get_registry, set_registry
from routescope.dashboard.urlstate import sync_run
from routescope.plots.style import use_template_by_default

REFRESH_MS = 3000  # how often a run that is still being written is re-read


def create_app(
    run_paths: Sequence[str | Path],
    refresh_ms: int = REFRESH_MS,
    skip_corrupt: bool = False,
    build_rollups: bool = False,
) -> dash.Dash:
    """A Dash app serving the runs at `run_paths` (opened lazily, problems shown on the page);
    `skip_corrupt` opens them with open_run(..., skip_corrupt=True); `build_rollups` builds the
    rollup tables of a finished run (local or on object storage) that lacks them, in the
    background, on its first open."""
    if not run_paths:
        raise ValueError("create_app needs at least one run directory")
    registry = RunRegistry(run_paths, skip_corrupt=skip_corrupt, build_rollups=build_rollups)
    use_template_by_default()  # figures get the template when serialized, not validated per figure
    for name, func in QUERIES.items():
        registry.register_query(name, func, apart=name in APART)
    set_registry(registry)

    app = dash.Dash(
        __name__,
        use_pages=True,
        pages_folder="",
        title="routescope",
        suppress_callback_exceptions=True,
        update_title=None,
    )
    app.server.config["ROUTESCOPE_REGISTRY"] = registry
    app.index_string = app.index_string.replace("{%css%}", "{%css%}<style>" + TABLE_CSS + "</style>")
    serve_javascript(app)  # a partial plotly.js; every script compiled off the main thread
    for page in PAGES:
        page.register(app)
    app.layout = shell(registry, refresh_ms)
    register_shell_callbacks(app)
    return app


def shell(registry: RunRegistry, refresh_ms: int) -> html.Div:
    nav = [
        dcc.Link(
            page.PAGE["name"],
            href=page.PAGE["path"],
            style={"marginRight": "8px", "whiteSpace": "nowrap"},
            id=f"app-nav-{i}",
        )
        for i, page in enumerate(PAGES)
    ]
    return html.Div(
        [
            html.Div(
                [
                    html.Span(
                        "routescope", style={"fontWeight": "bold", "fontSize": "20px", "marginRight": "16px"}
                    ),
                    html.Div(
                        dcc.Dropdown(
                            id="app-run",
                            options=registry.options(),
                            value=registry.keys[0],
                            clearable=False,
                            searchable=False,
                        ),
                        style={"width": "180px", "marginRight": "12px", "flex": "0 0 auto"},
                    ),
                    html.Nav(nav, style={"display": "flex", "flexWrap": "nowrap", "fontSize": "13px"}),
                ],
                style={
                    "display": "flex",
                    "alignItems": "center",
                    "padding": "10px 16px",
                    "borderBottom": "1px solid #ddd",
                    "background": "#fafafa",
                },
            ),
            dcc.Location(id="app-url", refresh=False),
            html.Div(id="app-status", style={"padding": "0 16px"}),
            dcc.Interval(id="app-refresh", interval=refresh_ms, disabled=True),
            dcc.Store(id="app-version"),
            html.Div(dash.page_container, style={"padding": "0 16px 32px 16px"}),
        ],
        style={"fontFamily": "system-ui, -apple-system, Segoe UI, sans-serif", "background": "#fff"},
    )


def update_run_state(run_key: Any, _n_intervals: Any, published: Any = None) -> tuple[Any, Any, bool]:
    """Shell callback: re-read a live run, publish {run, version}, show its state.

    Returns (app-version data, app-status children, app-refresh disabled). When nothing
    changed since `published`, the data is left alone so the pages do not redraw.
    """
    state, status, disabled = run_state(run_key)
    if state is not None and state == published:
        return no_update, status, disabled
    return state, status, disabled


def run_state(run_key: Any) -> tuple[Any, Any, bool]:
    registry = get_registry()
    try:
        registry._slot(run_key)
    except RunUnavailable as exc:
        return None, message(str(exc), "error"), True
    try:
        version = registry.refresh(run_key)
        run = registry.run(run_key)
    except RunUnavailable as exc:
        return {"run": run_key, "version": None, "error": str(exc)}, message(str(exc), "error"), True
    state = {"run": run_key, "version": [str(v) for v in version]}
    damage = _damage(run_key, state["version"], run)
    if damage:
        note = (
            f"DAMAGED RUN: {run.path.name}: {'; '.join(damage)}. The numbers on these pages cannot be "
            f"trusted: run `routescope check {getattr(run, 'uri', None) or run.path}` for every failed invariant."
        )
        return state, message(note, "error"), run.complete
    if not run.complete:
        note = (
            f"{run.path.name}: still recording (or stopped without finishing): "
            f"{run.manifest.get('tokens', 0):,} tokens so far; this page re-reads it every few seconds."
        )
        return state, message(note, "warning"), False
    if not run.manifest.get("tokens"):
        return state, message(f"{run.path.name}: this run holds no tokens.", "warning"), True
    building = registry.rollup_state(run_key)
    if building == "building":  # the page polls until the rollups are in (the version then changes)
        note = (
            f"{run.path.name}: building its rollup tables (routescope index), once; until then pages "
            "read the routing rows and are slower."
        )
        return state, message(note, "info"), False
    return state, None, True


_DAMAGE: dict[tuple[Any, tuple[str, ...]], list[str]] = {}
_DAMAGE_LOCK = threading.Lock()


def _damage(run_key: Any, version: list[str], run: Any) -> list[str]:
    """`run.quick_check()` once per version of the run (footers only, but not on every tick)."""
    key = (run_key, tuple(version))
    with _DAMAGE_LOCK:  # a second caller waits for the first one's answer
        if key not in _DAMAGE:
            _DAMAGE[key] = run.quick_check()
        return _DAMAGE[key]


# imported when the server starts, not during a user's first view: the doctor's scipy.special
# (about 0.1 s on the Overview's first answer; the command line keeps it lazy)
IMPORT_AHEAD = ("scipy.special",)


def start_ahead() -> threading.Thread:
    """What the first page view would otherwise wait for, done as the server starts: the
    imports in IMPORT_AHEAD, then opening the run shown first and checking its parts' footers
    (`run_state`), on a thread, while the browser loads the page's scripts. `serve` calls it
    (create_app itself opens nothing); a problem is left for the page to show."""

    def ahead() -> None:
        for name in IMPORT_AHEAD:
            importlib.import_module(name)
        registry = get_registry()
        if registry.keys:
            run_state(registry.keys[0])

    thread = threading.Thread(target=ahead, name="routescope-dashboard-ahead", daemon=True)
    thread.start()
    return thread


def run_from_url(fragment: Any, run_value: Any) -> tuple[Any, Any]:
    """Shell callback: the URL fragment's `run=` picks the run; picking a run writes it there."""
    chosen, new_fragment = sync_run(fragment, run_value, get_registry().keys, ctx.triggered_id)
    return (
        no_update if chosen is None else chosen,
        no_update if new_fragment is None else new_fragment,
    )


def register_shell_callbacks(app: dash.Dash) -> None:
    app.callback(
        Output("app-run", "value"),
        Output("app-url", "hash", allow_duplicate=True),
        Input("app-url", "hash"),
        Input("app-run", "value"),
        prevent_initial_call=True,
    )(run_from_url)
    app.callback(
        Output("app-version", "data"),
        Output("app-status", "children"),
        Output("app-refresh", "disabled"),
        Input("app-run", "value"),
        Input("app-refresh", "n_intervals"),
        State("app-version", "data"),
    )(update_run_state)


def serve(
    run_paths: Sequence[str | Path],
    host: str = "127.0.0.1",
    port: int = 8050,
    debug: bool = False,
    skip_corrupt: bool = False,
) -> None:
    """Serve the dashboard for `run_paths` until interrupted (loopback only by default).

    Served by waitress (a pure-Python production WSGI server) when it is installed, so no
    "development server" warning; `debug=True` uses Flask's reloading development server.
    """
    app = create_app(run_paths, skip_corrupt=skip_corrupt, build_rollups=True)
    start_ahead()
    if not debug:
        try:
            from waitress import serve as waitress_serve
        except ImportError:
            pass
        else:
            waitress_serve(app.server, host=host, port=port, threads=8, _quiet=True)
            return
    app.run(host=host, port=port, debug=debug)

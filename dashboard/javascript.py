"""The JavaScript the dashboard serves, as it serves it: `serve_javascript(app)`.

dcc.Graph loads plotly.js from one URL (`PLOTLY_PATH`) when the first graph mounts; by default
that is the installed `plotly` package's full bundle (4.7 MB, every trace type). In a cold
browser its evaluation held the main thread for about a second on a 2-core machine
(benchmarks/RESULTS.md, "Chromium first view"), during which Dash could not handle the
callback answers that had already come back. Two things cut that:

- **A partial bundle.** `plotly_bundle.json` names the trace types the dashboard draws
  (scatter, bar, heatmap, sankey) and the plotly.js version; `static/plotly-routescope.min.js`
  is plotly.js's core with only those registered (1.4 MB), built the way plotly.js documents
  a custom bundle by `scripts/build_plotly_bundle.sh` from pinned npm versions. It is served
  when its plotly.js major version is the one the installed `plotly` package writes figures
  for (plotly.js keeps figure attributes compatible within a major version); otherwise the
  package's own full file is, so an older or newer `plotly` never gets a mismatched renderer.
  tests/test_dashboard_javascript.py checks that every trace type the dashboard's code builds
  is in the bundle, and the browser test that every drawn trace's type is registered.
- **A V8 compile hint** in front of plotly.js and of Dash's own scripts (React, the renderer,
  the component suites: the responses of `_dash-component-suites/`, otherwise unchanged). The
  first line `//# allFunctionsCalledOnLoad` (V8's explicit compile hints, Chrome 136+) makes
  the browser compile the whole file on its script-streaming thread while it downloads, so
  the main thread only runs it. Other browsers read it as a comment.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import flask

if TYPE_CHECKING:
    import dash

COMPILE_HINT = b"//# allFunctionsCalledOnLoad\n"
# where the Dash renderer points dcc.Graph (window._dashPlotlyJSURL) when serving locally
PLOTLY_PATH = "_dash-component-suites/plotly/package_data/plotly.min.js"
BUNDLE_META = Path(__file__).parent / "plotly_bundle.json"


@functools.cache
def bundle_meta() -> dict[str, Any]:
    """The partial bundle's description: plotly.js version, trace types, file, sha256."""
    return json.loads(BUNDLE_META.read_text())


def package_bundle() -> tuple[Path, str]:
    """(the installed plotly package's full plotly.min.js, the plotly.js version it bundles)."""
    import plotly
    from plotly.offline import get_plotlyjs_version

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js", get_plotlyjs_version()


def chosen_bundle(package_plotlyjs: str) -> Path | None:
    """The partial bundle's path when it renders what a `plotly` package bundling plotly.js
    `package_plotlyjs` writes (same major version); None: serve the package's own file."""
    meta = bundle_meta()
    if package_plotlyjs.split(".")[0] != meta["plotly.js"].split(".")[0]:
        return None
    return BUNDLE_META.parent / meta["file"]


@functools.cache
def hinted_bundle() -> tuple[bytes, str]:
    """(the plotly.js the dashboard serves, with the compile hint first; its ETag)."""
    package_file, version = package_bundle()
    body = COMPILE_HINT + (chosen_bundle(version) or package_file).read_bytes()
    return body, hashlib.sha1(body).hexdigest()


def serve_javascript(app: dash.Dash) -> None:
    """Answer the Dash app's plotly.js URL (under its routes prefix) with `hinted_bundle()`,
    and put the compile hint in front of the other scripts Dash serves."""
    path = app.config.routes_pathname_prefix + PLOTLY_PATH
    suites = app.config.routes_pathname_prefix + "_dash-component-suites/"

    def plotly_js() -> flask.Response | None:
        if flask.request.path != path:
            return None
        body, etag = hinted_bundle()
        response = flask.Response(body, mimetype="text/javascript")
        response.set_etag(etag)
        return response.make_conditional(flask.request)

    def hint(response: flask.Response) -> flask.Response:
        request = flask.request
        if (
            response.status_code == 200
            and request.path.startswith(suites)
            and request.path.endswith(".js")
            and request.path != path
            and not response.content_encoding  # a compressed body is left as it is
        ):
            response.direct_passthrough = False
            response.set_data(COMPILE_HINT + response.get_data())
        return response

    app.server.before_request(plotly_js)
    app.server.after_request(hint)

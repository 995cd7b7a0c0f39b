"""plotly.js as Dash serves it, with a V8 compile hint in front: `serve_with_compile_hint(app)`.

dcc.Graph loads the plotly.js bundle of the installed `plotly` package (4.7 MB) when the first
graph mounts. In a cold browser its evaluation held the main thread for about a second on a
2-core machine (benchmarks/RESULTS.md, "Chromium first view"), during which Dash could not
handle the callback answers that had already come back. The first line `//# allFunctionsCalledOnLoad`
(V8's explicit compile hints, Chrome 136+) makes the browser compile the whole file on its
script-streaming thread while it downloads, so the main thread only runs it: the callbacks go
on meanwhile. Other browsers read the line as a comment. The bytes after it are the package's
file unchanged (same URL, same version; nothing is vendored), with an ETag as Dash gives it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import flask

if TYPE_CHECKING:
    import dash

COMPILE_HINT = b"//# allFunctionsCalledOnLoad\n"
# where the Dash renderer points dcc.Graph (window._dashPlotlyJSURL) when serving locally
PLOTLY_PATH = "_dash-component-suites/plotly/package_data/plotly.min.js"


@functools.cache
def hinted_bundle() -> tuple[bytes, str]:
    """(the installed plotly package's plotly.min.js with the compile hint first, its ETag)."""
    import hashlib

    import plotly

    body = COMPILE_HINT + (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_bytes()
    return body, hashlib.sha1(body).hexdigest()


def serve_with_compile_hint(app: dash.Dash) -> None:
    """Answer the Dash app's plotly.js URL (under its routes prefix) with `hinted_bundle()`."""
    path = app.config.routes_pathname_prefix + PLOTLY_PATH

    def plotly_js() -> flask.Response | None:
        if flask.request.path != path:
            return None
        body, etag = hinted_bundle()
        response = flask.Response(body, mimetype="text/javascript")
        response.set_etag(etag)
        return response.make_conditional(flask.request)

    app.server.before_request(plotly_js)

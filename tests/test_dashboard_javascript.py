"""The JavaScript the dashboard serves (dashboard/javascript.py): the partial plotly.js bundle
is the file its description names, holds every trace type the dashboard's code builds, and is
served at dcc.Graph's plotly.js URL only when it matches the installed plotly; every script
Dash serves has the compile hint in front and is otherwise Dash's file, byte for byte."""

from __future__ import annotations

import ast
import hashlib
import importlib
from pathlib import Path

import plotly.graph_objects as go
from dash.fingerprint import check_fingerprint
from plotly.basedatatypes import BaseTraceType

from routescope.dashboard import javascript

REPO = Path(__file__).resolve().parent.parent
FIGURE_CODE = [REPO / "dashboard", REPO / "routescope" / "plots"]


def trace_types_built() -> dict[str, str]:
    """Every plotly trace type constructed as `go.<Trace>(...)` in the dashboard's and the
    plots' code: type -> first file:line."""
    found: dict[str, str] = {}
    for folder in FIGURE_CODE:
        for path in sorted(folder.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                func = node.func if isinstance(node, ast.Call) else None
                if (
                    isinstance(func, ast.Attribute)
                    and isinstance(func.value, ast.Name)
                    and func.value.id == "go"
                ):
                    cls = getattr(go, func.attr, None)
                    if isinstance(cls, type) and issubclass(cls, BaseTraceType):
                        found.setdefault(cls().type, f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_the_bundle_is_the_file_its_description_names():
    meta = javascript.bundle_meta()
    body = (javascript.BUNDLE_META.parent / meta["file"]).read_bytes()
    assert hashlib.sha256(body).hexdigest() == meta["sha256"]  # rebuilt: scripts/build_plotly_bundle.sh
    banner = body[:400].decode()
    assert f"plotly.js v{meta['plotly.js']}" in banner and ", ".join(meta["traces"]) in banner
    assert "Licensed under the MIT license" in banner


def test_every_trace_type_the_dashboard_builds_is_in_the_bundle():
    built = trace_types_built()
    assert {"heatmap", "bar", "scatter", "sankey"} <= set(built)  # the scan finds the known ones
    missing = {t: where for t, where in built.items() if t not in javascript.bundle_meta()["traces"]}
    assert missing == {}, f"add these to dashboard/plotly_bundle.json and rebuild the bundle: {missing}"


def test_the_bundle_is_chosen_only_for_its_plotlyjs_major_version():
    version = javascript.bundle_meta()["plotly.js"]
    major = int(version.split(".")[0])
    bundle = javascript.BUNDLE_META.parent / javascript.bundle_meta()["file"]
    assert javascript.chosen_bundle(version) == bundle
    assert javascript.chosen_bundle(f"{major}.99.0") == bundle
    assert javascript.chosen_bundle(f"{major - 1}.12.1") is None  # an older plotly: its own file
    assert javascript.chosen_bundle(f"{major + 1}.0.0") is None


def test_dcc_graphs_plotly_url_serves_the_chosen_file_behind_a_compile_hint():
    """dcc.Graph's plotly.js URL answers with the chosen file byte for byte after one V8
    compile-hint comment line, with an ETag that a cached copy revalidates; Dash's other
    scripts get the same line in front of their own bytes (a revalidation still answers 304)."""
    from routescope.dashboard.app import create_app

    package_file, version = javascript.package_bundle()
    expected = (javascript.chosen_bundle(version) or package_file).read_bytes()
    client = create_app([REPO / "no-such-run"]).server.test_client()
    first = client.get("/" + javascript.PLOTLY_PATH)
    assert first.status_code == 200 and first.mimetype == "text/javascript"
    assert first.data == javascript.COMPILE_HINT + expected
    assert javascript.COMPILE_HINT.decode().startswith("//")  # a comment to any other JavaScript engine
    again = client.get("/" + javascript.PLOTLY_PATH, headers={"If-None-Match": first.headers["ETag"]})
    assert again.status_code == 304 and not again.data
    index = client.get("/").get_data(as_text=True)
    renderer = next(s for s in index.split('"') if "dash_renderer" in s and s.endswith(".js"))
    scripts = [s for s in index.split('"') if s.startswith("/_dash-component-suites/") and s.endswith(".js")]
    assert renderer in scripts and len(scripts) >= 5  # React, the renderer, the component suites
    for url in scripts:
        served = client.get(url)
        assert served.status_code == 200 and served.data.startswith(javascript.COMPILE_HINT), url
        package, relative = url.removeprefix("/_dash-component-suites/").split("/", 1)
        unfingerprinted, _ = check_fingerprint(relative)
        own = Path(importlib.import_module(package).__file__).parent / unfingerprinted
        assert served.data[len(javascript.COMPILE_HINT) :] == own.read_bytes(), url
        if served.headers.get("ETag"):
            cached = client.get(url, headers={"If-None-Match": served.headers["ETag"]})
            assert cached.status_code == 304 and not cached.data, url

"""End to end: the dashboard in a real headless Chromium (Debian's /usr/bin/chromium, driven
by Playwright; never a browser download). Every page renders figures with data and the
console stays clean; screenshots go to artifacts/ for a person to look at."""

from __future__ import annotations

import shutil
import socket
import threading
from pathlib import Path

import pytest

from tests.test_dashboard import REPO, record_demo_run
from tests.test_dashboard_views import add_second_rank

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "artifacts"
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# path -> number of figures that must render with data
PAGES = {
    "/": 2,  # the layers x metric health view, and the balance across layers
    "/load": 3,
    "/time": 2,
    "/entanglement": 3,
    "/specialization": 2,
    "/super-experts": 2,
    "/tokens": 1,
    "/compare": 3,
    "/placement": 2,  # per-GPU load, and the step figure (max/mean per layer and over the step)
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium missing: apt-get install chromium"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The dashboard on a free loopback port serving two recorded runs (B calibrated)."""
    from werkzeug.serving import make_server

    from routescope.dashboard.app import create_app

    root = tmp_path_factory.mktemp("browser")
    run_a = record_demo_run(root / "run_a", seed=0)
    run_b = record_demo_run(root / "run_b", seed=1, calibrate=True)
    missing = root / "gone"
    two_ranks = root / "two_ranks"
    shutil.copytree(run_a, two_ranks)
    add_second_rank(two_ranks)
    app = create_app([run_b, run_a, missing, two_ranks])
    port = free_port()
    httpd = make_server("127.0.0.1", port, app.server, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    httpd.shutdown()
    thread.join(timeout=10)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.console_errors = []
    page.on("console", lambda m: page.console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.console_errors.append(str(e)))
    yield page
    context.close()


TRACE_HAS_DATA = """(p, i) => {
    const t = (p._fullData || [])[i], c = (p.calcdata || [])[i];
    if (!t || t.visible === false) return false;
    if (t.type === 'sankey') return !!(t.link && t.link.value && t.link.value.length);
    if (t.type === 'heatmap') return !!(c && c[0] && c[0].z && c[0].z.length);
    return t._length > 0;
}"""


UNREGISTERED_TRACES = """() => {
    const known = Object.keys(Plotly.PlotSchema.get().traces);
    return [...document.querySelectorAll('.js-plotly-plot')]
        .flatMap(p => (p.data || []).map(t => t.type || 'scatter'))
        .filter(type => !known.includes(type));
}"""


def wait_for_figures(page, count: int) -> None:
    """Until `count` plotly figures have drawn at least one trace with data."""
    page.wait_for_function(
        f"""n => {{
            const hasData = {TRACE_HAS_DATA};
            const plots = [...document.querySelectorAll('.js-plotly-plot')];
            return plots.filter(p => p.querySelector('.main-svg') &&
                (p._fullData || []).some((t, i) => hasData(p, i))).length >= n;
        }}""",
        arg=count,
        timeout=30_000,
    )


def figure_summary(page) -> list[dict]:
    """Per figure: its Graph id, traces with data, SVG roots and drawn marks."""
    return page.evaluate(
        f"""() => {{
            const hasData = {TRACE_HAS_DATA};
            return [...document.querySelectorAll('.js-plotly-plot')].map(p => ({{
                id: p.parentElement && p.parentElement.id,
                traces: (p._fullData || []).filter((t, i) => hasData(p, i)).length,
                svg: p.querySelectorAll('.main-svg').length,
                marks: p.querySelectorAll('.trace, .hm, .sankey, .point, .bars path').length,
            }}));
        }}"""
    )


def fits_width(page) -> bool:
    return page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth + 1")


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"dashboard_{name}.png"), full_page=True)


@pytest.mark.parametrize("path", list(PAGES))
def test_every_page_renders_figures_with_data(server, page, path):
    page.goto(server + path)
    wait_for_figures(page, PAGES[path])
    page.wait_for_load_state("networkidle")
    figures = figure_summary(page)
    assert len(figures) == PAGES[path], figures
    for fig in figures:
        assert fig["svg"] >= 1 and fig["traces"] >= 1 and fig["marks"] >= 1, figures
    assert not page.locator(".rs-error").count(), page.locator(".rs-error").all_inner_texts()
    assert fits_width(page), path  # wide tables scroll in their box, the page does not
    # the served plotly.js (a partial bundle, dashboard/javascript.py) knows every trace type drawn
    assert page.evaluate(UNREGISTERED_TRACES) == [], path
    shot(page, path.strip("/").replace("-", "_") or "overview")
    assert page.console_errors == []


def test_heatmap_click_shows_expert_details(server, page):
    page.goto(server + "/load")
    wait_for_figures(page, 3)
    box = page.locator("#load-heatmap .nsewdrag").first.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.1, box["y"] + box["height"] * 0.1)
    page.wait_for_function("() => document.querySelector('#load-detail-title') !== null", timeout=15_000)
    detail = page.locator("#load-detail").inner_text()
    assert "Most frequent tokens" in detail and "Chosen together with" in detail
    shot(page, "load_expert_details")
    assert page.console_errors == []


def test_filters_and_run_switch(server, page):
    page.goto(server + "/load")
    wait_for_figures(page, 3)
    page.locator("#load-phase").click()
    page.get_by_role("option", name="decode", exact=True).click()
    page.wait_for_function(
        "() => document.querySelector('#load-filter-note').innerText.includes('phase decode')", timeout=15_000
    )
    wait_for_figures(page, 3)
    # the missing run: a clear message, no traceback, no console error
    page.locator("#app-run").click()
    page.get_by_role("option", name="2: gone").click()
    page.wait_for_function(
        "() => document.querySelector('#app-status').innerText.includes('no such directory')", timeout=15_000
    )
    page.wait_for_function(
        "() => document.querySelector('#load-message').innerText.includes('no such directory')",
        timeout=15_000,
    )
    body = page.locator("body").inner_text()
    assert "Traceback" not in body
    shot(page, "missing_run")
    assert page.console_errors == []


def wait_text(page, selector: str, text: str, timeout: int = 20_000) -> None:
    """Until the element exists and its text contains `text`."""
    page.wait_for_function(
        "([s, t]) => { const e = document.querySelector(s); return !!e && e.innerText.includes(t); }",
        arg=[selector, text],
        timeout=timeout,
    )


def run_label(page) -> str:
    return page.locator("#app-run").inner_text()


def test_state_in_the_url_survives_a_reload(server, page):
    """A link carrying the run and the filters opens that view; a reload keeps it."""
    page.goto(server + "/load#run=1&phase=decode&layer=2&color=share")
    wait_text(page, "#load-filter-note", "phase decode")
    wait_for_figures(page, 3)
    assert "1: run_a" in run_label(page)
    assert "layer 2" in page.locator("#load-bars").inner_text()
    assert "Expert load (share)" in page.locator("#load-heatmap").inner_text()
    # picking another run writes it into the address; a reload keeps run and filters
    page.locator("#app-run").click()
    page.get_by_role("option", name="0: run_b").click()
    page.wait_for_function("() => window.location.hash.includes('run=0')", timeout=15_000)
    assert "phase=decode" in page.evaluate("() => window.location.hash")
    page.reload()
    wait_text(page, "#load-filter-note", "phase decode")
    assert "0: run_b" in run_label(page)
    assert page.console_errors == []


def test_step_box_applies_on_enter(server, page):
    page.goto(server + "/load")
    wait_for_figures(page, 3)
    box = page.locator("#load-step-from")
    box.fill("2")
    box.press("Enter")
    wait_text(page, "#load-filter-note", "steps 2")
    assert "steps=2-" in page.evaluate("() => window.location.hash")
    assert page.console_errors == []


def test_time_page_and_narrow_window(server, page):
    page.set_viewport_size({"width": 1024, "height": 900})
    page.goto(server + "/time")
    wait_for_figures(page, 2)
    nav = page.locator("nav").bounding_box()
    assert nav["height"] < 30, nav  # one line: the links do not wrap
    assert fits_width(page)
    shot(page, "time_1024px")
    assert page.console_errors == []


def test_compare_and_entanglement_read_the_url(server, page):
    page.goto(server + "/compare#a=1&b=0")
    wait_text(page, "#compare-run-a", "1: run_a")
    wait_text(page, "#compare-run-b", "0: run_b")
    wait_for_figures(page, 3)
    page.goto(server + "/entanglement#run=1&pair=1-2&paths=25")
    wait_text(page, "#entanglement-pair", "L1 → L2")
    wait_text(page, "#entanglement-transition", "L1→L2")
    assert "run=1" in page.evaluate("() => window.location.hash")
    assert page.console_errors == []


def test_per_rank_load_of_a_two_rank_run(server, page):
    page.goto(server + "/load#run=3&layer=1")
    wait_for_figures(page, 4)
    ranks = [f for f in figure_summary(page) if f["id"] == "load-ranks-graph"]
    assert len(ranks) == 1 and ranks[0]["traces"] == 2, figure_summary(page)
    assert "Load per rank, layer 1" in page.locator("#load-ranks").inner_text()
    shot(page, "load_two_ranks")
    assert page.console_errors == []


def test_placement_page_reads_the_url_and_explains_bad_values(server, page):
    """A link with a plan and a split draws it; an EP size that does not divide E is a message."""
    page.goto(server + "/placement#run=1&ep=4&redundant=4&method=eplb&fit=1")
    wait_text(page, "#placement-note", "steps ≤ 1")
    wait_for_figures(page, 1)
    assert "eplb (after)" in page.locator("#placement-stats").inner_text()
    assert "4 GPUs × 5 slots (4 redundant)" in page.locator("#placement-note").inner_text()
    shot(page, "placement_eplb_split")
    box = page.locator("#placement-ep")
    box.fill("3")
    box.press("Enter")
    wait_text(page, "#placement-message", "do not split evenly over ep_size=3 GPUs")
    assert "ep=3" in page.evaluate("() => window.location.hash")
    assert "Traceback" not in page.locator("body").inner_text()
    assert page.console_errors == []


TRICKY_CELLS = [
    "a|b",
    "*not bold*",
    "_x_ and __y__",
    "<b>not a tag</b>",
    "&amp; stays",
    "http://example.com/x",
    "[no](link)",
    "back\\slash\\",
    "`no code`",
    "# not a heading",
    "~~not struck~~",
    "1.5e+05",
    "-",
    "!{}()+>",
    "‘quotes’ ✓ ☃",
]


def test_a_table_shows_every_cell_literally_and_costs_one_component(browser):
    """`components.table` is one Markdown component (not one Dash component per cell, which
    cost over a second per page at 100M rows): whatever a cell holds, the browser shows it as
    written, in a real <table>."""
    import dash
    import pandas as pd
    from werkzeug.serving import make_server

    from routescope.dashboard.components import TABLE_CSS, table

    df = pd.DataFrame({"text": TRICKY_CELLS, "n": range(len(TRICKY_CELLS))})
    component = table(df, [("text", "a | title"), ("n", "n_th")], max_rows=len(df))
    assert len(list(component._traverse())) == 1  # the Div and its one Markdown child
    app = dash.Dash(__name__)
    app.index_string = app.index_string.replace("{%css%}", "{%css%}<style>" + TABLE_CSS + "</style>")
    app.layout = component
    port = free_port()
    httpd = make_server("127.0.0.1", port, app.server, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector(".rs-table table td")
        head = page.eval_on_selector_all(".rs-table th", "els => els.map(e => e.textContent)")
        cells = page.eval_on_selector_all(
            ".rs-table tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
        )
        links = page.locator(
            ".rs-table a, .rs-table code, .rs-table em, .rs-table strong, .rs-table h1"
        ).count()
    finally:
        context.close()
        httpd.shutdown()
        thread.join(timeout=10)
    assert head == ["a | title", "n_th"]
    assert cells == [[text.strip(), str(i)] for i, text in enumerate(TRICKY_CELLS)]
    assert links == 0

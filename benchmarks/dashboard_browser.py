"""First view of every dashboard page in a real headless Chromium (Debian's /usr/bin/chromium
through Playwright), on a run you give: the issue-33 measurement at 100M routing rows.

    python benchmarks/dashboard_browser.py RUN [RUN_B] [--rounds 1] [--pages /load /entanglement]

Serves the run(s) on a free loopback port (RUN_B defaults to RUN served a second time, so the
Compare page has two runs), then opens each page in a fresh browser context (no cached
page state; the server's query cache is cold for each page's own queries, as a user's first
visit is) and times from navigation until the page's figures have drawn traces with data.
Compare is timed twice: until its load and balance figures are drawn (the part read from
the rollup tables) and until router saturation follows. Build a large run first with
`python benchmarks/dashboard_callbacks.py --rows 1e8` and `routescope index RUN`.

`--warm` adds a second column, labelled as such: one browser context that has already shown
a page (scripts in its HTTP and code caches) navigates to each page in turn, after the cold
pass (so the server's query cache is warm too): a returning user's view, not a first view.
`benchmarks/dashboard_browser_breakdown.py` shows where a first view's time goes.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import threading
import time
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
# page -> figures that must draw with data for its first view (Compare: the fast part first)
PAGES = {
    "/": 2,
    "/load": 2,
    "/time": 2,
    "/entanglement": 2,
    "/specialization": 2,
    "/tokens": 1,
    "/placement": 2,
    "/compare": 2,
}
HAS_DATA = """n => {
    const ok = p => (p._fullData || []).some((t, i) => {
        const c = (p.calcdata || [])[i];
        if (!t || t.visible === false) return false;
        if (t.type === 'heatmap') return !!(c && c[0] && c[0].z && c[0].z.length);
        if (t.type === 'sankey') return !!(t.link && t.link.value && t.link.value.length);
        return t._length > 0;
    });
    return [...document.querySelectorAll('.js-plotly-plot')].filter(p => p.querySelector('.main-svg') && ok(p)).length >= n;
}"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("run_b", type=Path, nargs="?")
    ap.add_argument("--rounds", type=int, default=1, help="fresh server per round; medians reported")
    ap.add_argument("--pages", nargs="+", choices=list(PAGES), help="only these pages (default: all)")
    ap.add_argument(
        "--warm", action="store_true", help="also time each page in one context with scripts cached"
    )
    args = ap.parse_args()
    pages = {path: PAGES[path] for path in args.pages or PAGES}
    from playwright.sync_api import sync_playwright
    from werkzeug.serving import make_server

    from routescope.dashboard.app import create_app, start_ahead

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    times: dict[str, list[float]] = {}
    warm: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        app = create_app([args.run, args.run_b or args.run])
        start_ahead()  # as `routescope dashboard` (dashboard.app.serve) does
        port = free_port()
        httpd = make_server("127.0.0.1", port, app.server, threaded=True)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{port}"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
            for path, count in pages.items():
                context = browser.new_context(viewport={"width": 1400, "height": 1000})
                page = context.new_page()
                start = time.perf_counter()
                page.goto(base + path)
                page.wait_for_function(HAS_DATA, arg=count, timeout=300_000)
                times.setdefault(path, []).append(time.perf_counter() - start)
                if path == "/compare":
                    page.wait_for_function(HAS_DATA, arg=3, timeout=600_000)
                    times.setdefault("/compare (saturation)", []).append(time.perf_counter() - start)
                context.close()
            if args.warm:
                context = browser.new_context(viewport={"width": 1400, "height": 1000})
                page = context.new_page()
                page.goto(base + "/super-experts")  # untimed: fills the caches with the scripts
                page.wait_for_load_state("networkidle")
                for path, count in pages.items():
                    start = time.perf_counter()
                    page.goto(base + path)
                    page.wait_for_function(HAS_DATA, arg=count, timeout=300_000)
                    warm.setdefault(path, []).append(time.perf_counter() - start)
                context.close()
            browser.close()
        httpd.shutdown()
    load = os.getloadavg()[0]
    print(f"run {args.run}; first view in Chromium, median of {args.rounds}; load average {load:.1f}")
    print(f"{'page':<24}{'cold':>9}" + (f"{'warm':>9}" if warm else ""))
    for path, values in times.items():
        cached = f"{statistics.median(warm[path]):>9.2f}" if path in warm else ""
        print(f"{path:<24}{statistics.median(values):>9.2f}{cached}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where a page's first view goes in headless Chromium: the breakdown behind
`dashboard_browser.py`'s totals (issue 33).

    python benchmarks/dashboard_browser_breakdown.py RUN [--pages /tokens /placement /compare]

For each page, in a fresh browser context (cold cache), it records through the Chrome DevTools
Protocol (Playwright): every script's download (request start to response end) and its
compile + execute time on the main thread (trace events `v8.compile`, `EvaluateScript`),
the first `_dash-layout`, `_dash-dependencies` and `_dash-update-component` requests (start,
end, server time = response start - request start), the moment `window.Plotly` is defined,
and each `Plotly.react`/`newPlot` call's duration (drawing), until the page's figures show
data. Times are milliseconds from navigation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import threading
from collections import Counter
from pathlib import Path

from dashboard_browser import CHROMIUM, HAS_DATA, LAUNCH_ARGS, PAGES, free_port

# installed before any page script: time when Plotly appears, and every draw
HOOKS = """
window.__rs = {marks: [], draws: []};
(() => {
  let P;
  const wrap = (obj, name) => {
    const f = obj[name];
    if (typeof f !== 'function' || f.__rs) return;
    obj[name] = function (...args) {
      const t = performance.now();
      const out = f.apply(this, args);
      const done = () => window.__rs.draws.push([name, t, performance.now()]);
      if (out && out.then) out.then(done, done); else done();
      return out;
    };
    obj[name].__rs = true;
  };
  Object.defineProperty(window, 'Plotly', {
    configurable: true,
    get() { return P; },
    set(v) {
      P = v;
      window.__rs.marks.push(['Plotly defined', performance.now()]);
      if (v) { wrap(v, 'react'); wrap(v, 'newPlot'); }
    },
  });
})();
"""


def short(url: str) -> str:
    name = url.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
    return name or url


def script_costs(trace_path: Path) -> dict[str, float]:
    """Main-thread milliseconds per script URL: compile + evaluate (trace events)."""
    events = json.loads(trace_path.read_text())
    events = events.get("traceEvents", events)
    costs: dict[str, float] = {}
    for ev in events:
        if ev.get("ph") != "X":
            continue
        data = (ev.get("args") or {}).get("data") or {}
        url = data.get("url") or (ev.get("args") or {}).get("fileName") or ""
        if ev.get("name") in ("EvaluateScript", "v8.compile", "v8.produceCache") and url:
            costs[short(url)] = costs.get(short(url), 0.0) + ev.get("dur", 0) / 1000
    return costs


def long_tasks(trace_path: Path, floor_ms: float = 30.0) -> list[tuple[float, float, str]]:
    """(start ms from the first request, duration ms, what ran) of every main-thread task of
    at least `floor_ms`: the renderer's main thread is where scripts, React and plotly run."""
    events = json.loads(trace_path.read_text())
    events = events.get("traceEvents", events)
    evaluated = Counter((e["pid"], e["tid"]) for e in events if e.get("name") == "EvaluateScript")
    main = evaluated.most_common(1)[0][0]
    mine = [e for e in events if (e.get("pid"), e.get("tid")) == main and e.get("ph") == "X"]
    t0 = min(e["ts"] for e in events if e.get("name") == "ResourceSendRequest")
    out = []
    for task in sorted(
        (e for e in mine if e["name"] == "RunTask" and e.get("dur", 0) >= floor_ms * 1000),
        key=lambda e: e["ts"],
    ):
        start, end = task["ts"], task["ts"] + task["dur"]
        parts: Counter = Counter()
        for ev in mine:
            if ev is not task and start <= ev["ts"] and ev["ts"] + ev.get("dur", 0) <= end:
                name = ev["name"]
                if name in ("FunctionCall", "EvaluateScript"):
                    data = (ev.get("args") or {}).get("data") or {}
                    name = f"{name} {short(data.get('url') or '')[:30]}"
                elif name not in ("Layout", "UpdateLayoutTree", "Paint", "ParseHTML", "MinorGC", "MajorGC"):
                    continue
                parts[name] += ev.get("dur", 0) / 1000
        what = ", ".join(f"{k} {v:.0f}" for k, v in parts.most_common(3))
        out.append(((start - t0) / 1000, task["dur"] / 1000, what))
    return out


def profile_page(browser, base: str, path: str, count: int, workdir: Path) -> dict:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.add_init_script(HOOKS)
    page = context.new_page()
    trace = workdir / f"trace{path.replace('/', '_') or '_root'}.json"
    browser.start_tracing(
        page=page,
        path=str(trace),
        categories=["devtools.timeline", "v8", "disabled-by-default-devtools.timeline"],
    )
    page.goto(base + path)
    page.wait_for_function(HAS_DATA, arg=count, timeout=300_000)
    done = page.evaluate("performance.now()")
    rs = page.evaluate("window.__rs")
    resources = page.evaluate(
        "performance.getEntriesByType('resource').map(e => ({name: e.name, start: e.startTime, "
        "reqStart: e.requestStart, respStart: e.responseStart, end: e.responseEnd, size: e.encodedBodySize}))"
    )
    cdp = context.new_cdp_session(page)
    cdp.send("Performance.enable")
    metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
    browser.stop_tracing()
    context.close()
    return {"done": done, "rs": rs, "resources": resources, "metrics": metrics, "trace": trace}


def report(path: str, result: dict) -> None:
    costs = script_costs(result["trace"])
    print(f"\n== {path}: figures with data at {result['done']:.0f} ms")
    print(f"  {'resource':<44}{'start':>7}{'server':>8}{'end':>7}{'KB':>7}{'cpu ms':>8}")
    seen = set()
    for r in sorted(result["resources"], key=lambda r: r["start"]):
        name = short(r["name"])
        cpu = costs.get(name, 0.0) if name not in seen else 0.0
        seen.add(name)
        server = r["respStart"] - r["reqStart"] if r["reqStart"] else 0
        print(
            f"  {name[:44]:<44}{r['start']:>7.0f}{server:>8.0f}{r['end']:>7.0f}{r['size'] / 1024:>7.0f}{cpu:>8.0f}"
        )
    for name, t in result["rs"]["marks"]:
        print(f"  {name:<44}{t:>7.0f}")
    draws = result["rs"]["draws"]
    for name, t0, t1 in draws:
        print(f"  Plotly.{name:<37}{t0:>7.0f}{'':>8}{t1:>7.0f}   ({t1 - t0:.0f} ms)")
    print("  main-thread tasks >= 30 ms (start, ms, what):")
    for start, dur, what in long_tasks(result["trace"]):
        print(f"    {start:7.0f} {dur:6.0f}  {what}")
    m = result["metrics"]
    print(
        f"  CDP metrics: ScriptDuration {m.get('ScriptDuration', 0) * 1000:.0f} ms, TaskDuration "
        f"{m.get('TaskDuration', 0) * 1000:.0f} ms, LayoutDuration {m.get('LayoutDuration', 0) * 1000:.0f} ms, "
        f"JSHeapUsedSize {m.get('JSHeapUsedSize', 0) / 2**20:.0f} MB"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--pages", nargs="+", choices=list(PAGES), default=["/tokens", "/placement", "/compare"])
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright
    from werkzeug.serving import make_server

    from routescope.dashboard.app import create_app

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app = create_app([args.run, args.run])
    port = free_port()
    httpd = make_server("127.0.0.1", port, app.server, threaded=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    print(f"run {args.run}; load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        for path in args.pages:
            report(path, profile_page(browser, base, path, PAGES[path], Path(tmp)))
        browser.close()
    httpd.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

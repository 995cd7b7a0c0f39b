"""Dashboard callbacks at scale: time every page's data callbacks and measure what they send.

Generates (or reuses) a synthetic run in SPEC format with `benchmarks/analysis_scale.py`'s
generator (48 MoE layers, 128 experts, top-8, Zipf-skewed loads, entangled layers; a
small generator of its own when that file is absent), builds the app with the run served
twice (so Compare has two runs), calls each callback function directly as Dash would, and
records the cold time (empty cache), the warm time (cached) and the payload: the length of
the JSON Dash would send for the callback's outputs.

    python benchmarks/dashboard_callbacks.py                      # 10M routing rows
    python benchmarks/dashboard_callbacks.py --rows 1e8           # 100M
    python benchmarks/dashboard_callbacks.py --write-results      # update benchmarks/RESULTS.md
    python benchmarks/dashboard_callbacks.py --run RUN --json out.jsonl --tag after --no-saturation

`--json` appends one line per run ({tag, load average, callback -> [cold, cached, payload]}),
so two checkouts can be timed interleaved on a busy machine (before, after, before, after:
run the other checkout with PYTHONPATH pointing at it) and compared by median.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from plotly.io.json import to_json_plotly

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from routescope import schema  # noqa: E402

SECTION = "## Dashboard callbacks"
PAYLOAD_LIMIT = 2_000_000


# -- data --------------------------------------------------------------------------------
def generate_run(out: Path, rows: int, layers: int, experts: int, k: int, seq_len: int, seed: int) -> None:
    """The analysis benchmark's generator when present, else a plain Zipf-skewed one."""
    try:
        sys.path.insert(0, str(ROOT))
        from analysis_scale import generate  # type: ignore[import-not-found]
    except ImportError:
        generate = None
    if generate is not None:
        generate(out, rows, layers, experts, k, seq_len, zipf=0.8, coupling=2.0, seed=seed)
        return
    simple_generate(out, rows, layers, experts, k, seq_len, seed)


def simple_generate(out: Path, rows: int, layers: int, experts: int, k: int, seq_len: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    tokens = max(1, rows // (layers * k))
    prefs = -0.8 * np.log(np.arange(1, experts + 1))
    ids = np.arange(tokens)
    seq_id, pos = ids // seq_len, (ids % seq_len).astype(np.int32)
    scores = prefs[None, None, :] - np.log(-np.log(rng.random((tokens, layers, experts))))
    chosen = np.argsort(-scores, axis=-1)[..., :k].astype(np.int16)
    weights = rng.random((tokens, layers, k), dtype=np.float32)
    weights = -np.sort(-(weights / weights.sum(-1, keepdims=True)), axis=-1)
    per_token = layers * k
    routing = pa.table(
        {
            "seq_id": pa.array(np.repeat(seq_id, per_token), pa.int64()),
            "pos": pa.array(np.repeat(pos, per_token), pa.int32()),
            "layer": pa.array(np.tile(np.repeat(np.arange(layers, dtype=np.int16), k), tokens), pa.int16()),
            "slot": pa.array(np.tile(np.arange(k, dtype=np.int8), tokens * layers), pa.int8()),
            "expert": pa.array(chosen.reshape(-1), pa.int16()),
            "weight": pa.array(weights.reshape(-1), pa.float32()),
        }
    )
    domains = np.array(["code", "math", "prose", "multilingual"], dtype=object)
    token_table = pa.table(
        {
            "seq_id": pa.array(seq_id, pa.int64()),
            "pos": pa.array(pos, pa.int32()),
            "token_id": pa.array(rng.integers(0, 50_000, tokens), pa.int32()),
            "step": pa.array(seq_id // 8, pa.int32()),
            "phase": pa.array(np.full(tokens, "prefill", dtype=object), pa.string()),
            "domain": pa.array(domains[seq_id % 4], pa.string()),
        }
    )
    for name, table in ((schema.ROUTING, routing), (schema.TOKENS, token_table)):
        path = out / name / "rank=0" / "part-00000.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, compression="zstd")
    manifest = {
        "format_version": schema.FORMAT_VERSION,
        "model_type": "synthetic",
        "num_hidden_layers": layers,
        "moe_layers": list(range(layers)),
        "num_experts": {str(x): experts for x in range(layers)},
        "top_k": {str(x): k for x in range(layers)},
        "labels": ["domain"],
        "tokens": int(tokens),
        "complete": True,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")


# -- measuring ---------------------------------------------------------------------------
def payload_bytes(outputs: Any) -> int:
    """Bytes of the JSON Dash sends for these outputs (figures and components alike)."""
    values = list(outputs) if isinstance(outputs, tuple) else [outputs]
    return len(to_json_plotly(values).encode("utf-8"))


def measure(name: str, call: Callable[[], Any], registry: Any) -> dict[str, Any]:
    registry.clear_cache()
    t0 = time.perf_counter()
    out = call()
    cold = time.perf_counter() - t0
    t1 = time.perf_counter()
    call()
    warm = time.perf_counter() - t1
    errors = [
        o
        for o in (out if isinstance(out, tuple) else (out,))
        if "rs-warning" in str(o) or "rs-error" in str(o)
    ]
    return {
        "callback": name,
        "cold_s": cold,
        "warm_s": warm,
        "payload": payload_bytes(out),
        "problem": bool(errors),
    }


def callbacks(registry: Any) -> list[tuple[str, Callable[[], Any]]]:
    from routescope.dashboard.app import update_run_state
    from routescope.dashboard.pages import (
        compare,
        entanglement,
        load,
        overview,
        specialization,
        super_experts,
        timeline,
        tokens,
    )

    st = {"run": "0", "version": None}
    layer = registry.run("0").moe_layers[len(registry.run("0").moe_layers) // 2]
    steps = registry.query("0", "filter_choices")
    mid = (steps["step_min"] + steps["step_max"]) // 2
    seq = tokens.tokens_controls(st)[1]  # (options, value, layer options, layer, start)
    return [
        ("shell: update_run_state", lambda: update_run_state("0", 0)),
        ("overview: update_overview", lambda: overview.update_overview(st)),
        ("overview: update_overview (EP size 8)", lambda: overview.update_overview(st, "8")),
        ("load: load_controls", lambda: load.load_controls(st)),
        ("load: load_label_values", lambda: load.load_label_values(st, "domain")),
        (
            "load: load_figures (all tokens)",
            lambda: load.load_figures(st, "all", None, None, None, "lift", layer),
        ),
        (
            "load: load_figures (phase+label+steps)",
            lambda: load.load_figures(
                st, "prefill", "domain", "code", [steps["step_min"], mid], "share", layer
            ),
        ),
        (
            "load: update_coactivation (all tokens, own callback)",
            lambda: load.update_coactivation(st, "all", None, None, None, layer),
        ),
        (
            "load: update_coactivation (phase+label+steps, own callback)",
            lambda: load.update_coactivation(
                st, "prefill", "domain", "code", [steps["step_min"], mid], layer
            ),
        ),
        (
            "load: show_expert (click)",
            lambda: load.show_expert(st, {"points": [{"x": 3, "y": f"L{layer}"}]}, "all", None, None, None),
        ),
        ("time: time_controls", lambda: timeline.time_controls(st)),
        (
            "time: update_time (all steps)",
            lambda: timeline.update_time(st, "all", None, None, None, "all", layer, "lift"),
        ),
        (
            "time: update_time (phase+label)",
            lambda: timeline.update_time(st, "prefill", "domain", "code", None, "all", layer, "share"),
        ),
        ("entanglement: controls", lambda: entanglement.entanglement_controls(st)),
        (
            "entanglement: entanglement_figures (MI, pair)",
            lambda: entanglement.entanglement_figures(st, None),
        ),
        (
            "entanglement: update_pathways (top 30, own callback)",
            lambda: entanglement.update_pathways(st, 30),
        ),
        ("specialization: controls", lambda: specialization.specialization_controls(st)),
        (
            "specialization: update_specialization",
            lambda: specialization.update_specialization(st, "domain", layer),
        ),
        (
            "specialization: update_specialization (vs expert share)",
            lambda: specialization.update_specialization(st, "domain", layer, "expert"),
        ),
        ("specialization: update_repetition", lambda: specialization.update_repetition(st)),
        ("super experts: update", lambda: super_experts.update_super_experts(st)),
        ("tokens: controls", lambda: tokens.tokens_controls(st)),
        ("tokens: update_tokens", lambda: tokens.update_tokens(st, seq, 0)),
        ("compare: update_compare (2 runs)", lambda: compare.update_compare(st, "0", "1")),
        ("compare: update_saturation (2 runs)", lambda: compare.update_saturation(st, "0", "1")),
    ]


def run_benchmark(path: Path, saturation: bool = True) -> list[dict[str, Any]]:
    from routescope.dashboard.app import create_app
    from routescope.dashboard.runs import get_registry

    create_app([path, path])
    registry = get_registry()
    registry.run("0"), registry.run("1")  # opening the runs is not a callback's time
    return [
        measure(name, call, registry)
        for name, call in callbacks(registry)
        if saturation or "saturation" not in name
    ]


# -- report ------------------------------------------------------------------------------
def format_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| callback | cold (s) | cached (s) | payload (KB) |",
        "|---|---:|---:|---:|",
    ]
    for r in results:
        flag = " (message)" if r["problem"] else ""
        lines.append(
            f"| {r['callback']}{flag} | {r['cold_s']:.2f} | {r['warm_s']:.3f} | {r['payload'] / 1024:.1f} |"
        )
    return "\n".join(lines)


def write_section(results_md: Path, heading: str, body: str, intro: str = "") -> None:
    """Replace the `### heading` part of this benchmark's section of RESULTS.md.

    Other sections, and other run sizes within this one, stay as they are.
    """
    text = results_md.read_text(encoding="utf-8") if results_md.exists() else "# Benchmark results\n"
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{intro.strip()}\n"
        start = text.find(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    end = len(text) if end < 0 else end + 1
    section = text[start:end].rstrip("\n") + "\n"
    sub = f"### {heading}\n\n{body.strip()}\n"
    at = section.find(f"### {heading}\n")
    if at < 0:
        section = section + "\n" + sub
    else:
        after = section.find("\n### ", at + 1)
        section = section[:at] + sub + ("" if after < 0 else section[after:])
    text = text[:start] + section + ("\n" + text[end:] if end < len(text) else "")
    results_md.write_text(text, encoding="utf-8")


INTRO = (
    "`python benchmarks/dashboard_callbacks.py [--rows N | --run RUN] --write-results`: every page's data "
    "callbacks called directly as Dash calls them, on a generated run (48 MoE layers, 128 experts, top-8, "
    "Zipf-skewed loads; `benchmarks/analysis_scale.py`'s generator). Cold = first call with an empty "
    "dashboard cache (so a click re-computes the load it shares with the page); cached = the same call "
    "again (what moving between pages and filters costs once computed; it is the figure building). "
    "Payload = bytes of the JSON Dash sends for the callback's outputs; every payload is bounded by the "
    "model's shape and the dashboard's caps, not by the number of rows."
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=float, default=10e6, help="routing rows (default 1e7)")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=ROOT / "data", help="folder for generated runs")
    ap.add_argument("--run", type=Path, help="use this run instead of generating one")
    ap.add_argument("--regenerate", action="store_true")
    ap.add_argument("--write-results", action="store_true", help=f"write the table under '{SECTION}'")
    ap.add_argument("--json", type=Path, help="append this run's figures as one JSON line")
    ap.add_argument("--tag", default="", help="name of this checkout in the JSON line")
    ap.add_argument("--no-saturation", action="store_true", help="leave out Compare's router saturation")
    args = ap.parse_args(argv)

    rows = int(args.rows)
    path = args.run or args.data / f"dashboard_{rows}_{args.layers}x{args.experts}k{args.top_k}"
    if args.run is None and (args.regenerate or not (path / "manifest.json").exists()):
        t0 = time.perf_counter()
        generate_run(path, rows, args.layers, args.experts, args.top_k, args.seq_len, args.seed)
        print(f"generated {path} in {time.perf_counter() - t0:.1f} s")
    manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    routing_rows = sum(
        pq.read_metadata(p).num_rows for p in sorted((path / "routing").glob("rank=*/*.parquet"))
    )
    results = run_benchmark(path, saturation=not args.no_saturation)
    if args.json:
        line = {
            "tag": args.tag,
            "load": os.getloadavg()[0],
            "res": {r["callback"]: [r["cold_s"], r["warm_s"], r["payload"], r["problem"]] for r in results},
        }
        with args.json.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
    table = format_table(results)
    worst = max(results, key=lambda r: r["payload"])
    shape = (
        f"{routing_rows:,} routing rows ({manifest['tokens']:,} tokens, {len(manifest['moe_layers'])} MoE layers, "
        f"{next(iter(manifest['num_experts'].values()))} experts, top-{next(iter(manifest['top_k'].values()))})"
    )
    summary = (
        f"Run: {shape}. Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; load average {os.getloadavg()[0]:.1f} at the end (other work shares "
        f"the cores). Largest payload: {worst['callback']} {worst['payload'] / 1024:.0f} KB "
        f"(limit {PAYLOAD_LIMIT / 1e6:.0f} MB)."
    )
    print(summary)
    print(table)
    if args.write_results:
        write_section(
            ROOT / "RESULTS.md", f"{routing_rows / 1e6:.0f}M routing rows", f"{summary}\n\n{table}", INTRO
        )
    return 0 if worst["payload"] <= PAYLOAD_LIMIT else 1


if __name__ == "__main__":
    raise SystemExit(main())

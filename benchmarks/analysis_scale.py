"""Analysis at scale: the metric suite through the Run API (DuckDB) against plain pandas.

Generates a run shaped like a large MoE model (48 MoE layers, 128 experts, top-8,
Zipf-skewed expert loads, each layer's top-1 expert nudged by the previous layer's: some
entanglement) with NumPy + pyarrow in chunks, written like the recorder writes it
(token-major rows, zstd, ~4M rows per part), into benchmarks/data/ (gitignored). Then it
times load + balance + dead/hot + entanglement via `rs.open_run` and the same metrics in
pandas, checks that both agree, and prints a table.

    python benchmarks/analysis_scale.py                 # 100M routing rows
    python benchmarks/analysis_scale.py --rows 5e6      # smaller
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

import routescope as rs  # noqa: E402
from routescope import schema  # noqa: E402

DOMAINS = ("code", "math", "prose", "multilingual")


# -- data ------------------------------------------------------------------------------
def layer_logits(rng: np.random.Generator, layers: int, experts: int, zipf: float) -> np.ndarray:
    """Per layer, Zipf-skewed expert preferences in a layer-specific random order."""
    base = -zipf * np.log(np.arange(1, experts + 1, dtype=np.float32))
    return np.stack([base[rng.permutation(experts)] for _ in range(layers)]).astype(np.float32)


def generate(
    out: Path,
    rows: int,
    layers: int,
    experts: int,
    k: int,
    seq_len: int,
    zipf: float,
    coupling: float,
    seed: int,
) -> dict[str, Any]:
    """Write the synthetic run; returns its shape. Rows are (seq_id, pos, layer, slot)-ordered."""
    tokens_total = max(1, rows // (layers * k))
    rng = np.random.default_rng(seed)
    logits = layer_logits(rng, layers, experts, zipf)
    # entanglement: the top-1 expert a at layer l adds `coupling` to expert follow[l, a] at l + 1
    follow = np.stack([rng.permutation(experts) for _ in range(layers)])
    chunk = max(1, min(8192, tokens_total))
    rows_per_part = 4_000_000
    tokens_per_part = max(chunk, (rows_per_part // (layers * k)) // chunk * chunk)
    if out.exists():
        shutil.rmtree(out)
    buffers: dict[str, list[pa.Table]] = {schema.TOKENS: [], schema.ROUTING: []}
    part = 0
    buffered = 0

    def flush() -> None:
        nonlocal part, buffered
        for table, parts in buffers.items():
            if not parts:
                continue
            path = out / table / "rank=0" / f"part-{part:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            whole = pa.concat_tables(parts)
            split = [c for c in ("weight",) if c in whole.column_names]
            pq.write_table(
                whole,
                path,
                compression="zstd",
                use_dictionary=[c for c in whole.column_names if c not in split],
                use_byte_stream_split=split or False,
            )
            parts.clear()
        part += 1
        buffered = 0

    layer_ids = np.arange(layers, dtype=np.int16)
    for start in range(0, tokens_total, chunk):
        n = min(chunk, tokens_total - start)
        ids = np.arange(start, start + n)
        seq_id, pos = ids // seq_len, (ids % seq_len).astype(np.int32)
        chosen = np.empty((n, layers, k), dtype=np.int16)
        prev = None
        for layer in range(layers):
            scores = np.broadcast_to(logits[layer], (n, experts)).copy()
            if prev is not None:
                scores[np.arange(n), follow[layer - 1][prev]] += coupling
            u = rng.random((n, experts), dtype=np.float32)
            scores -= np.log(-np.log(np.clip(u, 1e-12, 1 - 1e-7)))
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
            top = np.take_along_axis(top, order, axis=1)
            chosen[:, layer] = top
            prev = top[:, 0]
        w = rng.random((n, layers, k), dtype=np.float32)
        w = -np.sort(-(w / w.sum(-1, keepdims=True)), axis=-1)
        per_token = layers * k
        buffers[schema.ROUTING].append(
            pa.table(
                {
                    "seq_id": pa.array(np.repeat(seq_id, per_token), pa.int64()),
                    "pos": pa.array(np.repeat(pos, per_token), pa.int32()),
                    "layer": pa.array(np.tile(np.repeat(layer_ids, k), n), pa.int16()),
                    "slot": pa.array(np.tile(np.arange(k, dtype=np.int8), n * layers), pa.int8()),
                    "expert": pa.array(chosen.reshape(-1), pa.int16()),
                    "weight": pa.array(w.reshape(-1), pa.float32()),
                }
            )
        )
        vocab = np.minimum(rng.zipf(1.2, n), 50_000).astype(np.int32)
        buffers[schema.TOKENS].append(
            pa.table(
                {
                    "seq_id": pa.array(seq_id, pa.int64()),
                    "pos": pa.array(pos, pa.int32()),
                    "token_id": pa.array(vocab, pa.int32()),
                    "step": pa.array(seq_id // 8, pa.int32()),
                    "phase": pa.array(np.full(n, "prefill", dtype=object), pa.string()),
                    "domain": pa.array(np.asarray(DOMAINS, dtype=object)[seq_id % len(DOMAINS)], pa.string()),
                }
            )
        )
        buffered += n
        if buffered >= tokens_per_part:
            flush()
    flush()
    moe = list(range(layers))
    manifest = {
        "format_version": schema.FORMAT_VERSION,
        "model_type": "synthetic-large",
        "num_hidden_layers": layers,
        "moe_layers": moe,
        "num_experts": {str(x): experts for x in moe},
        "top_k": {str(x): k for x in moe},
        "labels": ["domain"],
        "tokens": int(tokens_total),
        "complete": True,
        "benchmark": {"rows": tokens_total * layers * k, "zipf": zipf, "coupling": coupling, "seed": seed},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest


def disk_bytes(path: Path, table: str) -> int:
    return sum(p.stat().st_size for p in (path / table).glob("rank=*/*.parquet"))


# -- the suite through the Run API -----------------------------------------------------
def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def load_average() -> str:
    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def duckdb_suite(path: Path) -> tuple[dict[str, float], dict[str, pd.DataFrame]]:
    times: dict[str, float] = {}
    out: dict[str, pd.DataFrame] = {}
    times["open_run"], run = timed(lambda: rs.open_run(path))
    steps: dict[str, Callable[[], pd.DataFrame]] = {
        "expert_load": run.expert_load,
        "balance": run.balance,
        "dead_experts": run.dead_experts,
        "hot_experts": run.hot_experts,
        "entanglement": run.entanglement,
    }
    for name, fn in steps.items():
        times[name], out[name] = timed(fn)
    extra = {"balance(where=domain)": lambda: run.balance(where="domain = 'code'")}
    for name, fn in extra.items():
        EXTRA_TIMES.setdefault(name, []).append(timed(fn)[0])
    run.close()
    return times, out


EXTRA_TIMES: dict[str, list[float]] = {}


def spark_suite(path: Path, master: str) -> tuple[dict[str, float], dict[str, pd.DataFrame]]:
    """The same suite through `rs.open_run(path, engine="spark")` on a local Spark session
    (`master`, e.g. local[2]); the session's start is not counted, the first query is."""
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master(master)
        .appName("routescope-benchmark")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.memory", "6g")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    times: dict[str, float] = {}
    out: dict[str, pd.DataFrame] = {}
    times["open_run"], run = timed(lambda: rs.open_run(path, engine="spark", spark=spark))
    for name in ("expert_load", "balance", "dead_experts", "hot_experts", "entanglement"):
        times[name], out[name] = timed(getattr(run, name))
    run.close()
    return times, out


def spark_vs_duckdb(path: Path, rows: int, master: str, duck: dict[str, float], out: dict[str, Any]) -> None:
    """Print the Spark suite beside DuckDB's best pass, with rows per second per core."""
    cores = int(master.split("[")[1].rstrip("]")) if "[" in master and "*" not in master else os.cpu_count()
    cpu0 = time.process_time()
    times, spark_out = spark_suite(path, master)
    print(
        f"  spark ({master}): {sum(times.values()):.2f} s wall ({time.process_time() - cpu0:.2f} s CPU in Python)"
    )
    for name, df in out.items():
        pd.testing.assert_frame_equal(
            df.reset_index(drop=True), spark_out[name].reset_index(drop=True), check_dtype=False, rtol=1e-9
        )
    print("  spark results equal duckdb's")
    print(f"\n{'step':<16}{'duckdb best':>14}{'spark ' + master:>18}")
    for name in times:
        print(f"{name:<16}{duck[name]:>14.2f}{times[name]:>18.2f}")
    for label, total in (("duckdb", sum(duck.values())), ("spark", sum(times.values()))):
        print(
            f"{label}: total {total:.2f} s, {rows / total / 1e6:.1f} M rows/s, "
            f"{rows / total / cores / 1e6:.2f} M rows/s per core ({cores} cores)"
        )


# -- the same metrics in pandas --------------------------------------------------------
def pandas_suite(
    path: Path, mode: str, experts: int, k: int, seed: int
) -> tuple[dict[str, float], dict[str, Any]]:
    """Straightforward pandas: read the columns it needs, group, merge; `mode` 'full' or 'layer'."""
    times: dict[str, float] = {}
    files = sorted((path / schema.ROUTING).glob("rank=*/*.parquet"))

    def read(columns: list[str], filters: Any = None) -> pd.DataFrame:
        return pq.ParquetDataset(files, filters=filters).read(columns=columns).to_pandas()

    t0 = time.perf_counter()
    if mode == "full":
        df = read(["seq_id", "pos", "layer", "slot", "expert"])
        times["read"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        counts = df.groupby(["layer", "expert"]).size()
    else:
        counts_parts = []
        layers = pq.ParquetDataset(files).read(columns=["layer"]).column("layer").unique().to_pylist()
        for layer in sorted(layers):
            part = read(["expert"], filters=[("layer", "=", layer)])
            counts_parts.append(part.groupby("expert").size().rename(layer))
        times["read"] = 0.0  # the per-layer reads count in expert_load
        t1 = t0
        counts = pd.concat(counts_parts, names=["layer"]).rename_axis(["layer", "expert"])
    layers = sorted(counts.index.get_level_values(0).unique())
    grid = pd.MultiIndex.from_product([layers, range(experts)], names=["layer", "expert"])
    load = counts.reindex(grid, fill_value=0).rename("tokens").reset_index()
    load["share"] = load["tokens"] / load.groupby("layer")["tokens"].transform("sum")
    times["expert_load"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    g = load.groupby("layer")["tokens"]
    mean = g.sum() / experts
    bal = pd.DataFrame(
        {
            "cv": g.std(ddof=0) / mean,
            "max_violation": (g.max() - mean) / mean,
            "balancedness": mean / g.max(),
            "norm_entropy": load.assign(
                h=-load["share"] * np.log(load["share"].where(load["share"] > 0, 1.0))
            )
            .groupby("layer")["h"]
            .sum()
            / np.log(experts),
        }
    ).reset_index()
    times["balance"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    dead = load[load["share"] <= 0.0]
    times["dead_experts"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    hot = load[load["share"] >= 2.0 / experts]
    times["hot_experts"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    if mode == "full":
        top1 = df.loc[df["slot"] == 0, ["seq_id", "pos", "layer", "expert"]]
        del df
    else:
        top1 = read(["seq_id", "pos", "layer", "expert"], filters=[("slot", "=", 0)])
    nxt = dict(itertools.pairwise(layers))
    b_side = top1.assign(layer=top1["layer"].map({b: a for a, b in nxt.items()})).dropna(subset=["layer"])
    b_side = b_side.astype({"layer": top1["layer"].dtype})
    pairs = top1.merge(b_side, on=["seq_id", "pos", "layer"], suffixes=("_a", "_b"))
    ent_rows = []
    for layer, grp in pairs.groupby("layer"):
        a, b = grp["expert_a"].to_numpy(), grp["expert_b"].to_numpy()
        rng = np.random.default_rng([seed, int(layer), int(nxt[layer])])
        mi = _mi(a, b, experts)
        base = _mi(np.sort(a), b[np.argsort(a, kind="stable")][rng.permutation(len(b))], experts)
        ent_rows.append(
            {"layer": layer, "next_layer": nxt[layer], "mutual_info_bits": mi[0], "baseline": base[0]}
        )
    ent = pd.DataFrame(ent_rows)
    times["entanglement"] = time.perf_counter() - t1
    return times, {"expert_load": load, "balance": bal, "dead": dead, "hot": hot, "entanglement": ent}


def _mi(a: np.ndarray, b: np.ndarray, experts: int) -> tuple[float, float]:
    joint = np.bincount(a.astype(np.int64) * experts + b, minlength=experts * experts).reshape(
        experts, experts
    )
    p = joint / joint.sum()
    pa_, pb = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    mi = float((p[nz] * np.log2(p[nz] / (pa_ @ pb)[nz])).sum())
    hb = float(-(pb[pb > 0] * np.log2(pb[pb > 0])).sum())
    return mi, hb


# -- main ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=float, default=100e6, help="routing rows (default 1e8)")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--zipf", type=float, default=0.8, help="exponent of the expert preference skew")
    ap.add_argument("--coupling", type=float, default=2.0, help="logit bonus tying layer l+1 to l's top-1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=ROOT / "data", help="folder for generated runs")
    ap.add_argument("--regenerate", action="store_true", help="write the data even if it exists")
    ap.add_argument("--repeat", type=int, default=3, help="DuckDB suite repetitions (best is reported)")
    ap.add_argument("--pandas", choices=("full", "layer", "skip"), default="full")
    ap.add_argument(
        "--spark",
        metavar="MASTER",
        help="also run the suite on Spark, e.g. local[2] (pip install -e '.[spark]')",
    )
    args = ap.parse_args(argv)

    rows = int(args.rows)
    path = args.data / f"analysis_{rows}_{args.layers}x{args.experts}k{args.top_k}"
    manifest_path = path / "manifest.json"
    if args.regenerate or not manifest_path.exists():
        print(f"generating {rows:,} routing rows into {path} ...", flush=True)
        t_gen, manifest = timed(
            lambda: generate(
                path,
                rows,
                args.layers,
                args.experts,
                args.top_k,
                args.seq_len,
                args.zipf,
                args.coupling,
                args.seed,
            )
        )
        print(f"  generated in {t_gen:.1f} s", flush=True)
    else:
        manifest = json.loads(manifest_path.read_text())
    real_rows = manifest["tokens"] * args.layers * args.top_k
    size = disk_bytes(path, schema.ROUTING)
    print(
        f"run: {real_rows:,} routing rows, {manifest['tokens']:,} tokens, {args.layers} layers × "
        f"{args.experts} experts, top-{args.top_k}; routing on disk {size / 1e6:.0f} MB "
        f"({size / real_rows:.2f} B/row); cores {os.cpu_count()}",
        flush=True,
    )
    runs = []
    print(f"load average before: {load_average()}", flush=True)
    for i in range(args.repeat):
        cpu0 = time.process_time()
        times, out = duckdb_suite(path)
        runs.append(times)
        print(
            f"  duckdb pass {i + 1}: total {sum(times.values()):.2f} s wall, "
            f"{time.process_time() - cpu0:.2f} s CPU (incl. the extra filtered query)",
            flush=True,
        )
    best = min(runs, key=lambda t: sum(t.values()))
    first = runs[0]

    pd_times: dict[str, float] = {}
    if args.pandas != "skip":
        gc.collect()
        try:
            cpu0 = time.process_time()
            pd_times, pd_out = pandas_suite(path, args.pandas, args.experts, args.top_k, args.seed)
            print(
                f"  pandas: {sum(pd_times.values()):.2f} s wall, {time.process_time() - cpu0:.2f} s CPU",
                flush=True,
            )
            check_agreement(out, pd_out)
        except MemoryError:
            print("  pandas ran out of memory; rerun with --pandas layer", flush=True)

    names = ["open_run", "expert_load", "balance", "dead_experts", "hot_experts", "entanglement"]
    print()
    print(f"{'step':<16}{'duckdb first':>14}{'duckdb best':>14}{'pandas':>12}")
    for name in names:
        pdv = pd_times.get(name if name != "open_run" else "read")
        pds = f"{pdv:>12.2f}" if pdv is not None else f"{'-':>12}"
        print(f"{name:<16}{first[name]:>14.2f}{best[name]:>14.2f}{pds}")
    total_pd = sum(pd_times.values()) if pd_times else float("nan")
    print(f"{'total':<16}{sum(first.values()):>14.2f}{sum(best.values()):>14.2f}{total_pd:>12.2f}")
    for name, values in EXTRA_TIMES.items():
        print(f"{name:<16}{values[0]:>14.2f}{min(values):>14.2f}{'-':>12}  (not in the total)")
    print(f"load average after: {load_average()}")
    if args.spark:
        spark_vs_duckdb(path, real_rows, args.spark, best, out)
        print(f"load average after spark: {load_average()}")
    return 0


def check_agreement(duck: dict[str, pd.DataFrame], pdo: dict[str, Any]) -> None:
    """The two implementations must give the same numbers, or the timing comparison means nothing."""
    load = duck["expert_load"]
    assert np.array_equal(load["tokens"].to_numpy(), pdo["expert_load"]["tokens"].to_numpy()), "load differs"
    bal = duck["balance"].set_index("layer")
    ref = pdo["balance"].set_index("layer")
    for col in ("cv", "max_violation", "balancedness", "norm_entropy"):
        assert np.allclose(bal[col].to_numpy(), ref[col].to_numpy()), f"balance {col} differs"
    assert len(duck["dead_experts"]) == len(pdo["dead"]) and len(duck["hot_experts"]) == len(pdo["hot"])
    ent = duck["entanglement"].set_index("layer")
    ref = pdo["entanglement"].set_index("layer")
    assert np.allclose(ent["mutual_info_bits"].to_numpy(), ref["mutual_info_bits"].to_numpy()), "MI differs"
    print("  duckdb and pandas agree on load, balance, dead/hot and MI", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())

"""Long runs: host memory of a recording process stays flat while parts roll over.

Records `--forwards` forwards (default 500) of a tiny Mixtral with a small `rows_per_part`,
so the writer writes a new part every few forwards, and samples the process's current RSS
(psutil, else /proc/self/status VmRSS) and peak RSS (getrusage) every `--every` forwards.
An optional Prometheus exporter observer (`--exporter`) is included in the measured path.

    python benchmarks/long_run_memory.py [--forwards 500 --every 50 --batch 8 --seq 64]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import routescope as rs
from tests.tiny_models import build_tiny_model


def current_rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forwards", type=int, default=500)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rows-per-part", type=int, default=20_000)
    parser.add_argument("--exporter", action="store_true", help="also feed a RoutingExporter (no server)")
    parser.add_argument("--json", help="write the samples here")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_tiny_model("mixtral", num_hidden_layers=4, num_local_experts=8)
    ids = torch.randint(1, 128, (args.batch, args.seq))
    mask = torch.ones_like(ids)
    out = Path(tempfile.mkdtemp(prefix="rs-long-")) / "run"
    observers = []
    if args.exporter:
        from routescope.export.prometheus import RoutingExporter

        observers.append(RoutingExporter(port=0, start=False, window=100))

    samples = []
    start = time.perf_counter()
    with rs.record(model, out, rows_per_part=args.rows_per_part, observers=observers) as rec, torch.no_grad():
        for i in range(1, args.forwards + 1):
            model(input_ids=ids, attention_mask=mask)
            if i % args.every == 0:
                gc.collect()
                parts = len(list((out / "routing").glob("rank=*/part-*.parquet")))
                samples.append(
                    {
                        "forward": i,
                        "rss_mb": round(current_rss_mb(), 1),
                        "peak_rss_mb": round(peak_rss_mb(), 1),
                        "routing_parts": parts,
                        "tokens_on_disk": rec.tokens,
                    }
                )
                print(json.dumps(samples[-1]), flush=True)
    elapsed = time.perf_counter() - start

    with rs.open_run(out) as run:
        tokens = run.manifest["tokens"]
        rows = int(run.sql("SELECT count(*) AS n FROM routing")["n"][0])
    assert tokens == args.forwards * args.batch * args.seq, tokens
    first, last = samples[0], samples[-1]
    later = [s["rss_mb"] for s in samples[1:]] or [first["rss_mb"]]
    summary = {
        "forwards": args.forwards,
        "tokens": tokens,
        "routing_rows": rows,
        "routing_parts": last["routing_parts"],
        "seconds": round(elapsed, 1),
        "rss_first_sample_mb": first["rss_mb"],
        "rss_last_sample_mb": last["rss_mb"],
        "rss_growth_after_first_sample_mb": round(last["rss_mb"] - first["rss_mb"], 1),
        "rss_range_after_first_sample_mb": round(max(later) - min(later), 1),
        "peak_rss_mb": last["peak_rss_mb"],
        "exporter": args.exporter,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"samples": samples, "summary": summary}, indent=2))
    shutil.rmtree(out.parent, ignore_errors=True)


if __name__ == "__main__":
    main()

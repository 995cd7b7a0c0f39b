"""`rs.compare(a, b)` at scale, and router saturation by NumPy cells against the SQL join it replaced.

Cold `rs.compare(RUN, RUN)` in a fresh interpreter (as `routescope compare` runs it), then in
one process the best of 3 `compare.router_saturation(a, b)` against one call of the SQL join of commit
ba29280 (read with `git show`) on the same connection; the two must agree to 1e-12. Usage:

    python benchmarks/analysis_scale.py --rows 1e8 --pandas skip --repeat 1   # writes the run
    python benchmarks/compare_scale.py benchmarks/data/analysis_100000000_48x128k8

Results go in benchmarks/RESULTS.md ("Specialization and compare at 100M rows").
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import routescope as rs  # noqa: E402
from routescope.analysis import compare, metrics, sqlfiles  # noqa: E402
from routescope.analysis.content import match_by_content  # noqa: E402
from routescope.analysis.sqlfiles import Cte, compose, get_query  # noqa: E402
from routescope.store.layout import list_parts  # noqa: E402

OLD_COMMIT = "ba29280"  # the last commit with the SQL join (`router_saturation` in compare.sql)
REPEAT = 3


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def best(fn, repeat: int = REPEAT) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def cold_compare(path: str) -> float:
    code = (
        "import sys, time; t = time.perf_counter(); import routescope as rs; "
        f"rs.compare({path!r}, {path!r}); print(time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return float(out.stdout.strip().splitlines()[-1])


def old_saturation(a, b):
    text = subprocess.run(
        ["git", "show", f"{OLD_COMMIT}:routescope/analysis/queries/compare.sql"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    old = sqlfiles.parse_queries(text, Path("compare.sql"))["router_saturation"]
    ctes = [
        Cte("layer_info", get_query("layer_info").sql),
        Cte("selected_tokens", get_query("all_tokens").sql, materialized=False),
        Cte("selected_routing", get_query("all_routing").sql, materialized=False),
    ]
    pairs, _ = match_by_content(compare.content_tokens(a, None), compare.content_tokens(b, None))
    params = {**metrics.layer_params(a), "b_routing": [str(p) for p in list_parts(b.path, "routing")]}
    a.con.register("content_pairs", pa.table(pairs))
    try:
        return a.con.execute(compose(old.sql, ctes), params).df()
    finally:
        a.con.unregister("content_pairs")


def main(path: str) -> None:
    rows = int(rs.open_run(path).sql("SELECT count(*) AS n FROM routing").n[0])
    print(f"{path}: {rows:,} routing rows; load {load()}")
    for i in range(2):
        print(f"cold rs.compare(run, run), fresh process #{i + 1}: {cold_compare(path):.1f} s; load {load()}")
    a, b = rs.open_run(path), rs.open_run(path)
    t_new, (new_df, _) = best(lambda: compare.router_saturation(a, b))
    print(f"router_saturation, NumPy cells: {t_new:.1f} s (best of {REPEAT}); load {load()}")
    t_old, old_df = best(lambda: old_saturation(a, b), repeat=1)  # ~20 s a call: once
    print(f"router_saturation, SQL join of {OLD_COMMIT}: {t_old:.1f} s (one call); load {load()}")
    np.testing.assert_allclose(new_df["saturation"], old_df["saturation"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(new_df["top1_agreement"], old_df["top1_agreement"], rtol=0, atol=1e-12)
    assert (new_df["tokens_matched"].to_numpy() == old_df["tokens_matched"].to_numpy()).all()
    print(
        f"equal: saturation mean {new_df['saturation'].mean():.4f}, top1 {new_df['top1_agreement'].mean():.4f}"
    )


if __name__ == "__main__":
    main(sys.argv[1])

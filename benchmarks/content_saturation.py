"""Router saturation by content (issue 14) against the old (seq_id, pos, token_id) join.

Times `routescope.analysis.compare.router_saturation(a, a)` and the old SQL of commit 4687b02
(read with `git show`) on one run compared with itself, each the best of 3 calls in one process, plus
`content_keys` on 5M tokens sorted and shuffled. Usage:

    python benchmarks/content_saturation.py benchmarks/data/analysis_100000000_48x128k8

Results go in benchmarks/RESULTS.md ("Specialization and compare at 100M rows").
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import routescope as rs
from routescope.analysis import compare, metrics, sqlfiles
from routescope.analysis.content import content_keys
from routescope.analysis.sqlfiles import Cte, compose, get_query
from routescope.store.layout import list_parts

OLD_COMMIT = "4687b02"
REPEAT = 3


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def best(fn, repeat: int = REPEAT) -> tuple[float, object]:
    """Fastest of `repeat` calls (the machine is shared: the minimum is the least disturbed)."""
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main(path: str) -> None:
    a, b = rs.open_run(path), rs.open_run(path)
    print(f"load {load()}")
    t_new, (df, _) = best(lambda: compare.router_saturation(a, b))
    print(f"content router_saturation: {t_new:.1f} s (best of {REPEAT}; mean {df['saturation'].mean():.3f})")
    text = subprocess.run(
        ["git", "show", f"{OLD_COMMIT}:routescope/analysis/queries/compare.sql"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    old = sqlfiles.parse_queries(text, Path("compare.sql"))["router_saturation"]
    ctes = [
        Cte("layer_info", get_query("layer_info").sql),
        Cte("selected_tokens", get_query("all_tokens").sql, materialized=False),
        Cte("selected_routing", get_query("all_routing").sql, materialized=False),
    ]
    files = {t: [str(p) for p in list_parts(b.path, t)] for t in ("tokens", "routing")}
    params = {**metrics.layer_params(a), "b_tokens": files["tokens"], "b_routing": files["routing"]}
    t_old, old_df = best(lambda: a.con.execute(compose(old.sql, ctes), params).df())
    print(f"old router_saturation: {t_old:.1f} s (best of {REPEAT}; mean {old_df['saturation'].mean():.3f})")
    rng = np.random.default_rng(0)
    n = 5_000_000
    seq, pos = np.arange(n) // 512, np.arange(n) % 512
    tok = rng.integers(0, 50_000, n)
    perm = rng.permutation(n)
    sorted_s, _ = best(lambda: content_keys(seq, pos, tok))
    shuffled_s, _ = best(lambda: content_keys(seq[perm], pos[perm], tok[perm]))
    print(f"content_keys 5M tokens: sorted {sorted_s:.2f} s, shuffled {shuffled_s:.2f} s (best of {REPEAT})")
    print(f"load {load()}")


if __name__ == "__main__":
    main(sys.argv[1])

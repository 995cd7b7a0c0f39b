"""What `run.doctor()` adds to a report: its time beside the metrics `routescope report` computed
before it (balance, dead and hot experts), side by side in one process on the same run.

The run is the dashboard benchmark's synthetic one (48 MoE layers, 128 experts, top-8,
Zipf-skewed loads, entangled layers, a forward step per 8 sequences;
`dashboard_callbacks.generate_run`), so the drift checks have steps to compare. Each repeat opens the run afresh (cold: no cached
counts), runs the baseline and the doctor in alternating order, and the medians are reported
with their ratio. The doctor's findings are counted too (a skewed run has many).

    python benchmarks/doctor_cost.py                  # 1e7 routing rows
    python benchmarks/doctor_cost.py --rows 1e8 --write-results
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from dashboard_callbacks import generate_run  # noqa: E402

import routescope as rs  # noqa: E402

SECTION = "## Doctor"


def write_results(results_md: Path, heading: str, body: str) -> None:
    """Replace this benchmark's `### heading` under `## Doctor` in RESULTS.md (added at the end)."""
    text = results_md.read_text(encoding="utf-8")
    start = text.find(SECTION)
    if start < 0:
        text = (
            text.rstrip("\n")
            + f"\n\n{SECTION}\n\n`python benchmarks/doctor_cost.py --rows N --write-results`\n"
        )
        start = text.find(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    end = len(text) if end < 0 else end + 1
    section = text[start:end].rstrip("\n") + "\n"
    sub = f"### {heading}\n\n{body.strip()}\n"
    at = section.find(f"### {heading}\n")
    if at < 0:
        section += "\n" + sub
    else:
        after = section.find("\n### ", at + 1)
        section = section[:at] + sub + ("" if after < 0 else section[after:])
    results_md.write_text(
        text[:start] + section + ("\n" + text[end:] if end < len(text) else ""), encoding="utf-8"
    )


def baseline(run: rs.Run) -> None:
    run.balance()
    run.dead_experts()
    run.hot_experts()


def doctor(run: rs.Run) -> int:
    findings = run.doctor()
    return int((findings["severity"] != "ok").sum())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=float, default=1e7)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/routescope_doctor_bench"))
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args(argv)
    rows = int(args.rows)
    run_dir = args.dir / f"rows_{rows}"
    if not (run_dir / "manifest.json").exists():
        generate_run(run_dir, rows, layers=48, experts=128, k=8, seq_len=512, seed=0)
    times: dict[str, list[float]] = {"balance + dead + hot": [], "doctor": []}
    found = 0
    for i in range(args.repeats):
        order = ["balance + dead + hot", "doctor"] if i % 2 == 0 else ["doctor", "balance + dead + hot"]
        for name in order:
            with rs.open_run(run_dir) as run:
                start = time.perf_counter()
                if name == "doctor":
                    found = doctor(run)
                else:
                    baseline(run)
                times[name].append(time.perf_counter() - start)
    base, doc = (statistics.median(times[n]) for n in times)
    lines = [
        f"{rows:,} routing rows (48 MoE layers x 128 experts, top-8, Zipf-skewed), "
        f"{args.repeats} cold repeats, medians; {os.cpu_count()} CPUs, {platform.machine()}, "
        f"python {platform.python_version()}:",
        "",
        "| what | seconds |",
        "|---|---|",
        f"| balance + dead_experts + hot_experts (the report's metrics before the doctor) | {base:.2f} |",
        f"| run.doctor() (every check; {found} findings above ok) | {doc:.2f} |",
        f"| ratio doctor / baseline | {doc / base:.2f} |",
    ]
    body = "\n".join(lines)
    print(body)
    if args.write_results:
        write_results(ROOT / "RESULTS.md", f"{rows:,} routing rows", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

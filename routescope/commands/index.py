"""`routescope index RUN`: build the rollup tables (SPEC 3.3) of a run that lacks them.

Recorded runs get their rollups from the writer; imported and older runs get them here, one
routing part at a time, with a progress bar (analysis/rollups.py `build_rollups`). Only the
missing or out-of-date rollup parts are written (`--force`: all of them). Exit 0 on success,
2 on bad input (no such run, a run on object storage).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run directory")
    parser.add_argument(
        "--force", action="store_true", help="rebuild every rollup part, not only missing ones"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def index_command(args: argparse.Namespace) -> int:
    """Build the rollup tables of a run (imported or older runs lack them)."""
    from tqdm.auto import tqdm

    import routescope as rs
    from routescope.analysis.rollups import build_rollups
    from routescope.store.remote import is_remote

    if is_remote(args.run):
        raise ValueError(f"routescope index builds rollups of a local run; {args.run} is on object storage")
    run = rs.open_run(args.run)
    if run.manifest.get("counts_only"):
        raise ValueError(f"{args.run} holds expert counts only: it has no routing to roll up")

    def progress(items: Any, total: int, desc: str) -> Any:
        return tqdm(items, total=total, desc=desc, unit="part", disable=args.quiet, file=sys.stderr)

    written = build_rollups(run, force=args.force, progress=progress)
    done = ", ".join(f"{table}: {n} part(s)" for table, n in written.items())
    print(
        f"{args.run}: rollups written ({done})"
        if any(written.values())
        else f"{args.run}: rollups up to date"
    )
    return 0


__all__ = ["add_index_arguments", "index_command"]

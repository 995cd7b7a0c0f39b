"""`routescope index RUN`: build the rollup tables (SPEC 3.3) of a run that lacks them.

Recorded runs get their rollups from the writer; imported and older runs get them here, with a
progress bar (analysis/rollup_build.py `build_rollups`), on the local disk or on object storage
(RUN may be s3://..., gs://...). Only the missing or out-of-date rollup parts are written
(`--force`: all of them). `--engine` picks the builder: numpy (default; one part at a time in
this process), duckdb (the named SQL of queries/rollups.sql, per rank) or spark (the same SQL
on a Spark session: a fleet run; `--master`, `--conf` as for `report`). Exit 0 on success, 2 on
bad input (no such run, a counts-only run).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from routescope.commands.engine_options import add_engine_arguments, spark_option

BUILDER_OF = {"numpy": "numpy", "duckdb": "sql", "spark": "sql"}  # --engine -> build_rollups' builder


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run directory or URI (s3://bucket/runs/x)")
    parser.add_argument(
        "--force", action="store_true", help="rebuild every rollup part, not only missing ones"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_engine_arguments(
        parser,
        choices=tuple(BUILDER_OF),
        default="numpy",
        what="rollup builder: numpy (in process, one part at a time; default), duckdb (the named SQL "
        "of queries/rollups.sql) or spark (the same SQL on Spark, for a fleet run)",
    )


def index_command(args: argparse.Namespace) -> int:
    """Build the rollup tables of a run (imported or older runs lack them)."""
    from tqdm.auto import tqdm

    import routescope as rs

    engine = "spark" if args.engine == "spark" else "duckdb"
    # a run on object storage is reached with the environment's credentials (AWS_* for s3://)
    run = rs.open_run(args.run, engine=engine, spark=spark_option(args))
    if run.manifest.get("counts_only"):
        raise ValueError(f"{args.run} holds expert counts only: it has no routing to roll up")

    def progress(items: Any, total: int, desc: str) -> Any:
        return tqdm(items, total=total, desc=desc, unit="step", disable=args.quiet, file=sys.stderr)

    written = run.build_rollups(force=args.force, progress=progress, builder=BUILDER_OF[args.engine])
    done = ", ".join(f"{table}: {n} part(s)" for table, n in written.items())
    print(
        f"{args.run}: rollups written ({done})"
        if any(written.values())
        else f"{args.run}: rollups up to date"
    )
    return 0


__all__ = ["add_index_arguments", "index_command"]

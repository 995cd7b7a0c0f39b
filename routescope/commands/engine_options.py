"""`--engine`, `--master` and `--conf` of `routescope report` (and `index`): which engine answers, and for
Spark, which cluster and settings (docs/spark_and_object_storage.md). The session is made by
`analysis.cluster.spark_session`, so pyspark loads only when Spark is asked for.
"""

from __future__ import annotations

import argparse
from typing import Any

QUERY_ENGINE = "query engine: duckdb (in process, default) or spark (the active or a local SparkSession)"


def add_engine_arguments(
    parser: argparse.ArgumentParser,
    choices: tuple[str, ...] = ("duckdb", "spark"),
    default: str = "duckdb",
    what: str = QUERY_ENGINE,
) -> None:
    parser.add_argument(
        "--engine",
        choices=choices,
        default=default,
        help=f'{what}; spark needs pip install -e ".[spark]"; RUN may be a URI such as s3://bucket/runs/x '
        "(Spark then needs hadoop-aws: --conf spark.jars.packages=org.apache.hadoop:hadoop-aws:<its Hadoop "
        "version>)",
    )
    parser.add_argument(
        "--master",
        metavar="URL",
        help="with --engine spark: the cluster to run on (spark://host:7077, yarn, local[4]; default local[*])",
    )
    parser.add_argument(
        "--conf",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --engine spark: a Spark setting, repeatable (spark.jars.packages=..., "
        "spark.hadoop.fs.s3a.endpoint=...)",
    )


def spark_option(args: argparse.Namespace) -> Any:
    """The SparkSession that --master / --conf ask for (None: open_run's default session)."""
    master, pairs = getattr(args, "master", None), getattr(args, "conf", None) or []
    if not master and not pairs:
        return None
    if getattr(args, "engine", "duckdb") != "spark":
        raise ValueError("--master and --conf go with --engine spark")
    conf = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--conf {pair!r} is not KEY=VALUE (e.g. spark.executor.memory=4g)")
        conf[key.strip()] = value
    from routescope.analysis.cluster import spark_session

    return spark_session(master=master or "local[*]", conf=conf)

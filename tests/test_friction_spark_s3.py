"""Issue 38 items 5, 9, 10: Spark and object storage as a new user meets them.

An S3 emulator (moto in server mode, on loopback, as tests/test_object_storage.py) and local
Spark in subprocesses (their stderr is what a user sees). Skipped without the extras.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import routescope as rs
from routescope.cli import main, show_warning
from tests.s3_server import aws_env, moto_server, storage_options
from tests.tiny_models import build_tiny_model

pytestmark = pytest.mark.slow  # README's test command leaves this file out (-m 'not slow')

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "friction-test"


def have_spark() -> bool:
    try:
        import pyspark  # noqa: F401
    except ImportError:
        return False
    return shutil.which("java") is not None


needs_spark = pytest.mark.skipif(
    not have_spark(), reason='Spark needs pyspark and Java 17: pip install -e ".[spark]"'
)


@pytest.fixture(scope="module")
def s3():
    pytest.importorskip("s3fs", reason='object storage needs s3fs: pip install -e ".[s3]"')
    pytest.importorskip("moto", reason="the S3-API test server is moto: pip install 'moto[server]'")
    import s3fs

    with moto_server() as endpoint:
        options = storage_options(endpoint)
        s3fs.S3FileSystem(skip_instance_cache=True, **options).call_s3("create_bucket", Bucket=BUCKET)
        model = build_tiny_model("mixtral")
        with rs.record(model, f"s3://{BUCKET}/run", storage_options=options):
            model(input_ids=torch.randint(1, 100, (2, 6)))
        yield {"options": options, "env": aws_env(endpoint)}


def cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "routescope.cli", *argv], capture_output=True, text=True, env=full, cwd=ROOT
    )


def test_third_party_warnings_keep_their_name(capsys) -> None:
    """Item 9: a warning raised by another package is never printed as `routescope: warning:`."""
    pandas_file = "/usr/lib/python3/site-packages/pyspark/sql/pandas/utils.py"
    show_warning(
        FutureWarning("PySpark does not yet fully support pandas >= 3.0.0."), FutureWarning, pandas_file
    )
    show_warning(RuntimeWarning("routescope: the run is incomplete"), RuntimeWarning, str(ROOT / "x.py"))
    show_warning(rs.EmptySelectionWarning("where= selects nothing"), rs.EmptySelectionWarning, "/tmp/user.py")
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "routescope: warning from pyspark: PySpark does not yet fully support pandas >= 3.0.0.",
        "routescope: warning: the run is incomplete",
        "routescope: warning: where= selects nothing",
    ]


def test_missing_bucket_is_one_line_naming_it(s3, tmp_path) -> None:
    """Item 10: recording to, opening, or profiling into a bucket that does not exist says so in
    one line naming the bucket, without s3fs's chained traceback."""
    model = build_tiny_model("mixtral")
    with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket' of s3://no-such-bucket/run") as info:
        with rs.record(model, "s3://no-such-bucket/run", storage_options=s3["options"]):
            pass
    assert info.value.__cause__ is None and info.value.__suppress_context__
    with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket'"):
        rs.open_run("s3://no-such-bucket/run", storage_options=s3["options"])
    done = cli("report", "s3://no-such-bucket/run", env=s3["env"])
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "routescope: error: bucket 'no-such-bucket' of s3://no-such-bucket/run does not exist (or these "
        "credentials cannot see it): create it first (e.g. `aws s3 mb s3://no-such-bucket`) or fix the URI"
    ]


def test_report_header_keeps_the_s3_uri(s3) -> None:
    """Item 10: `report s3://...` names the run by its URI, not a bare bucket path."""
    done = cli("report", f"s3://{BUCKET}/run", env=s3["env"])
    assert done.returncode == 0, done.stderr
    assert f"routescope report s3://{BUCKET}/run " in done.stdout
    doc = json.loads(cli("report", f"s3://{BUCKET}/run", "--json", env=s3["env"]).stdout)
    assert doc["run"]["path"] == f"s3://{BUCKET}/run" and doc["run"]["damage"] == []


@needs_spark
def test_spark_on_s3_without_hadoop_aws_is_one_line_with_the_recipe(s3) -> None:
    """Item 5: no Java traceback; one routescope line naming hadoop-aws, the version that
    matches pyspark's Hadoop, and the --conf recipe."""
    done = cli("report", f"s3://{BUCKET}/run", "--engine", "spark", "--master", "local[1]", env=s3["env"])
    assert done.returncode == 2
    ours = [line for line in done.stderr.splitlines() if line.startswith("routescope")]
    assert len(ours) == 1, done.stderr
    assert "Traceback" not in done.stderr and "ClassNotFoundException" not in done.stderr
    assert "hadoop-aws" in ours[0] and "--conf spark.jars.packages=org.apache.hadoop:hadoop-aws:" in ours[0]
    version = ours[0].split("its Hadoop ")[1].split()[0]
    assert version[0].isdigit() and f"hadoop-aws:{version}" in ours[0]


@needs_spark
def test_spark_report_is_quiet_and_takes_master_and_conf(tmp_path) -> None:
    """Items 5 and 9: `report --engine spark --master --conf` runs on that master with those
    settings, equals DuckDB's report, and prints neither pyspark's pandas>=3 warning nor
    Spark's WindowExec WARN lines."""
    model = build_tiny_model("mixtral")
    run = tmp_path / "run"
    with rs.record(model, run, labels={"domain": "code"}):
        model(input_ids=torch.randint(1, 100, (3, 8)))
    script = (
        "import sys; from routescope.cli import build_parser, main; "
        "from routescope.commands.engine_options import spark_option; "
        f"args = build_parser().parse_args(['report', {str(run)!r}, '--engine', 'spark', "
        "'--master', 'local[1]', '--conf', 'spark.sql.shuffle.partitions=3']); "
        "s = spark_option(args); print('MASTER', s.sparkContext.master, s.conf.get('spark.sql.shuffle.partitions')); "
        f"sys.exit(main(['report', {str(run)!r}, '--json', '--engine', 'spark', '--master', 'local[1]', "
        "'--conf', 'spark.sql.shuffle.partitions=3']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    head, _, body = done.stdout.partition("\n")
    assert head == "MASTER local[1] 3"
    spark_doc = json.loads(body)
    duck = cli("report", str(run), "--json")
    duck_doc = json.loads(duck.stdout)
    assert len(spark_doc["balance"]) == len(duck_doc["balance"]) == 2
    for got, want in zip(spark_doc["balance"], duck_doc["balance"], strict=True):
        assert got["layer"] == want["layer"] and got["tokens"] == want["tokens"]
        assert got["cv"] == pytest.approx(want["cv"], rel=1e-9)
    assert "pandas >= 3" not in done.stderr and "WindowExec" not in done.stderr
    assert "routescope: warning" not in done.stderr


def test_master_and_conf_need_the_spark_engine(tmp_path, capsys) -> None:
    """Item 5: --master / --conf without --engine spark, or a --conf that is not KEY=VALUE, is bad input."""
    model = build_tiny_model("mixtral")
    with rs.record(model, tmp_path / "run"):
        model(input_ids=torch.randint(1, 100, (1, 4)))
    assert main(["report", str(tmp_path / "run"), "--master", "local[1]"]) == 2
    assert "--master and --conf go with --engine spark" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "run"), "--engine", "spark", "--conf", "novalue"]) == 2
    assert "--conf 'novalue' is not KEY=VALUE" in capsys.readouterr().err

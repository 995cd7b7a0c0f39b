"""The rollup builders agree (issue 33 item 1): NumPy (`store.rollups.part_rollups`, what the
writer runs), the named SQL of queries/rollups.sql on DuckDB, and the same SQL on Spark
(`routescope index --engine numpy|duckdb|spark`) write the same rows, part by part, on a
recorded run (labels, prefill and decode, one-row parts, an append, a second rank) and on a
synthetic SPEC-format run; and a Spark run answers its metrics from the rollups, equal to the
routing values.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import routescope as rs
from routescope import schema
from routescope.analysis.querying import rollup_twin
from routescope.analysis.rollup_build import missing_parts
from routescope.analysis.rollups import without_rollups
from routescope.cli import main
from routescope.store.rollups import COMPACTED, sum_rows
from tests import test_rollups
from tests.test_rollups import assert_same, metric_args

pytestmark = pytest.mark.slow  # several full index builds

recorded_run = test_rollups.recorded  # the recorded run of tests/test_rollups.py (a fixture)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _table(run_dir: Path, table: str) -> pd.DataFrame:
    """Every row of a rollup table (equal keys summed), in key order, for comparing builds."""
    parts = sorted((run_dir / table).glob("rank=*/part-*.parquet"))
    frames = []
    for part in parts:
        data = pq.read_table(part)
        rank = int(part.parent.name.split("=")[1])
        frames.append(data.append_column("rank", pa.array([rank] * data.num_rows, pa.int32())))
    whole = pa.concat_tables(frames, promote_options="default")
    measures = [c for c, kind in schema.ROLLUP_MEASURES[table].items() if kind == pa.int64()]
    frame = sum_rows(whole, measures).to_pandas()
    keys = [c for c in frame.columns if c not in measures]
    return frame.sort_values(keys, na_position="last").reset_index(drop=True)[sorted(frame.columns)]


def _parts(run_dir: Path, table: str) -> dict[str, pd.DataFrame]:
    """Each part of a one-part-per-routing-part table as a sorted frame."""
    out = {}
    for part in sorted((run_dir / table).glob("rank=*/part-*.parquet")):
        frame = pq.read_table(part).to_pandas()
        out[f"{part.parent.name}/{part.name}"] = frame.sort_values(list(frame.columns)).reset_index(drop=True)
    return out


def _assert_same_builds(a: Path, b: Path, what: str) -> None:
    for table in schema.ROLLUP_TABLES:
        left, right = _table(a, table), _table(b, table)
        assert len(left) > 0, table
        pd.testing.assert_frame_equal(left, right, check_dtype=False, obj=f"{table} ({what})")
    for table in (schema.ROLLUP_EXPERT_COUNTS, schema.ROLLUP_REPETITION):  # not compacted: part by part
        left, right = _parts(a, table), _parts(b, table)
        assert list(left) == list(right)
        for name in left:
            pd.testing.assert_frame_equal(left[name], right[name], check_dtype=False, obj=f"{table}/{name}")


@pytest.fixture(scope="module")
def numpy_built(recorded_run, tmp_path_factory):
    out = _copy(recorded_run, tmp_path_factory.mktemp("numpy") / "run")
    assert main(["index", "--quiet", "--force", str(out)]) == 0
    return out


def test_duckdb_sql_builds_the_same_rollups_as_numpy(recorded_run, numpy_built, tmp_path):
    out = _copy(recorded_run, tmp_path / "run")
    assert main(["index", "--quiet", "--force", "--engine", "duckdb", str(out)]) == 0
    assert not any(missing_parts(out).values())
    _assert_same_builds(numpy_built, out, "numpy vs duckdb sql")
    for table in COMPACTED:  # the SQL build compacts the pair tables as the NumPy one does
        assert sorted(p.name for p in (out / table).glob("rank=*/*.parquet")) == sorted(
            p.name for p in (numpy_built / table).glob("rank=*/*.parquet")
        )


def test_duckdb_sql_equals_numpy_on_a_synthetic_run_with_labels(tmp_path):
    from tests.synthetic import write_run
    from tests.test_analysis_metrics import E, plant

    data = plant()
    run_dir = write_run(
        tmp_path / "syn",
        data["experts"],
        E,
        seq_id=data["seq_id"],
        pos=data["pos"],
        token_id=data["token_id"],
        step=data["step"],
        phase=data["phase"],
        labels={"domain": data["domain"]},
        num_hidden_layers=6,
        parts=3,
    )
    other = _copy(run_dir, tmp_path / "syn_sql")
    assert main(["index", "--quiet", str(run_dir)]) == 0
    assert main(["index", "--quiet", "--engine", "duckdb", str(other)]) == 0
    _assert_same_builds(run_dir, other, "synthetic")


# -- Spark -----------------------------------------------------------------------------------
def _have_spark() -> bool:
    try:
        import pyspark  # noqa: F401
        import sqlglot  # noqa: F401
    except ImportError:
        return False
    return shutil.which("java") is not None


needs_spark = pytest.mark.skipif(
    not _have_spark(), reason='Spark needs pyspark, sqlglot and Java 17: pip install -e ".[spark]"'
)


@needs_spark
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_spark_builds_the_same_rollups_as_numpy_and_duckdb(recorded_run, numpy_built, spark, tmp_path):
    out = _copy(recorded_run, tmp_path / "run")
    # the CLI's --engine spark uses the active session (this one)
    assert main(["index", "--quiet", "--force", "--engine", "spark", str(out)]) == 0
    assert not any(missing_parts(out).values())
    _assert_same_builds(numpy_built, out, "numpy vs spark sql")


@needs_spark
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_spark_metrics_read_the_rollups_and_equal_routing(numpy_built, spark):
    run = rs.open_run(numpy_built, engine="spark", spark=spark)
    local = rs.open_run(numpy_built)
    assert run.rollups == list(schema.ROLLUP_TABLES)
    names = ("expert_load", "entanglement", "repetition_rate", "specialization", "coactivation")
    for name in names:
        # not over the rollup dimensions: routing answers (as on DuckDB)
        assert rollup_twin(run, _twin_of(name), "pos > 3") is None
        for where in (None, "domain = 'math' AND step >= 2"):
            # over the rollup's dimensions: Spark answers from the rollups; the pair tables keep
            # no step, so entanglement and coactivation over a step range read routing, as on DuckDB
            answers = where is None or name not in ("entanglement", "coactivation")
            assert (rollup_twin(run, _twin_of(name), where) is not None) == answers, (name, where)
            fast = getattr(run, name)(*metric_args(run, name), where=where)
            with without_rollups():
                slow = getattr(run, name)(*metric_args(run, name), where=where)
                duck = getattr(local, name)(*metric_args(local, name), where=where)
            assert_same(fast, slow, f"spark {name}(where={where!r}) rollups vs routing")
            assert_same(fast, duck, f"spark {name}(where={where!r}) vs duckdb routing")


def _twin_of(metric: str) -> str:
    """The named query whose rollup twin a metric reads (querying.ROLLUP_TWINS)."""
    return {
        "expert_load": "expert_counts",
        "balance": "expert_counts",
        "entanglement": "top1_pair_counts",
        "repetition_rate": "repetition_rate",
        "specialization": "specialization",
        "coactivation": "coactivation",
    }[metric]

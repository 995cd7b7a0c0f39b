"""The Spark engine answers every metric call with the same result as DuckDB, from the same named
SQL (translated by sqlglot), on synthetic runs with planted structure (tests/test_analysis_metrics
plants a dead and a hot expert, a deterministic layer pair and label-specific experts).

One local[2] SparkSession serves the whole module; Java 17 and pyspark are needed (skipped
with the reason when they are missing: pip install -e ".[spark]").
"""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pandas as pd
import pytest

import routescope as rs
from tests.synthetic import write_run
from tests.test_analysis_metrics import E, plant

pyspark = pytest.importorskip("pyspark", reason='the Spark engine needs pyspark: pip install -e ".[spark]"')
pytest.importorskip("sqlglot", reason='the Spark engine needs sqlglot: pip install -e ".[spark]"')
if shutil.which("java") is None:
    pytest.skip(
        "the Spark engine needs Java 17 (apt-get install openjdk-17-jre-headless)", allow_module_level=True
    )

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="session")
def spark():
    from pyspark.sql import SparkSession

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        session = (
            SparkSession.builder.master("local[2]")
            .appName("routescope-tests")
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.sql.shuffle.partitions", "2")
            .config("spark.sql.execution.arrow.pyspark.enabled", "true")
            .getOrCreate()
        )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def engines(tmp_path_factory, spark):
    data = plant()
    path = write_run(
        tmp_path_factory.mktemp("spark") / "run",
        data["experts"],
        E,
        seq_id=data["seq_id"],
        pos=data["pos"],
        token_id=data["token_id"],
        step=data["step"],
        phase=data["phase"],
        labels={"domain": data["domain"]},
        router_probs=data["probs"],
        num_hidden_layers=6,
        parts=3,
    )
    with rs.open_run(path) as duck, rs.open_run(path, engine="spark", spark=spark) as sparky:
        yield duck, sparky


CALLS = {
    "expert_load": lambda r: r.expert_load(),
    "balance": lambda r: r.balance(),
    "balance_ep_size": lambda r: r.balance(ep_size=4),
    "dead_experts": lambda r: r.dead_experts(),
    "dead_experts_max_share": lambda r: r.dead_experts(max_share=0.05),
    "hot_experts": lambda r: r.hot_experts(factor=1.5),
    "entanglement": lambda r: r.entanglement(),
    "specialization": lambda r: r.specialization(by="domain"),
    "where": lambda r: r.balance(where="phase = 'prefill' AND domain = 'code'"),
    "where_specialization": lambda r: r.specialization(by="phase", where="step >= 2"),
    "coactivation": lambda r: r.coactivation(3),
    "repetition_rate": lambda r: r.repetition_rate(),
    "sql": lambda r: r.sql(
        "SELECT layer, count(*) AS n FROM routing WHERE expert = $e GROUP BY layer ORDER BY layer", {"e": 0}
    ),
}


def same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    a, b = a.reset_index(drop=True), b.reset_index(drop=True)
    assert list(a.columns) == list(b.columns)
    pd.testing.assert_frame_equal(a, b, check_dtype=False, rtol=1e-9)


@pytest.mark.parametrize("name", list(CALLS))
def test_every_metric_is_equal_on_both_engines(engines, name):
    duck, sparky = engines
    expected = CALLS[name](duck)
    assert len(expected)
    same(expected, CALLS[name](sparky))


def test_planted_structure_is_what_spark_finds(engines):
    _, sparky = engines
    dead = sparky.dead_experts()
    assert (dead["layer"] == 1).all() and set(dead["expert"]) == {7}
    ent = sparky.entanglement().set_index("layer")
    assert ent.loc[1, "norm_mutual_info"] == pytest.approx(1.0)
    assert ent.loc[3, "norm_mutual_info"] < 0.1
    assert "ep_balancedness" in sparky.balance(ep_size=4).columns


def test_a_bad_where_is_a_value_error_on_spark(engines):
    _, sparky = engines
    with pytest.raises(ValueError, match="invalid where clause"):
        sparky.expert_load(where="no_such_column = 1")


def test_the_report_is_the_same_from_both_engines(engines):
    from routescope.cli import collect_report

    duck, sparky = engines
    a, b = collect_report(duck, ep_size=4), collect_report(sparky, ep_size=4)
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, pd.DataFrame):
            same(value, b[key])
        else:
            assert value == b[key], key


def test_many_runs_read_as_one_with_a_run_column(tmp_path, spark):
    """Two nodes' runs whose seq ids collide read as one dataset equal to a single run of all rows."""
    data = plant()
    paths = []
    for i in range(2):
        rows = np.arange(i * 1000, (i + 1) * 1000)
        paths.append(
            write_run(
                tmp_path / f"node{i}",
                {layer: x[rows] for layer, x in data["experts"].items()},
                E,
                seq_id=data["seq_id"][rows] - data["seq_id"][rows][0],
                pos=data["pos"][rows],
                labels={"domain": data["domain"][rows]},
                num_hidden_layers=6,
            )
        )
    whole = write_run(
        tmp_path / "whole",
        data["experts"],
        E,
        seq_id=data["seq_id"],
        pos=data["pos"],
        labels={"domain": data["domain"]},
        num_hidden_layers=6,
    )
    with (
        rs.open_run(whole) as one,
        rs.open_runs(str(tmp_path / "node*")) as duck,
        rs.open_runs(paths, engine="spark", spark=spark) as sparky,
    ):
        assert duck.manifest["tokens"] == 2000 and len(duck.manifest["runs"]) == 2
        for call in (
            lambda r: r.expert_load(),
            lambda r: r.entanglement(),
            lambda r: r.specialization("domain"),
        ):
            same(call(one), call(duck))
            same(call(one), call(sparky))
        per_run = sparky.sql(
            "SELECT run, count(DISTINCT seq_id) AS seqs FROM tokens GROUP BY run ORDER BY run"
        )
        assert per_run.to_dict("list") == {"run": ["node0", "node1"], "seqs": [50, 50]}

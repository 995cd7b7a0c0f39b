"""The Spark engine answers every metric call with the same result as DuckDB, from the same named
SQL (translated by sqlglot), on synthetic runs with planted structure (tests/test_analysis_metrics
plants a dead and a hot expert, a deterministic layer pair and label-specific experts).

One local[2] SparkSession serves the whole module; Java 17 and pyspark are needed (skipped
with the reason when they are missing: pip install -e ".[spark]").
"""

from __future__ import annotations

import shutil

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

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]


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
    "hot_experts": lambda r: r.hot_experts(factor=1.5),
    "entanglement": lambda r: r.entanglement(),
    "specialization": lambda r: r.specialization(by="domain"),
    "where": lambda r: r.balance(where="phase = 'prefill' AND domain = 'code'"),
    "coactivation": lambda r: r.coactivation(3),
    "vocab_specialization": lambda r: r.vocab_specialization(),
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


def test_a_bad_where_is_a_value_error_on_spark(engines):
    _, sparky = engines
    with pytest.raises(ValueError, match="invalid where clause"):
        sparky.expert_load(where="no_such_column = 1")


def _close(a, b, key=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), key
        for k in a:
            _close(a[k], b[k], f"{key}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), key
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{key}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-9, abs=1e-12), key
    else:
        assert a == b, key


def test_the_same_report_comes_out_of_both_engines(engines, capsys):
    """`routescope report RUN --engine spark` prints the report DuckDB gives (one JSON document)."""
    import json

    from routescope.cli import main

    duck, _ = engines
    outputs = []
    for engine in ("duckdb", "spark"):
        assert main(["report", str(duck.path), "--ep-size", "4", "--json", "--engine", engine]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    _close(*outputs)


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

"""The DuckDB -> Spark translation of the named queries (analysis/dialect.py), without Spark:
every metric's composed SQL translates to Spark SQL that sqlglot's Spark parser reads back,
the DuckDB-only constructs are gone, and parameters are bound as literals that keep their
value (a quote in a label cannot end the string). Runs where sqlglot is installed, Java or not;
tests/test_spark_engine.py runs the translations on Spark itself."""

from __future__ import annotations

import pytest

from routescope.analysis.querying import build_query

sqlglot = pytest.importorskip("sqlglot", reason='the Spark engine needs sqlglot: pip install -e ".[spark]"')

from routescope.analysis.dialect import to_spark  # noqa: E402

PARAMS = {"layers": [1, 3], "num_experts": [8, 8], "top_k": [2, 2], "label": "domain"}
QUERIES = {
    "expert_load": ("expert_counts",),
    "balance": ("expert_counts",),
    "dead_experts": ("expert_counts",),
    "hot_experts": ("expert_counts",),
    "top1_pair_counts": ("top1_paths",),
    "specialization": (),
    "coactivation": (),
    "repetition_rate": ("top1_paths",),
    "vocab_specialization": (("vocab_counts", "vocab_counts_token"),),
}
EXTRA = {"max_share": 0.0, "factor": 2.0, "layer": 1, "min_occurrences": 1}


@pytest.mark.parametrize("name", list(QUERIES))
@pytest.mark.parametrize("where", [None, "phase = 'prefill'"])
def test_every_metric_query_translates_to_spark_sql(name, where):
    sql, needed = build_query(name, where, QUERIES[name])
    spark_sql = to_spark(sql, {k: v for k, v in {**PARAMS, **EXTRA}.items() if k in needed})
    tree = sqlglot.parse_one(spark_sql, read="spark")
    assert not list(tree.find_all(sqlglot.exp.Placeholder)), "every parameter is bound"
    assert "MATERIALIZED" not in spark_sql and "COLUMNS(" not in spark_sql
    for select in tree.find_all(sqlglot.exp.Select):
        generators = [e for p in select.expressions for e in p.find_all(sqlglot.exp.Explode)]
        assert not generators, "generators in a SELECT list go through one LATERAL VIEW"


def test_parameters_are_literals_that_keep_their_value():
    spark_sql = to_spark("SELECT $text AS t, $n AS n, $xs AS xs", {"text": "a'b\\\\c", "n": 3, "xs": [1, 2]})
    tree = sqlglot.parse_one(spark_sql, read="spark")
    assert tree.expressions[0].this.this == "a'b\\\\c"
    assert tree.expressions[1].this.this == "3"
    assert isinstance(tree.expressions[2].this, sqlglot.exp.Array)


def test_a_label_column_is_chosen_by_name_and_quoted():
    spark_sql = to_spark("SELECT COLUMNS(lambda c: c = $label) AS v FROM t", {"label": "my label"})
    assert "`my label` AS v" in spark_sql

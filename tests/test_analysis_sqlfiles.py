"""The named-query loader: aiosql-style blocks, one doc line each, parameters found, CTEs composed."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from routescope.analysis import metrics
from routescope.analysis.querying import ROLLUP_INPUTS, build_query
from routescope.analysis.rollups import SELECTED
from routescope.analysis.sqlfiles import QUERY_DIR, Cte, compose, load_queries, parse_queries


def test_every_packaged_query_has_a_doc_line_and_parses():
    queries = load_queries()
    assert {"expert_load", "balance", "dead_experts", "hot_experts", "coactivation", "aux_loss"} <= set(
        queries
    )
    for query in queries.values():
        assert query.doc and "\n" not in query.doc
        assert query.source.parent == QUERY_DIR
        assert not query.sql.rstrip().endswith(";")


@pytest.mark.slow
def test_parse_finds_named_parameters():
    text = "-- name: q\n-- Rows of a layer.\nSELECT * FROM routing WHERE layer = $layer AND slot < $k\n"
    (q,) = parse_queries(text, Path("x.sql")).values()
    assert q.name == "q" and q.doc == "Rows of a layer." and q.params == {"layer", "k"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "text, message",
    [
        ("SELECT 1\n-- name: q\n-- doc\nSELECT 1", "before the first"),
        ("-- name: q\nSELECT 1", "doc comment"),
        ("-- name: q\n-- doc\n", "has no SQL"),
        ("-- name: q\n-- doc\nSELECT 1\n-- name: q\n-- doc\nSELECT 2", "defined twice"),
    ],
)
def test_parse_errors_name_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        parse_queries(text, Path("bad.sql"))


@pytest.mark.slow
def test_compose_merges_with_clauses():
    con = duckdb.connect()
    ctes = [Cte("a", "SELECT 1 AS x"), Cte("b", "SELECT x + 1 AS x FROM a", materialized=False)]
    assert con.execute(compose("SELECT x FROM b", ctes)).fetchall() == [(2,)]
    body = "WITH c AS (SELECT x * 10 AS x FROM b) SELECT x FROM c"
    assert con.execute(compose(body, ctes)).fetchall() == [(20,)]


@pytest.mark.parametrize("where", [None, "pos < 3"])
def test_every_metric_query_binds(where):
    """Each metric's composed SQL parses and names only parameters the metric passes."""
    cases = {
        "expert_load": ("expert_counts",),
        "balance": ("expert_counts",),
        "top1_pair_counts": ("top1_paths",),
        "pathways": ("top1_paths",),
        "repetition_rate": ("top1_paths",),
    }
    for name, uses in cases.items():
        sql, params = metrics.build_query(name, where, uses)
        assert len(duckdb.extract_statements(sql)) == 1
        assert params >= {"layers", "num_experts", "top_k"}


@pytest.mark.parametrize("name", sorted(ROLLUP_INPUTS))
def test_a_metric_is_one_query_whichever_source_fills_its_inputs(name):
    """A metric the rollups can answer keeps its arithmetic in its one named query: composed
    over routing or over the rollups, the same body ends the SQL, and only the input CTEs
    before it differ (routing_<input> or rollup_<input>)."""
    queries = load_queries()
    inputs = ROLLUP_INPUTS[name]
    rollups = {SELECTED[t]: f"SELECT * FROM {t}" for t in inputs.tables}
    from_routing, _ = build_query(name, None, ("top1_paths",))
    from_rollups, _ = build_query(name, None, (), {}, rollups)
    body = queries[name].sql
    body = body[body.upper().index("WITH ") + 5 :] if body.upper().startswith("WITH ") else body
    assert from_routing.endswith(body) and from_rollups.endswith(body)
    for cte in inputs.routing:
        assert f"{cte} AS (\n{queries['routing_' + cte].sql}\n)" in from_routing
    for cte in inputs.rollup:
        assert cte in inputs.routing, f"{cte}: a rollup input with no routing twin"
        assert f"{cte} AS (\n{queries['rollup_' + cte].sql}\n)" in from_rollups
        assert f"rollup_{cte}" not in from_routing and queries["rollup_" + cte].sql not in from_routing


def test_the_rollup_queries_hold_no_metric_arithmetic():
    """queries/rollups.sql holds the builders (`*_rows`) and the rollup inputs of the metrics,
    nothing else: a metric's shares, grids and P(b | a) are written once, in its own query."""
    inputs = {"layer_expert_counts"} | {cte for i in ROLLUP_INPUTS.values() for cte in i.rollup}
    for query in load_queries().values():
        if query.source.name == "rollups.sql" and not query.name.endswith("_rows"):
            assert query.name.startswith("rollup_") and query.name[len("rollup_") :] in inputs, query.name

"""The named DuckDB SQL of `queries/*.sql`, translated for Spark SQL (the Spark engine's one input).

There is one copy of every query: the DuckDB text. `to_spark` parses it with sqlglot
(`read="duckdb"`), binds the `$parameters` into the tree as typed literals (values never
pass through string formatting), rewrites the few DuckDB idioms that sqlglot's Spark writer
leaves as they are, and writes Spark SQL. The rewrites, each for one reason:

- `unnest(...)` in a SELECT list: several zip their lists (DuckDB), and one may sit inside
  an expression (`unnest(range(E))::SMALLINT`); Spark allows one bare generator per SELECT,
  so they become one `LATERAL VIEW explode(sequence(1, n))` over the longest list and
  `try_element_at(list, i)` per column (the same zip, NULL-padded);
- `list[a:b]` (1-based, inclusive) becomes `slice(list, a, b - a + 1)`; `len(list)` `size`;
- `COLUMNS(lambda c: c = $label)` (a column chosen by a bound name) becomes that column,
  quoted; the caller has checked the name is one of the run's labels;
- `first(x ORDER BY n DESC, k)` becomes `min_by(x, struct(-n, k))` (the DESC keys of the
  named queries are counts), and a row value `min((a, b, c))` a `struct`;
- a decimal literal such as `1.0` is a DOUBLE (DuckDB divides to DOUBLE, Spark to DECIMAL);
- `AS [NOT] MATERIALIZED` hints on CTEs are DuckDB's only and are dropped.

sqlglot is imported when a query is first translated, so DuckDB users never load it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

_ZIP_POS = "__zip_pos"
_ZIP_VIEW = "__zip"


@functools.lru_cache(maxsize=512)
def _parse(sql: str) -> Any:
    import sqlglot

    return sqlglot.parse_one(sql, read="duckdb")


def to_spark(sql: str, params: Mapping[str, Any] | None = None) -> str:
    """Spark SQL for DuckDB `sql`, with `params` bound as literals."""
    tree = _parse(sql).copy()
    tree = _bind(tree, dict(params or {}))
    tree = tree.transform(_list_size).transform(_rewrite)
    for select in list(tree.find_all(_exp().Select)):
        _zip_unnests(select)
    return tree.sql(dialect="spark")


def _exp() -> Any:
    from sqlglot import exp

    return exp


def literal(value: Any) -> Any:
    """A sqlglot literal for a Python value (int, float, str, bool, None, or a list of them)."""
    exp = _exp()
    if value is None:
        return exp.Null()
    if isinstance(value, bool):
        return exp.Boolean(this=value)
    if isinstance(value, int):
        return exp.Literal.number(value)
    if isinstance(value, float):
        return exp.Cast(this=exp.Literal.number(repr(value)), to=exp.DataType.build("DOUBLE"))
    if isinstance(value, str):
        return exp.Literal.string(value)
    if isinstance(value, (list, tuple)):
        return exp.Array(expressions=[literal(v) for v in value])
    if hasattr(value, "item"):  # a NumPy scalar
        return literal(value.item())
    raise TypeError(f"cannot bind a parameter of type {type(value).__name__} for Spark")


def _bind(tree: Any, params: dict[str, Any]) -> Any:
    exp = _exp()

    def bind(node: Any) -> Any:
        if isinstance(node, exp.Columns) and isinstance(node.this, exp.Lambda):
            # COLUMNS(lambda c: c = $name): the column whose name is the bound value
            body = node.this.this
            holder = body.expression if isinstance(body, exp.EQ) else None
            if isinstance(holder, exp.Placeholder) and holder.name in params:
                return exp.column(str(params[holder.name]), quoted=True)
        if isinstance(node, exp.Placeholder) and node.name in params:
            return literal(params[node.name])
        return node

    return tree.transform(bind)


def _list_size(node: Any) -> Any:
    # the named queries call len() on lists only
    exp = _exp()
    if isinstance(node, exp.Length):
        return exp.Anonymous(this="SIZE", expressions=[node.this])
    return node


def _rewrite(node: Any) -> Any:
    exp = _exp()
    if isinstance(node, exp.CTE) and node.args.get("materialized") is not None:
        node.set("materialized", None)
        return node
    if (
        isinstance(node, exp.Bracket)
        and len(node.expressions) == 1
        and isinstance(node.expressions[0], exp.Slice)
    ):
        piece = node.expressions[0]
        start, end = piece.this, piece.expression
        count = exp.Add(
            this=exp.Sub(this=end.copy(), expression=start.copy()), expression=exp.Literal.number(1)
        )
        return exp.Anonymous(this="SLICE", expressions=[node.this, start, exp.Paren(this=count)])
    if isinstance(node, exp.First) and isinstance(node.this, exp.Order):
        # first(x ORDER BY k1 DESC, k2): the x of the smallest (-k1, k2); DESC keys are numeric here
        keys = [
            exp.Neg(this=exp.Paren(this=o.this.copy())) if o.args.get("desc") else o.this.copy()
            for o in node.this.expressions
        ]
        return exp.Anonymous(
            this="MIN_BY", expressions=[node.this.this.copy(), exp.Anonymous(this="STRUCT", expressions=keys)]
        )
    if isinstance(node, exp.Tuple) and isinstance(node.parent, (exp.Min, exp.Max)):
        return exp.Anonymous(this="STRUCT", expressions=[e.copy() for e in node.expressions])
    if isinstance(node, exp.Literal) and not node.is_string and "." in node.this:
        return exp.Cast(this=node.copy(), to=exp.DataType.build("DOUBLE"))
    return node


def _zip_unnests(select: Any) -> None:
    """Generators in a SELECT list -> one lateral position and try_element_at per list."""
    exp = _exp()
    explodes = [
        e
        for projection in select.expressions
        for e in projection.find_all(exp.Explode)
        if e.find_ancestor(exp.Select) is select
    ]
    if not explodes:
        return
    lists = [e.this for e in explodes]
    sizes = [exp.Anonymous(this="SIZE", expressions=[a.copy()]) for a in lists]
    longest = sizes[0] if len(sizes) == 1 else exp.Greatest(this=sizes[0], expressions=sizes[1:])
    positions = exp.If(
        this=exp.LT(this=longest.copy(), expression=exp.Literal.number(1)),
        true=exp.Array(expressions=[]),
        false=exp.Anonymous(this="SEQUENCE", expressions=[exp.Literal.number(1), longest]),
    )
    for e, array in zip(explodes, lists):
        e.replace(exp.Anonymous(this="TRY_ELEMENT_AT", expressions=[array.copy(), exp.column(_ZIP_POS)]))
    if select.args.get("from_") is None and select.args.get("from") is None:
        one = exp.select(exp.alias_(exp.Literal.number(1), "__one")).subquery("__one")
        select.from_(one, copy=False)
    view = exp.Lateral(
        this=exp.Explode(this=positions),
        view=True,
        alias=exp.TableAlias(this=exp.to_identifier(_ZIP_VIEW), columns=[exp.to_identifier(_ZIP_POS)]),
    )
    select.set("laterals", [*select.args.get("laterals", []), view])

"""How metrics reach DuckDB: argument checks, the `where=` predicate, parameter binding,
named queries stacked as CTEs, and the per-Run cache of shared intermediate tables.

`metrics.py` holds the metric functions; this module is what they share. The one piece of
user text that enters SQL is the `where=` predicate, composed as
`SELECT * FROM tokens WHERE (<where>)` and checked by `check_where` before it runs.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import duckdb
import pandas as pd

from routescope import schema
from routescope.analysis.cluster import QueryError  # the Spark engine's errors (pyspark stays unloaded)
from routescope.analysis.rollups import rollup_ctes, rollups_enabled
from routescope.analysis.runview import RunView as Run  # a Protocol: run.py imports us, not back
from routescope.analysis.sqlfiles import Cte, compose, get_query
from routescope.errors import EmptySelectionWarning

# The only place user text enters SQL: a notebook-style filter over the tokens view.
WHERE_TEMPLATE = "SELECT * FROM tokens WHERE ({where})"
ROUTER_STATS_HINT = "record the run with rs.record(..., router_stats=True)"
# Counts-only runs (manifest `counts_only: true`): a `where=` is a predicate over this relation.
STEPS_TEMPLATE = "SELECT step FROM (SELECT DISTINCT step FROM expert_counts) WHERE ({where})"
# DuckDB errors that a bad `where=` can raise while the query runs (after it bound).
_RUNTIME_WHERE_ERRORS = (
    duckdb.ConversionException,
    duckdb.InvalidInputException,
    duckdb.OutOfRangeException,
    QueryError,
)
# Errors a `where=` that does not parse or bind raises, on either engine.
_WHERE_ERRORS = (duckdb.Error, QueryError)


# -- arguments --------------------------------------------------------------------------
def check_layer(run: Run, layer: Any) -> int:
    """`layer` as an int when it is one of the run's MoE layers, else ValueError listing them."""
    layers = run.moe_layers
    try:
        value = int(layer)
    except (TypeError, ValueError):
        value = None
    if value is None or value != layer or value not in layers:
        raise ValueError(f"layer {layer!r} is not a MoE layer of this run; MoE layers: {layers}")
    return value


def check_label(run: Run, label: Any) -> str:
    """A label of the run, or a built-in token column that groups like one (phase, modality, stack)."""
    if label not in run.labels and label not in schema.GROUPING_COLUMNS:
        allowed = ", ".join(run.labels) or "none: the run was recorded without labels"
        columns = ", ".join(schema.GROUPING_COLUMNS)
        raise ValueError(f"{label!r} is not a label of this run; labels: {allowed}; token columns: {columns}")
    return str(label)


def _duckdb_message(exc: BaseException) -> str:
    """DuckDB's message on one line, without the caret lines that point into the composed SQL."""
    lines = [ln.strip() for ln in str(exc).splitlines()]
    keep = []
    for ln in lines:
        if ln.startswith("LINE ") or (ln and set(ln) <= {"^", " "}):
            break
        if ln:
            keep.append(ln)
    return " ".join(keep)


def counts_only(run: Run) -> bool:
    """True for runs imported from per-expert counters: `expert_counts`, no tokens or routing."""
    return bool(run.manifest.get("counts_only", False))


def _counts_origin(run: Run) -> str:
    source = run.manifest.get("imported_from") or {}
    engine, mode = source.get("engine"), source.get("mode")
    if engine and mode:
        return f"imported from {engine}, mode {mode}"
    return f"imported from {engine}" if engine else "imported"


def require_routing(run: Run, metric: str) -> None:
    """ValueError for a counts-only run: `metric` reads per-token routing rows it does not have."""
    if counts_only(run):
        raise ValueError(
            f"this run holds expert counts only ({_counts_origin(run)}); {metric} needs per-token "
            "routing (expert_load, balance, dead_experts and hot_experts work on counts)"
        )


def first_choice_unknown(run: Run, metric: str, where: str | None = None) -> str | None:
    """Why `metric` (which reads slot 0 as the first choice) cannot run on the selected tokens,
    or None: an import whose slot order is unknown (manifest imported_from.slot_order_unknown_tokens,
    token label slot_order = 'unknown') has the lowest expert id in slot 0, not the first choice."""
    imported = run.manifest.get("imported_from") or {}
    if not imported.get("slot_order_unknown_tokens") or counts_only(run):
        return None
    unknown = int(query(run, "unknown_slot_order_tokens", where=where)["tokens"].iloc[0])
    if not unknown:
        return None
    return (
        f"{metric} needs each token's first choice, but {unknown} selected tokens of this "
        f"{imported.get('engine', 'imported')} import have an unknown slot order (slot 0 is their lowest "
        "expert id; trace with the logits sidecar, e.g. Megatron's --moe-routing-trace-capture-logits); "
        "select the others with where=\"slot_order <> 'unknown'\""
    )


def require_first_choice(run: Run, metric: str, where: str | None = None) -> None:
    """ValueError when `first_choice_unknown` says why `metric` cannot run."""
    why = first_choice_unknown(run, metric, where)
    if why:
        raise ValueError(why)


def token_count(run: Run, where: str | None = None) -> int:
    """Tokens `where` selects (every token without it). Counts-only runs: their manifest count."""
    where = check_where(run, where)
    if counts_only(run) or where is None:
        return int(run.manifest.get("tokens") or 0)
    return int(run.con.execute(f"SELECT count(*) FROM ({WHERE_TEMPLATE.format(where=where)})").fetchone()[0])


def check_where(run: Run, where: str | None) -> str | None:
    """None for no filter; the predicate when DuckDB can parse and bind it over `tokens`.

    For a counts-only run the predicate may read `step` only (the counts are per step).
    """
    if where is None:
        return None
    if not isinstance(where, str):
        raise ValueError(
            f"where must be a SQL predicate string over the tokens view, not {type(where).__name__}"
        )
    if not where.strip():
        return None
    if counts_only(run):
        selection = STEPS_TEMPLATE.format(where=where)
        try:
            if len(duckdb.extract_statements(selection)) != 1:
                raise duckdb.ParserException("it must be one predicate, not several statements")
            run.con.execute(f"SELECT * FROM ({selection}) LIMIT 0").fetchall()
        except _WHERE_ERRORS as exc:
            raise ValueError(
                f"invalid where clause {where!r}: this run holds expert counts only ({_counts_origin(run)}), "
                f"so where= may only reference step, e.g. 'step >= 10' ({_duckdb_message(exc)})"
            ) from None
        return where
    selection = WHERE_TEMPLATE.format(where=where)
    try:
        if len(duckdb.extract_statements(selection)) != 1:
            raise ValueError(
                f"invalid where clause {where!r}: it must be one predicate, not several statements"
            )
        run.con.execute(f"SELECT seq_id, pos FROM ({selection}) LIMIT 0").fetchall()
    except _WHERE_ERRORS as exc:
        raise ValueError(f"invalid where clause {where!r}: {_duckdb_message(exc)}") from None
    return where


# -- empty selections ------------------------------------------------------------------
# Set while a checked call runs, so the metrics it calls (balance -> expert_load, compare ->
# every metric) do not check and warn again; `quiet_selection()` sets it to silence them.
_CHECKING: ContextVar[bool] = ContextVar("routescope_selection_checked", default=False)
F = TypeVar("F", bound=Callable[..., Any])


def selected_nothing(run: Run, where: str | None) -> bool:
    """True when `where` is given and selects no token (no step of a counts-only run)."""
    where = check_where(run, where)
    if where is None:
        return False
    template = STEPS_TEMPLATE if counts_only(run) else WHERE_TEMPLATE
    sql = f"SELECT NOT EXISTS ({template.format(where=where)})"
    try:
        return bool(run.con.execute(sql).fetchone()[0])
    except _RUNTIME_WHERE_ERRORS as exc:
        raise ValueError(f"invalid where clause {where!r}: {_duckdb_message(exc)}") from None


def warn_if_empty(run: Run, where: str | None, what: str, stacklevel: int = 2) -> None:
    """An EmptySelectionWarning naming `what` and the predicate when `where` selects nothing."""
    if selected_nothing(run, where):
        total = run.manifest.get("tokens")
        warnings.warn(
            f"routescope: {what}: where={where!r} selects no token of {run.path} ({total} tokens): "
            "the result is NaN or zero, not a measurement",
            EmptySelectionWarning,
            stacklevel=stacklevel + 1,
        )


def checks_selection(func: F | None = None, *, name: str | None = None) -> Any:
    """Decorate a metric or plan `func(run, ..., where=...)`: warn once, at the outermost checked
    call, when its `where=` selects no token. `name` is what the warning calls it (default the
    function's name)."""
    if func is None:
        return functools.partial(checks_selection, name=name)
    signature = inspect.signature(func)
    what = f"{name or func.__name__}()"

    @functools.wraps(func)
    def checked(run: Run, *args: Any, **kwargs: Any) -> Any:
        if _CHECKING.get():
            return func(run, *args, **kwargs)
        token = _CHECKING.set(True)
        try:
            where = signature.bind_partial(run, *args, **kwargs).arguments.get("where")
            # stacklevel: warn_if_empty -> checked -> Run method -> the caller
            warn_if_empty(run, where, what, stacklevel=3)
            return func(run, *args, **kwargs)
        finally:
            _CHECKING.reset(token)

    return checked  # type: ignore[return-value]


@contextmanager
def quiet_selection() -> Iterator[None]:
    """Checked calls inside the block do not warn (callers that report an empty selection themselves)."""
    token = _CHECKING.set(True)
    try:
        yield
    finally:
        _CHECKING.reset(token)


# -- composition ------------------------------------------------------------------------
def layer_params(
    run: Run, layers: Sequence[int] | Mapping[str, list[int]] | None = None
) -> dict[str, list[int]]:
    """The `layer_info` parameters: MoE layers with their E and k, from the manifest.

    A mapping with keys layers, num_experts and top_k is taken as given (compare uses it).
    """
    if isinstance(layers, Mapping):
        return {key: list(layers[key]) for key in ("layers", "num_experts", "top_k")}
    layers = list(run.moe_layers if layers is None else layers)
    return {
        "layers": layers,
        "num_experts": [run.num_experts(layer) for layer in layers],
        "top_k": [run.top_k(layer) for layer in layers],
    }


@dataclass(frozen=True)
class Inputs:
    """What a metric query that can read the rollups takes in: the rollup tables it reads, and
    its input CTEs per source. Input CTE `x` is filled by named query `routing_x` (next to the
    metric's query) or `rollup_x` (queries/rollups.sql); the metric's arithmetic is its one query."""

    tables: tuple[str, ...]
    routing: tuple[str, ...] = ()
    rollup: tuple[str, ...] = ()


# Queries that the rollups can answer: name -> its inputs. Every query reads `layer_expert_counts`
# (routing_ or rollup_layer_expert_counts), so `expert_counts` has no inputs of its own.
ROLLUP_INPUTS: dict[str, Inputs] = {
    "expert_counts": Inputs((schema.ROLLUP_EXPERT_COUNTS,)),
    "step_expert_load": Inputs((schema.ROLLUP_EXPERT_COUNTS,), ("step_loads",), ("step_loads",)),
    "specialization": Inputs(
        (schema.ROLLUP_EXPERT_COUNTS,), ("specialization_counts",), ("specialization_counts",)
    ),
    "top1_pair_counts": Inputs((schema.ROLLUP_TOP1_PAIRS,), ("top1_pairs",), ("top1_pairs",)),
    "transition": Inputs((schema.ROLLUP_TOP1_PAIRS,), ("transition_counts",), ("transition_counts",)),
    "coactivation": Inputs(
        (schema.ROLLUP_EXPERT_COUNTS, schema.ROLLUP_COACTIVATION),
        ("coactivation_chosen", "coactivation_pairs", "coactivation_loads"),
        ("coactivation_pairs", "coactivation_loads"),
    ),
    "repetition_rate": Inputs(
        (schema.ROLLUP_EXPERT_COUNTS, schema.ROLLUP_REPETITION),
        ("repetition_pairs", "repetition_firsts"),
        ("repetition_pairs", "repetition_firsts"),
    ),
}


def rollup_twin(run: Run, name: str, where: str | None) -> dict[str, str] | None:
    """The rollup CTEs (CTE name -> SQL of the selected rollup rows) when query `name` can be
    answered from the run's rollups, else None."""
    if name not in ROLLUP_INPUTS or counts_only(run):
        return None
    return rollup_ctes(run, where, ROLLUP_INPUTS[name].tables)


def input_ctes(name: str, rollup: bool) -> list[tuple[str, str]]:
    """(CTE, named query) of each input of query `name` from the rollups or from routing."""
    inputs = ROLLUP_INPUTS.get(name)
    if inputs is None:
        return []
    source = "rollup" if rollup else "routing"
    return [(cte, f"{source}_{cte}") for cte in (inputs.rollup if rollup else inputs.routing)]


def build_query(
    name: str,
    where: str | None,
    uses: Sequence[str | tuple[str, str]] = (),
    tables: Mapping[str, str] | None = None,
    rollups: Mapping[str, str] | None = None,
) -> tuple[str, frozenset[str]]:
    """The SQL of query `name` behind the selection CTEs and the named CTEs in `uses` (in that
    order), and the parameters it reads. A `uses` entry (cte, query) names query `query`'s CTE
    `cte`, so one body can read either of two inputs. `tables` maps a CTE name to a cached
    table that replaces it. `rollups` (CTE name -> SQL of selected rollup rows, from
    `rollup_twin`) are put in front, and the query's inputs (`ROLLUP_INPUTS`, after `uses`) and
    `layer_expert_counts` then come from the rollups instead of routing."""
    tables = tables or {}
    rollups = rollups or {}
    aliased = [(u, u) if isinstance(u, str) else (u[0], u[1]) for u in uses]
    aliased += input_ctes(name, bool(rollups))
    selection = get_query("all_tokens").sql if where is None else WHERE_TEMPLATE.format(where=where)
    routing = get_query("all_routing" if where is None else "filtered_routing")
    named = [get_query(q) for u, q in aliased if u not in tables]
    ctes = [
        Cte("layer_info", get_query("layer_info").sql),
        Cte("selected_tokens", selection, materialized=False),
        Cte("selected_routing", routing.sql, materialized=False),
        *(Cte(cte, sql, materialized=False) for cte, sql in rollups.items()),
        Cte(
            "layer_expert_counts",
            get_query(f"{'rollup' if 'selected_rollup' in rollups else 'routing'}_layer_expert_counts").sql,
        ),
        *(Cte(u, f"SELECT * FROM {tables[u]}" if u in tables else get_query(q).sql) for u, q in aliased),
    ]
    body = get_query(name)
    params = frozenset().union(
        get_query("layer_info").params, routing.params, body.params, *(q.params for q in named)
    )
    return compose(body.sql, ctes), params


def _bind(name: str, needed: frozenset[str], values: Mapping[str, Any]) -> dict[str, Any]:
    missing = needed - set(values)
    if missing:
        raise KeyError(f"query {name!r} needs parameters {sorted(missing)}")
    return {k: values[k] for k in needed}


# Per Run: derived tables that several metrics share (the per-(layer, expert) counts), kept
# as DuckDB temp tables while the run's views, the session variables a `where=` may read
# (the dashboard binds filter values that way) and the manifest's layers stay the same.
CACHED = ("expert_counts",)
CACHE_LIMIT = 32  # cached tables per Run
_CACHE: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
_TABLE_IDS = itertools.count()


def _snapshot(run: Run, layers: Mapping[str, list[int]]) -> tuple:
    layer_key = tuple((k, tuple(v)) for k, v in sorted(layers.items()))
    if hasattr(run.con, "catalog_state"):  # the Spark engine reports its own view generation
        return run.con.catalog_state(), layer_key
    views = run.con.execute(
        "SELECT view_name, sql FROM duckdb_views() WHERE NOT internal ORDER BY view_name"
    ).fetchall()
    variables = run.con.execute(
        "SELECT name, value::VARCHAR FROM duckdb_variables() ORDER BY name"
    ).fetchall()
    return tuple(views), tuple(variables), layer_key


def build_counts_query(where: str | None, name: str = "expert_counts") -> tuple[str, frozenset[str]]:
    """Counts-only runs: query `name` (default `expert_counts`) over `imported_expert_counts`
    of the steps selected by `where`."""
    steps = "SELECT DISTINCT step FROM expert_counts" if where is None else STEPS_TEMPLATE.format(where=where)
    ctes = [
        Cte("layer_info", get_query("layer_info").sql),
        Cte("selected_steps", steps),
        Cte("layer_expert_counts", get_query("imported_expert_counts").sql),
    ]
    body = get_query(name)
    return compose(body.sql, ctes), frozenset(get_query("layer_info").params | body.params)


def _state(run: Run, layers: Mapping[str, list[int]]) -> dict[str, Any]:
    """The run's cache state for its current snapshot (a new snapshot drops the old tables)."""
    snapshot = _snapshot(run, layers)
    state = _CACHE.get(run)
    if state is None or state["snapshot"] != snapshot:
        for table in (state or {}).get("tables", {}).values():
            run.con.execute(f"DROP TABLE IF EXISTS {table}")
        state = {"snapshot": snapshot, "tables": {}, "frames": {}}
        _CACHE[run] = state
    return state


FRAME_LIMIT = 4  # cached result frames per Run


def cached_frame(run: Run, name: str, where: str | None, compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    """`compute()` (query `name` over the selection) once per snapshot and `where`, as a copy:
    the per-step loads the doctor and the EP balance both read (steps x layers x experts rows)."""
    frames = _state(run, layer_params(run))["frames"]
    key = (name, where, rollups_enabled())
    if key not in frames:
        if len(frames) >= FRAME_LIMIT:
            frames.pop(next(iter(frames)))
        frames[key] = compute()
    return frames[key].copy()


def cached_table(run: Run, name: str, where: str | None, layers: Mapping[str, list[int]]) -> str:
    """A temp table holding named query `name` over the selection, computed once per snapshot."""
    state = _state(run, layers)
    rollups = None if name == "imported_expert_counts" else rollup_twin(run, name, where)
    key = (name, where, rollups is not None)
    if key not in state["tables"]:
        if len(state["tables"]) >= CACHE_LIMIT:  # forget the oldest selection
            oldest = next(iter(state["tables"]))
            run.con.execute(f"DROP TABLE IF EXISTS {state['tables'].pop(oldest)}")
        table = f"routescope_cache_{next(_TABLE_IDS)}"
        # A counts-only run's per-(layer, expert) counts come from its `expert_counts` table.
        sql, needed = (
            build_counts_query(where)
            if name == "imported_expert_counts"
            else build_query(name, where, rollups=rollups)
        )
        try:
            run.con.execute(f"CREATE TEMP TABLE {table} AS {sql}", _bind(name, needed, layers))
        except duckdb.IOException:
            if rollups is None:
                raise
            # a rollup part went away under us (a live run's writer compacted it): read routing
            sql, needed = build_query(name, where)
            run.con.execute(f"CREATE TEMP TABLE {table} AS {sql}", _bind(name, needed, layers))
        state["tables"][key] = table
    return state["tables"][key]


def _source(run: Run, name: str) -> str:
    """The query that fills cached CTE `name`: counts-only runs read their imported counts."""
    return "imported_expert_counts" if name == "expert_counts" and counts_only(run) else name


def query(
    run: Run,
    name: str,
    *,
    where: str | None = None,
    uses: Sequence[str | tuple[str, str]] = (),
    layers: Sequence[int] | Mapping[str, list[int]] | None = None,
    rollup: bool = True,
    **params: Any,
) -> pd.DataFrame:
    """Run named query `name` over the tokens selected by `where`, binding `params` by name.
    With `rollup` (default) a query of `ROLLUP_INPUTS` reads its inputs from the rollups when
    they can answer."""
    where = check_where(run, where)
    layer_values = layer_params(run, layers)
    try:
        rollups = rollup_twin(run, name, where) if rollup else None
        if rollups is not None and name not in CACHED:  # from the rollups: no per-token CTE
            sql, needed = build_query(name, where, (), {}, rollups)
            try:
                return run.con.execute(sql, _bind(name, needed, {**layer_values, **params})).df()
            except duckdb.IOException:
                pass  # a rollup part went away under us (a live run's writer compacted it): read routing
        tables = {u: cached_table(run, _source(run, u), where, layer_values) for u in uses if u in CACHED}
        sql, needed = build_query(name, where, uses, tables)
        return run.con.execute(sql, _bind(name, needed, {**layer_values, **params})).df()
    except _RUNTIME_WHERE_ERRORS as exc:
        if where is None:
            raise
        raise ValueError(f"invalid where clause {where!r}: {_duckdb_message(exc)}") from None


# -- load and balance (SPEC 4.1, 4.2) ---------------------------------------------------

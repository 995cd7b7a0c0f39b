"""Bad input to the analysis layer: a ValueError that says what is allowed, never a raw DuckDB error."""

from __future__ import annotations

import numpy as np
import pytest

import routescope as rs
from tests.synthetic import write_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    rng = np.random.default_rng(0)
    experts = {layer: np.stack([rng.permutation(4)[:2] for _ in range(30)]) for layer in (2, 5)}
    path = write_run(
        tmp_path_factory.mktemp("errors") / "run", experts, 4, seq_len=10, labels={"domain": ["a"] * 30}
    )
    with rs.open_run(path) as opened:
        yield opened


@pytest.mark.parametrize(
    "call", [lambda r: r.coactivation(3), lambda r: r.transition(2, 4), lambda r: r.transition(9, 5)]
)
def test_unknown_layer_lists_moe_layers(run, call):
    with pytest.raises(ValueError, match=r"not a MoE layer.*MoE layers: \[2, 5\]"):
        call(run)


def test_layer_must_be_an_integer(run):
    with pytest.raises(ValueError, match="not a MoE layer"):
        run.coactivation("2; DROP VIEW tokens")
    with pytest.raises(ValueError, match="not a MoE layer"):
        run.coactivation(2.5)
    assert len(run.coactivation(np.int64(2))) == 12


@pytest.mark.parametrize(
    "where, message",
    [
        ("foo bar", "syntax error"),
        ("no_such_column = 1", "no_such_column"),
        ("true; DROP VIEW tokens", "invalid where clause"),
        ("phase = ", "syntax error"),
        ("no_such_function(pos)", "no_such_function"),
    ],
)
def test_bad_where_is_a_value_error_with_duckdbs_message(run, where, message):
    for method in (run.expert_load, run.balance, run.entanglement, run.pathways):
        with pytest.raises(ValueError, match="invalid where clause") as info:
            method(where=where)
        assert message in str(info.value)
    assert len(run.expert_load()) == 8  # the views are intact


def test_where_that_fails_while_running(run):
    with pytest.raises(ValueError, match="invalid where clause"):
        run.expert_load(where="CAST(phase AS INTEGER) = 1")


def test_blank_where_means_all_tokens(run):
    assert run.expert_load(where="  ").equals(run.expert_load())


def test_aux_loss_needs_router_stats(run):
    assert "aux_loss" not in run.balance().columns  # default: only when recorded
    with pytest.raises(ValueError, match=r"router_stats=True"):
        run.balance(aux_loss=True)


def test_unknown_label(run):
    with pytest.raises(ValueError, match=r"'lang' is not a label of this run; labels: domain"):
        run.specialization(by="lang")
    with pytest.raises(ValueError, match="not a label"):
        run.specialization(by="pos")


@pytest.mark.parametrize(
    "call",
    [
        lambda r: r.dead_experts(max_share=-0.1),
        lambda r: r.hot_experts(factor=0),
        lambda r: r.pathways(top=0),
        lambda r: r.vocab_specialization(min_occurrences=0),
        lambda r: r.expert_activations(),
    ],
)
def test_bad_arguments(run, call):
    with pytest.raises(ValueError):
        call(run)


def test_unknown_named_query():
    from routescope.analysis.sqlfiles import get_query

    with pytest.raises(KeyError, match="expert_load"):
        get_query("no_such_query")

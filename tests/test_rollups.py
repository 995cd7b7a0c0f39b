"""Rollup tables (SPEC 3.3 `rollup_*`, issue 33): written by the writer and by `routescope index`,
read by every metric whose question they can answer, equal to the metric computed from routing.

Runs: a tiny Mixtral recorded with labels, prefill and `generate` (decode), small parts, an
appended second recording and a second rank; and a synthetic run in SPEC format without
rollups, indexed by the command. Each metric of `metrics.METRICS` is computed with the rollups
and with `without_rollups()` (routing only) under several `where=`, and the frames must be equal.
"""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import routescope as rs
from routescope import schema
from routescope.analysis import metrics
from routescope.analysis.querying import rollup_twin
from routescope.analysis.rollup_build import missing_parts
from routescope.analysis.rollups import without_rollups
from routescope.cli import main
from tests.synthetic import write_run

ROLLUP_WHERES = [
    None,
    "phase = 'decode'",
    "phase = 'prefill' AND domain = 'math'",
    "domain = 'code'",
    "step BETWEEN 1 AND 4",
    "rank = 1",
    "domain IN ('code', 'math') AND step >= 2",
]
ROUTING_WHERES = ["pos > 3", "token_id % 2 = 0"]  # not over rollup dimensions: routing answers
ARGS = {"coactivation": "layer", "transition": "pair"}


def metric_args(run: rs.Run, name: str) -> tuple:
    layers = run.moe_layers
    if name == "coactivation":
        return (layers[0],)
    if name == "transition":
        return (layers[0], layers[1])
    if name == "specialization":
        return ("domain",)
    return ()


def open_and_wait_for_rollups(registry, key: str = "0", timeout: float = 120) -> rs.Run:
    """Open served run `key` (which starts building its missing rollups) and wait until they are in."""
    import time

    run = registry.run(key)
    assert registry.rollup_state(key) in ("building", "ready")
    deadline = time.monotonic() + timeout
    while registry.rollup_state(key) == "building" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert registry.rollup_state(key) == "ready"
    return run


def assert_same(a: pd.DataFrame, b: pd.DataFrame, what: str) -> None:
    a, b = a.reset_index(drop=True), b.reset_index(drop=True)
    if "path" in a:
        a, b = a.assign(path=a["path"].map(tuple)), b.assign(path=b["path"].map(tuple))
    pd.testing.assert_frame_equal(a, b, check_dtype=False, rtol=1e-12, atol=0, obj=what)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A recorded run: labels, prefill + decode, ~10 parts, an append and a second rank."""
    import sys

    sys.path.insert(0, "tests")
    from tests.tiny_models import build_tiny_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_tiny_model("mixtral", seed=0).eval()
    out = tmp_path_factory.mktemp("rollups") / "run"
    torch.manual_seed(0)
    ids = torch.randint(1, 100, (3, 10))
    with rs.record(model, out, labels={"domain": "code"}, rows_per_part=1) as rec:
        model(input_ids=ids)
        rec.set_labels(domain="math")
        model.generate(
            input_ids=ids[:2, :6],
            attention_mask=torch.ones(2, 6, dtype=torch.long),
            max_new_tokens=5,
            do_sample=False,
        )
    with rs.record(model, out, mode="append", labels={"domain": "prose"}, rows_per_part=1):
        model(input_ids=ids[:, :7])
    with rs.record(model, out, rank=1, world_size=2, labels={"domain": "code"}, rows_per_part=1):
        model.generate(
            input_ids=ids[1:, :4],
            attention_mask=torch.ones(2, 4, dtype=torch.long),
            max_new_tokens=3,
            do_sample=False,
        )
    return out


def test_the_writer_writes_rollups_beside_each_routing_part(recorded):
    routing = sorted(
        p.relative_to(recorded / "routing") for p in (recorded / "routing").glob("rank=*/*.parquet")
    )
    counts = sorted(
        p.relative_to(recorded / schema.ROLLUP_EXPERT_COUNTS)
        for p in (recorded / schema.ROLLUP_EXPERT_COUNTS).glob("rank=*/*.parquet")
    )
    assert len(routing) > 4 and counts == routing
    # the pair rollups were compacted at close: one range part per recording of several parts
    pairs = sorted(p.name for p in (recorded / schema.ROLLUP_TOP1_PAIRS).glob("rank=0/*.parquet"))
    assert pairs[0] == "part-00000-00005.parquet" and len(pairs) == 2, pairs
    # the repetition rollup needs the previous token, which may be in an earlier part: index builds it
    missing = missing_parts(recorded)
    assert missing[schema.ROLLUP_REPETITION] and not missing[schema.ROLLUP_EXPERT_COUNTS]
    assert not missing[schema.ROLLUP_TOP1_PAIRS]


@pytest.fixture(scope="module")
def indexed(recorded, tmp_path_factory):
    out = tmp_path_factory.mktemp("indexed") / "run"
    shutil.copytree(recorded, out)
    assert main(["index", "--quiet", str(out)]) == 0
    assert not any(missing_parts(out).values())
    with rs.open_run(out) as run:
        yield run


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(metrics.METRICS))
def test_every_metric_equals_its_routing_value(indexed, name):
    run = indexed
    method = getattr(run, name)
    for where in ROLLUP_WHERES + ROUTING_WHERES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rs.EmptySelectionWarning)
            fast = method(*metric_args(run, name), where=where)
            with without_rollups():
                slow = method(*metric_args(run, name), where=where)
        assert len(slow) > 0 or name in ("dead_experts", "hot_experts") or where is not None
        assert_same(fast, slow, f"{name}(where={where!r})")


@pytest.mark.slow
def test_rollups_answer_the_questions_they_can(indexed):
    run = indexed
    for where in ROLLUP_WHERES:
        assert rollup_twin(run, "expert_counts", where) is not None, where
        assert rollup_twin(run, "repetition_rate", where) is not None, where
    assert rollup_twin(run, "top1_pair_counts", "domain = 'code'") is not None
    assert rollup_twin(run, "coactivation", "phase = 'decode' AND rank = 0") is not None
    # the pair rollups keep no step, and no rollup keeps positions or token ids
    assert rollup_twin(run, "top1_pair_counts", "step >= 2") is None
    for where in ROUTING_WHERES:
        assert rollup_twin(run, "expert_counts", where) is None
    with without_rollups():
        assert rollup_twin(run, "expert_counts", None) is None


@pytest.mark.slow
def test_balance_with_ep_size_and_step_loads_agree(indexed):
    run = indexed
    for where in ROLLUP_WHERES:
        fast = run.balance(where=where, ep_size=2)
        with without_rollups():
            slow = run.balance(where=where, ep_size=2)
        assert_same(fast, slow, f"balance(ep_size=2, where={where!r})")
    decode = run.repetition_rate(where="phase = 'decode'")
    assert decode["pairs"].sum() > 0  # decode tokens of one sequence sit in different steps and parts


@pytest.mark.slow
def test_synthetic_run_indexed_by_the_command(tmp_path, capsys):
    rng = np.random.default_rng(3)
    tokens, layers, experts, k = 400, [1, 2, 4], 8, 2
    chosen = {ly: np.argsort(rng.random((tokens, experts)), axis=1)[:, :k] for ly in layers}
    labels = {"domain": [["code", "math", None][i % 3] for i in range(tokens)]}
    out = tmp_path / "syn"
    write_run(
        out,
        chosen,
        experts,
        seq_len=20,
        labels=labels,
        parts=3,
        step=np.arange(tokens) // 40,
        phase=["prefill" if i % 20 < 12 else "decode" for i in range(tokens)],
    )
    with rs.open_run(out) as run:
        before = {w: run.entanglement(where=w) for w in (None, "domain = 'math'")}
        assert rollup_twin(run, "expert_counts", None) is None  # no rollups yet
    assert main(["index", str(out)]) == 0
    assert "rollups written" in capsys.readouterr().out
    assert main(["index", str(out)]) == 0
    assert "up to date" in capsys.readouterr().out
    with rs.open_run(out) as run:
        assert rollup_twin(run, "top1_pair_counts", None) is not None
        for where, frame in before.items():
            assert_same(run.entanglement(where=where), frame, f"entanglement({where!r})")
        for name in ("expert_load", "balance", "repetition_rate", "specialization"):
            args = ("domain",) if name == "specialization" else ()
            for where in (None, "domain IS NULL", "phase = 'decode' AND step < 6"):
                fast = getattr(run, name)(*args, where=where)
                with without_rollups():
                    slow = getattr(run, name)(*args, where=where)
                assert_same(fast, slow, f"{name}({where!r})")
        assert run.verify().ok


@pytest.mark.slow
def test_a_lost_rollup_part_falls_back_and_index_repairs_it(recorded, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(recorded, out)
    victim = sorted((out / schema.ROLLUP_EXPERT_COUNTS / "rank=0").glob("*.parquet"))[2]
    victim.unlink()  # a writer killed between the routing part and its rollups
    with rs.open_run(out) as run:
        assert rollup_twin(run, "expert_counts", None) is None  # routing answers, still right
        with without_rollups():
            expected = run.expert_load()
        assert_same(run.expert_load(), expected, "expert_load after a lost rollup part")
        verdict = run.verify()
        assert verdict.ok and any(victim.name in note for note in verdict.notes)
    assert main(["index", "--quiet", str(out)]) == 0
    assert victim.exists()
    with rs.open_run(out) as run:
        assert rollup_twin(run, "expert_counts", None) is not None
        assert_same(run.expert_load(), expected, "expert_load after index")


@pytest.mark.slow
def test_check_names_a_rollup_part_that_disagrees_with_routing(recorded, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(recorded, out)
    part = sorted((out / schema.ROLLUP_EXPERT_COUNTS / "rank=0").glob("*.parquet"))[1]
    table = pq.read_table(part)
    tokens = table["tokens"].to_numpy().copy()
    tokens[0] += 1
    pq.write_table(table.set_column(table.schema.get_field_index("tokens"), "tokens", pa.array(tokens)), part)
    assert main(["check", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "rollups_match" in printed and part.name in printed and "routescope index --force" in printed
    assert main(["index", "--force", "--quiet", str(out)]) == 0
    assert main(["check", str(out)]) == 0


def test_index_bad_input_exits_2(tmp_path, capsys):
    assert main(["index", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]


@pytest.mark.slow
def test_the_dashboard_builds_missing_rollups_on_first_open(tmp_path):
    from routescope.dashboard.queries import ALL, step_loads
    from routescope.dashboard.runs import RunRegistry

    rng = np.random.default_rng(5)
    chosen = {ly: np.argsort(rng.random((120, 6)), axis=1)[:, :2] for ly in (0, 1)}
    out = tmp_path / "syn"
    write_run(
        out, chosen, 6, seq_len=12, labels={"domain": ["a", "b"] * 60}, parts=2, step=np.arange(120) // 12
    )
    with rs.open_run(out) as run:
        expected = step_loads(run, ALL)
    registry = RunRegistry([out], build_rollups=True)
    run = open_and_wait_for_rollups(registry)
    with registry._slot("0").lock:
        assert sorted(run.rollups) == sorted(schema.ROLLUP_TABLES)
        pd.testing.assert_frame_equal(step_loads(run, ALL), expected, check_dtype=False)
    registry.close()

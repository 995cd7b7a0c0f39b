"""Rollups of a run on object storage (issue 33 item 1): the writer's rollups and their compaction
on s3://, `routescope index s3://...` building the missing ones (progress shown; a build killed
halfway leaves a readable run that the next build completes), and readers of the s3 run using
them under the same coverage rules as on a local disk, with the same metric values as from
`routing`.

The server is moto in server mode (an S3 emulator, not AWS; tests/s3_server.py) on loopback.
"""

from __future__ import annotations

import time
import warnings

import pytest
import torch

import routescope as rs
from routescope import schema
from routescope.analysis.rollup_build import missing_parts, part_files
from routescope.analysis.rollups import without_rollups
from routescope.cli import main
from tests.s3_server import aws_env, moto_server, storage_options
from tests.test_rollups import assert_same, metric_args, open_and_wait_for_rollups
from tests.tiny_models import build_tiny_model

pytestmark = pytest.mark.slow  # an S3 server and several recordings: seconds

pytest.importorskip("s3fs", reason='object storage needs s3fs: pip install -e ".[s3]"')
pytest.importorskip("moto", reason="the S3-API test server is moto: pip install 'moto[server]'")

BUCKET = "rollups-test"
METRICS = ("expert_load", "balance", "entanglement", "repetition_rate", "specialization", "coactivation")
WHERES = (None, "phase = 'decode'", "domain = 'math'", "step BETWEEN 1 AND 3", "pos > 3")


@pytest.fixture(scope="module")
def s3():
    import s3fs

    with moto_server() as endpoint:
        options = storage_options(endpoint)
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
        fs.call_s3("create_bucket", Bucket=BUCKET)
        yield {"options": options, "endpoint": endpoint, "fs": fs}


def _record(model, out, options, **kwargs) -> None:
    torch.manual_seed(0)
    ids = torch.randint(1, 100, (3, 10))
    with (
        torch.no_grad(),
        rs.record(
            model, out, labels={"domain": "code"}, rows_per_part=1, storage_options=options, **kwargs
        ) as rec,
    ):
        model(input_ids=ids)
        rec.set_labels(domain="math")
        model.generate(
            input_ids=ids[:2, :6], attention_mask=torch.ones(2, 6, dtype=torch.long), max_new_tokens=4
        )


@pytest.fixture(scope="module")
def model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_tiny_model("mixtral", seed=0).eval()


def _keys(s3, uri: str, table: str) -> list[str]:
    s3["fs"].invalidate_cache()
    root = uri.split("://", 1)[1]
    return sorted(k[len(root) + 1 :] for k in s3["fs"].find(f"{root}/{table}"))


def _index(uri: str, endpoint: str, monkeypatch, *extra: str) -> int:
    for key, value in aws_env(endpoint).items():
        monkeypatch.setenv(key, value)
    return main(["index", uri, *extra])


def test_the_writer_writes_and_compacts_rollups_on_s3(s3, model):
    uri = f"s3://{BUCKET}/written"
    _record(model, uri, s3["options"])
    routing = _keys(s3, uri, "routing")
    assert len(routing) > 4
    assert _keys(s3, uri, schema.ROLLUP_EXPERT_COUNTS) == [
        k.replace("routing/", f"{schema.ROLLUP_EXPERT_COUNTS}/") for k in routing
    ]
    # the pair rollups were compacted at close on the object store too: one range part
    last = len(routing) - 1
    assert _keys(s3, uri, schema.ROLLUP_TOP1_PAIRS) == [
        f"{schema.ROLLUP_TOP1_PAIRS}/rank=0/part-00000-{last:05d}.parquet"
    ]
    run = rs.open_run(uri, storage_options=s3["options"])
    assert run.rollups == [schema.ROLLUP_EXPERT_COUNTS, schema.ROLLUP_TOP1_PAIRS]


def test_index_builds_the_missing_rollups_on_s3_and_readers_use_them(s3, model, monkeypatch, capsys):
    uri = f"s3://{BUCKET}/indexed"
    _record(model, uri, s3["options"])
    before = missing_parts(part_files(rs.open_run(uri, storage_options=s3["options"])))
    assert before[schema.ROLLUP_REPETITION] and before[schema.ROLLUP_COACTIVATION]
    assert not before[schema.ROLLUP_EXPERT_COUNTS]

    assert _index(uri, s3["endpoint"], monkeypatch) == 0
    captured = capsys.readouterr()
    assert "rollups:" in captured.err and "100%" in captured.err  # the progress bar
    assert "rollup_repetition:" in captured.out
    run = rs.open_run(uri, storage_options=s3["options"])
    assert not any(missing_parts(part_files(run)).values())
    assert run.rollups == list(schema.ROLLUP_TABLES)
    assert not any(".tmp" in k for k in s3["fs"].find(f"{BUCKET}/indexed"))
    assert len(_keys(s3, uri, schema.ROLLUP_COACTIVATION)) == 1  # compacted into one range part

    for name in METRICS:
        for where in WHERES:
            fast = getattr(run, name)(*metric_args(run, name), where=where)
            with without_rollups():
                slow = getattr(run, name)(*metric_args(run, name), where=where)
            assert len(slow) > 0
            assert_same(fast, slow, f"{name}(where={where!r}) on s3")
    # a second index finds nothing to do
    assert _index(uri, s3["endpoint"], monkeypatch, "--quiet") == 0
    assert "rollups up to date" in capsys.readouterr().out


def test_a_build_killed_halfway_leaves_a_readable_run_that_the_next_build_completes(s3, model):
    uri = f"s3://{BUCKET}/killed"
    _record(model, uri, s3["options"])
    run = rs.open_run(uri, storage_options=s3["options"])
    expected = {name: getattr(run, name)(*metric_args(run, name)) for name in METRICS}

    def killed(items, total, desc):
        for i, item in enumerate(items):
            if i == 2:
                raise KeyboardInterrupt  # the build stops between two PUTs
            yield item

    with pytest.raises(KeyboardInterrupt):
        run.build_rollups(force=True, progress=killed)
    run = rs.open_run(uri, storage_options=s3["options"])
    # the tables whose parts were removed for the rebuild do not cover the run: no view, routing answers
    assert schema.ROLLUP_EXPERT_COUNTS not in run.rollups
    for name in METRICS:
        assert_same(getattr(run, name)(*metric_args(run, name)), expected[name], f"{name} after a kill")
    written = run.build_rollups()
    assert written[schema.ROLLUP_EXPERT_COUNTS] > 0
    assert run.rollups == list(schema.ROLLUP_TABLES)
    for name in METRICS:
        assert_same(getattr(run, name)(*metric_args(run, name)), expected[name], f"{name} rebuilt")


def test_a_rollup_older_than_its_routing_part_is_not_used_on_s3(s3, model):
    """The coverage rule of a local run, on object times: a routing part stored again after its
    rollup (a rewrite) makes the rollup stale until `index` rebuilds it."""
    uri = f"s3://{BUCKET}/stale"
    _record(model, uri, s3["options"])
    run = rs.open_run(uri, storage_options=s3["options"])
    assert schema.ROLLUP_EXPERT_COUNTS in run.rollups
    fs, key = s3["fs"], f"{BUCKET}/stale/routing/rank=0/part-00001.parquet"
    time.sleep(1.1)  # S3 object times have one-second resolution
    fs.pipe_file(key, fs.cat_file(key))
    fs.invalidate_cache()
    run = rs.open_run(uri, storage_options=s3["options"])
    assert schema.ROLLUP_EXPERT_COUNTS not in run.rollups
    assert missing_parts(part_files(run))[schema.ROLLUP_EXPERT_COUNTS] == ["rank=0/part-00001.parquet"]
    run.build_rollups()
    assert schema.ROLLUP_EXPERT_COUNTS in rs.open_run(uri, storage_options=s3["options"]).rollups


def test_the_dashboard_builds_missing_rollups_of_an_s3_run_on_first_open(s3, model, monkeypatch):
    """`routescope dashboard s3://...` builds what `routescope index` would, on the first open,
    with the environment's credentials; the pages then read the rollups, with the same values."""
    from routescope.dashboard.runs import RunRegistry

    uri = f"s3://{BUCKET}/dashboard"
    _record(model, uri, s3["options"])
    for key, value in aws_env(s3["endpoint"]).items():
        monkeypatch.setenv(key, value)
    assert missing_parts(part_files(rs.open_run(uri)))[schema.ROLLUP_REPETITION]
    registry = RunRegistry([uri], build_rollups=True)
    run = open_and_wait_for_rollups(registry)
    assert not any(missing_parts(part_files(rs.open_run(uri))).values())
    with registry._slot("0").lock:
        assert run.rollups == list(schema.ROLLUP_TABLES)  # the served run's views were refreshed
        for name in ("repetition_rate", "coactivation"):
            fast = getattr(run, name)(*metric_args(run, name))
            with without_rollups():
                slow = getattr(run, name)(*metric_args(run, name))
            assert_same(fast, slow, f"{name} on s3 after the dashboard built the rollups")
    registry.close()


def test_check_compares_the_rollups_of_an_s3_run_with_its_parts(s3, model, monkeypatch, capsys):
    """`routescope check s3://...` reads each rollup part against its routing part on the object
    store: a run as recorded passes, a rollup part holding another part's counts fails and the
    message names the part and the fix."""
    uri = f"s3://{BUCKET}/checked"
    _record(model, uri, s3["options"])
    for key, value in aws_env(s3["endpoint"]).items():
        monkeypatch.setenv(key, value)
    assert main(["check", uri]) == 0
    assert "match their counts" in capsys.readouterr().out

    fs, table = s3["fs"], f"{BUCKET}/checked/{schema.ROLLUP_EXPERT_COUNTS}/rank=0"
    fs.pipe_file(f"{table}/part-00001.parquet", fs.cat_file(f"{table}/part-00000.parquet"))
    fs.invalidate_cache()
    assert main(["check", uri]) == 1
    out = capsys.readouterr().out
    assert "disagree with routing (rank=0/part-00001.parquet" in out
    assert "routescope index --force RUN" in out

"""Runs on object storage: record a tiny model straight to an S3-API server and read it back equal
to the same recording on the local disk; an upload interrupted mid-part leaves a readable run;
one writer per run through the conditional-create lock object; an append after a writer
that stopped early continues from its parts; the CLI (report, check, compare, placement) and
the dashboard's run registry read an s3:// run.

The server is moto in server mode (an S3 emulator, not AWS), started by this module on
127.0.0.1 and spoken to over loopback with s3fs, as a real bucket would be.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

import routescope as rs
from routescope.errors import RunBusyError
from tests.s3_server import moto_server, storage_options
from tests.tiny_models import build_tiny_model

pytestmark = pytest.mark.slow  # README's test command leaves this file out (-m 'not slow')

pytest.importorskip("s3fs", reason='object storage needs s3fs: pip install -e ".[s3]"')
pytest.importorskip("moto", reason="the S3-API test server is moto: pip install 'moto[server]'")

BUCKET = "routescope-test"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def s3():
    """An S3-API server (moto) on loopback with one bucket; yields the fsspec storage options."""
    import s3fs

    with moto_server() as endpoint:
        options = storage_options(endpoint)
        s3fs.S3FileSystem(skip_instance_cache=True, **options).call_s3("create_bucket", Bucket=BUCKET)
        yield {"options": options, "endpoint": endpoint}


def _batches():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(1, 100, (3, 12), generator=gen) for _ in range(3)]


def _record(model, out, **options):
    with rs.record(model, out, labels={"domain": "code"}, rows_per_part=50, **options) as rec:
        for i, ids in enumerate(_batches()):
            rec.set_labels(domain="code" if i % 2 == 0 else "math")
            model(input_ids=ids)


def _rows(run) -> pd.DataFrame:
    return run.sql(
        "SELECT t.seq_id, t.pos, t.token_id, t.step, t.phase, t.domain, r.layer, r.slot, r.expert, r.weight "
        "FROM routing r JOIN tokens t USING (seq_id, pos) ORDER BY t.seq_id, t.pos, r.layer, r.slot"
    )


@pytest.fixture(scope="module")
def recorded(s3, tmp_path_factory):
    torch.manual_seed(0)
    model = build_tiny_model("mixtral")
    local = tmp_path_factory.mktemp("local") / "run"
    uri = f"s3://{BUCKET}/runs/tiny"
    with torch.no_grad():
        _record(model, local)
        _record(model, uri, storage_options=s3["options"])
    return local, uri


def test_a_run_recorded_to_s3_reads_back_equal_to_a_local_one(s3, recorded):
    local, uri = recorded
    with (
        rs.open_run(local) as a,
        rs.open_run(uri, storage_options=s3["options"]) as b,
        rs.open_run(f"file://{local}") as c,  # a file:// URI is the local disk
    ):
        assert b.manifest["complete"] and b.manifest["tokens"] == a.manifest["tokens"] == 108
        assert len(b.store.list_parts("routing")) > 1  # several parts, all on the server
        pd.testing.assert_frame_equal(_rows(a), _rows(b))
        for call in (lambda r: r.balance(), lambda r: r.specialization("domain"), lambda r: r.entanglement()):
            pd.testing.assert_frame_equal(call(a), call(b))
        pd.testing.assert_frame_equal(_rows(a), _rows(c))


def test_runs_on_s3_and_on_disk_read_as_one(s3, recorded):
    local, uri = recorded
    with (
        rs.open_run(local) as one,
        rs.open_runs([uri, local], storage_options=s3["options"]) as both,
        rs.open_runs(f"s3://{BUCKET}/runs/tin*", storage_options=s3["options"]) as globbed,
    ):
        assert both.manifest["tokens"] == 216 and [r["run"] for r in both.manifest["runs"]] == ["tiny", "run"]
        per_run = both.sql("SELECT run, count(*) AS n FROM routing GROUP BY run ORDER BY run")
        assert per_run["n"].tolist() == [108 * 4, 108 * 4]  # 2 MoE layers x top-2 per token
        doubled = one.expert_load().assign(tokens=lambda d: d.tokens * 2)
        pd.testing.assert_frame_equal(both.expert_load(), doubled)
        assert globbed.manifest["runs"][0]["run"] == "tiny"
        pd.testing.assert_frame_equal(globbed.balance(), one.balance())


def test_an_upload_interrupted_mid_part_leaves_a_readable_run(s3, recorded):
    """A writer killed while uploading its next part leaves an unfinished multipart upload, which
    the store never shows as an object: the run reads as before."""
    _local, uri = recorded
    with rs.open_run(uri, storage_options=s3["options"]) as run:
        before = _rows(run)
        fs, prefix = run.store.fs, run.store.root
    key = f"{prefix.split('/', 1)[1]}/routing/rank=0/part-99999.parquet"
    upload = fs.call_s3("create_multipart_upload", Bucket=BUCKET, Key=key)
    fs.call_s3(
        "upload_part",
        Bucket=BUCKET,
        Key=key,
        UploadId=upload["UploadId"],
        PartNumber=1,
        Body=b"PAR1" + b"x" * 1024,
    )
    fs.invalidate_cache()
    with rs.open_run(uri, storage_options=s3["options"]) as run:
        assert not run.skipped
        pd.testing.assert_frame_equal(before, _rows(run))


def test_a_writer_killed_while_recording_to_s3_leaves_a_readable_run(s3):
    """SIGKILL (no handler runs, no upload completes) while a process records to the server."""
    uri = f"s3://{BUCKET}/runs/killed"
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        import routescope as rs
        from tests.tiny_models import build_tiny_model
        model = build_tiny_model("mixtral")
        ids = torch.randint(1, 100, (2, 8))
        with rs.record(model, {uri!r}, storage_options={s3["options"]!r}) as rec:
            for i in range(100000):
                model(input_ids=ids)
                if i < 3:
                    rec.flush()
                if i == 3:
                    print("ready", flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    with rs.open_run(uri, storage_options=s3["options"]) as run:
        assert run.complete is False and not run.skipped
        tokens = int(run.sql("SELECT count(*) AS n FROM tokens").n[0])
        assert tokens >= 3 * 16 and tokens == run.manifest["tokens"]
        assert int(run.sql("SELECT count(*) AS n FROM routing").n[0]) == tokens * 2 * 2
        holder = run.store.read_json(".lock")  # the dead writer's lock object stays until its lease ends
        assert holder["pid"] == proc.pid
        notes = run.verify().notes  # check names the lock object left behind, and the incomplete manifest
        assert any(f"writer lock .lock names pid {proc.pid}" in note for note in notes), notes


def test_one_writer_at_a_time_on_object_storage(s3):
    from routescope.store.remote import ObjectLock, RemoteRunDirectory

    uri = f"s3://{BUCKET}/runs/locked"
    first = RemoteRunDirectory(uri, storage_options=s3["options"])
    first.prepare("create", [1])
    second = RemoteRunDirectory(uri, storage_options=s3["options"])
    with pytest.raises(RunBusyError, match="is being written by pid"):
        second.prepare("append", [1])
    first.close()
    second.lock()
    second.close()
    # an idle holder keeps its lock: the lease is renewed while it is held
    idle = ObjectLock(first.store, ".lock", lease=1.0)
    idle.acquire()
    time.sleep(1.5)
    with pytest.raises(RunBusyError):
        ObjectLock(first.store, ".lock", lease=1.0).acquire(wait=False)
    idle.release()
    # a holder that stopped without releasing: its lease runs out and the next writer takes over
    stale = ObjectLock(first.store, ".lock", lease=-1.0)
    stale.acquire()
    with pytest.warns(RuntimeWarning, match="lease ran out"):
        assert RemoteRunDirectory(uri, storage_options=s3["options"]).lock() is not None


@pytest.fixture
def aws_env(s3, monkeypatch):
    """Credentials and endpoint from the environment, as the CLI and the dashboard reach a bucket."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3["endpoint"])


def test_the_report_command_reads_an_s3_run(recorded, aws_env, capsys):
    from routescope.cli import main

    _, uri = recorded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["report", uri, "--json"]) == 0
    assert '"tokens": 108' in capsys.readouterr().out


def test_check_reads_an_s3_run_and_finds_a_planted_duplicate_part(s3, recorded, aws_env, capsys):
    from routescope.cli import main

    _, uri = recorded
    with rs.open_run(uri, storage_options=s3["options"]) as run:
        result = run.verify()
        fs, root = run.store.fs, run.store.root
    assert result.ok, str(result)
    assert result.path == uri and len(result.findings) == 9  # + rollups_match
    assert main(["check", uri]) == 0
    assert "every invariant holds" in capsys.readouterr().out
    # the same run under another prefix, with a tokens and a routing part stored twice
    dup = f"s3://{BUCKET}/runs/duplicated"
    fs.copy(root, dup[len("s3://") :], recursive=True)
    for table in ("tokens", "routing"):
        part = f"{dup[len('s3://') :]}/{table}/rank=0/part-00000.parquet"
        fs.pipe_file(part.replace("part-00000", "part-09999"), fs.cat_file(part))
    fs.invalidate_cache()
    assert main(["check", dup]) == 1
    out = capsys.readouterr().out
    assert "FAIL  unique_token_keys" in out and "FAIL  unique_routing_keys" in out
    assert "FAIL  manifest_counts" in out and f"{dup}: " in out
    assert main(["check", f"s3://{BUCKET}/runs/no-such-run"]) == 2
    assert "nothing is stored under that prefix" in capsys.readouterr().err


def test_compare_and_placement_commands_read_an_s3_run(recorded, aws_env, capsys):
    from routescope.cli import main

    local, uri = recorded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["compare", uri, str(local), "--json"]) == 0
        compared = capsys.readouterr().out
        assert main(["placement", uri, "--ep-size", "2", "--json"]) == 0
        placed = capsys.readouterr().out
        assert main(["placement", str(local), "--ep-size", "2", "--json"]) == 0
    assert compared.strip() and placed.strip() == capsys.readouterr().out.strip()


def test_the_dashboard_serves_an_s3_run(recorded, aws_env):
    from routescope.dashboard import runs as registry_module
    from routescope.dashboard.app import create_app
    from routescope.dashboard.command import check_runs
    from routescope.dashboard.pages import overview

    _, uri = recorded
    assert check_runs([uri]) is None
    assert "nothing is stored under that prefix" in check_runs([f"s3://{BUCKET}/runs/none"])
    before = registry_module._CURRENT
    try:
        app = create_app([uri])
        registry = registry_module.get_registry()
        assert registry.options() == [{"label": "0: tiny", "value": "0"}]
        _summary, layers_view, _fig, _alerts, msg, verdict = overview.update_overview(
            {"run": "0", "version": None}
        )
        assert msg is None and verdict is not None
        health = layers_view.children[0].figure.data[0]  # the layers x metric view: both MoE layers
        assert len(health.y) == 2
        assert registry.run("0").manifest["tokens"] == 108
        assert app.server.test_client().get("/").status_code == 200
    finally:
        registry_module.get_registry().close()
        registry_module._CURRENT = before


def test_an_append_after_an_incomplete_writer_on_s3_continues_from_its_parts(s3):
    """As on a local disk (tests/test_concurrent_writers.py): a manifest left behind its parts
    (a writer killed between a flush's parts and its manifest update) must not make the next
    writer hand out the parts' seq ids again."""
    from routescope.store.remote import ObjectStore

    torch.manual_seed(0)
    model = build_tiny_model("mixtral")
    uri, options = f"s3://{BUCKET}/runs/appended", s3["options"]
    ids = torch.randint(1, 100, (2, 6))
    with rs.record(model, uri, storage_options=options) as rec, torch.no_grad():
        model(input_ids=ids)
        rec.flush()
        stale = dict(rec.manifest)  # the manifest after the first flush ...
        model(input_ids=ids)  # ... and a second flush whose manifest update never happened
    store = ObjectStore(uri, options)
    store.put(store.key("manifest.json"), json.dumps({**stale, "complete": False}).encode())
    with pytest.warns(RuntimeWarning, match="continuing from the parts"):
        with rs.record(model, uri, mode="append", storage_options=options), torch.no_grad():
            model(input_ids=ids)
    with rs.open_run(uri, storage_options=options) as run:
        rows = run.sql("SELECT count(*) AS n, count(DISTINCT (seq_id, pos)) AS k FROM tokens").iloc[0]
        assert rows.n == rows.k == 36 == run.manifest["tokens"] and run.complete
        result = run.verify()
        assert result.ok, str(result)

"""Issue 38 item 1: a damaged run is never reported as if healthy.

The issue's reproduction, on a real recorded run: copy one tokens part and one routing part
under new names. `routescope check` fails (the full check); `rs.open_run` warns, `report`
prints a DAMAGED RUN banner and the dashboard a red message, each naming `routescope check`,
from `Run.quick_check()`, which reads footers and manifests only.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pyarrow.parquet as pq
import pytest
import torch

import routescope as rs
from routescope.analysis.quick_check import quick_check
from routescope.cli import main


@pytest.fixture
def healthy(tiny_model, tmp_path):
    model = tiny_model("mixtral")
    out = tmp_path / "run"
    with rs.record(model, out) as rec, torch.no_grad():
        for seed in range(3):
            torch.manual_seed(seed)
            model(input_ids=torch.randint(1, 100, (2, 5)))
            rec.flush()
    return out


def copy_parts(run) -> None:
    for table in ("tokens", "routing"):
        part = sorted((run / table / "rank=0").glob("part-*.parquet"))[0]
        shutil.copy(part, part.with_name("part-00900.parquet"))


def test_healthy_run_has_no_damage(healthy) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all on a healthy run
        run = rs.open_run(healthy)
    assert run.damage == [] and run.quick_check() == []
    assert len(list((healthy / "tokens" / "rank=0").glob("part-*.parquet"))) >= 2  # several real parts


@pytest.mark.slow
def test_copied_parts_are_found_by_open_run_report_and_dashboard(healthy, capsys) -> None:
    copy_parts(healthy)
    assert main(["check", str(healthy)]) == 1  # the full check agrees
    capsys.readouterr()
    with pytest.warns(RuntimeWarning, match="looks damaged.*routescope check"):
        run = rs.open_run(healthy)
    names = " ".join(run.damage)
    assert "tokens/rank=0/part-00900.parquet holds the same rows as tokens/rank=0/part-00000" in names
    assert "routing/rank=0/part-00900.parquet" in names
    assert "manifest counts 30 tokens" in names and "40 rows" in names  # 3 x 10 recorded, 10 copied

    assert main(["report", str(healthy)]) == 0
    captured = capsys.readouterr()
    assert "DAMAGED RUN" in captured.out and f"routescope check {healthy}" in captured.out
    assert "looks damaged" in captured.err  # the open_run warning, one line
    assert main(["report", str(healthy), "--html", str(healthy.parent / "r.html")]) == 0
    capsys.readouterr()
    page = (healthy.parent / "r.html").read_text(encoding="utf-8")
    assert "DAMAGED RUN" in page and "routescope check" in page
    assert main(["report", str(healthy), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert any("same rows" in p for p in doc["run"]["damage"])

    from routescope.dashboard.app import create_app, update_run_state

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        create_app([healthy])
        _data, status, _ = update_run_state("0", 0)
    text = str(status.children)
    assert "DAMAGED RUN" in text and "routescope check" in text and "rs-error" in status.className


@pytest.mark.slow
def test_manifest_count_that_disagrees_with_the_parts(healthy) -> None:
    manifest = json.loads((healthy / "manifest.json").read_text())
    manifest["tokens"] = 25
    (healthy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(RuntimeWarning, match="looks damaged"):
        run = rs.open_run(healthy)
    assert run.damage == ["rank 0's tokens parts hold 30 rows but its manifest counts 25 tokens"]
    manifest.update(tokens=30, complete=False)  # while a run is written, parts may lead: not judged
    manifest["tokens"] = 20
    (healthy / "manifest.json").write_text(json.dumps(manifest))
    assert quick_check(rs.open_run(healthy)) == []


def test_quick_check_reads_footers_only(healthy, monkeypatch) -> None:
    """Cheap: no row of any part is read (pyarrow's row readers are not called)."""
    run = rs.open_run(healthy)

    def refuse(*args, **kwargs):
        raise AssertionError("quick_check read rows")

    monkeypatch.setattr(pq, "read_table", refuse)
    monkeypatch.setattr(pq.ParquetFile, "read", refuse)
    copy_parts(healthy)
    assert len(run.quick_check()) == 3

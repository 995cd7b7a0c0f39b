"""`routescope profile` and `routescope demo` on the bundled model, and their bad-input exits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import routescope as rs
from routescope.cli import main

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample.jsonl"


@pytest.fixture
def corpus_slice(tmp_path) -> Path:
    """Three records of each domain of the bundled held-out corpus."""
    rows, seen = [], {}
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if seen.get(row["domain"], 0) < 3:
            seen[row["domain"]] = seen.get(row["domain"], 0) + 1
            rows.append(row)
    path = tmp_path / "slice.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return path


@pytest.mark.slow
def test_profile_writes_a_labelled_run(corpus_slice, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        ["profile", "--data", str(corpus_slice), "--out", str(out), "--max-length", "32", "--batch-size", "4"]
    )
    assert code == 0, capsys.readouterr().err
    run = rs.open_run(out)
    assert run.complete and run.manifest["model_type"] == "qwen3_moe"
    assert run.labels == ["domain"]
    counts = run.sql("SELECT domain, count(DISTINCT seq_id) AS n FROM tokens GROUP BY 1 ORDER BY 1")
    assert counts.domain.tolist() == ["code", "math", "multilingual", "prose"]
    assert (counts.n == 3).all()
    assert run.has_table("router_stats")
    assert "recorded" in capsys.readouterr().out


@pytest.mark.slow
def test_profile_generate_mode_records_decode_steps(corpus_slice, tmp_path):
    out = tmp_path / "run"
    args = [
        "profile",
        "--data",
        str(corpus_slice),
        "--out",
        str(out),
        "--max-length",
        "16",
        "--generate",
        "3",
    ]
    assert main([*args, "--batch-size", "6"]) == 0
    phases = rs.open_run(out).sql("SELECT phase, count(*) AS n FROM tokens GROUP BY 1 ORDER BY 1")
    assert phases.phase.tolist() == ["decode", "prefill"]


@pytest.mark.slow
def test_demo_without_dashboard(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--per-domain", "2", "--no-dashboard", "--no-super-experts"])
    assert code == 0, capsys.readouterr().err
    assert "Balance per MoE layer" in capsys.readouterr().out
    assert rs.open_run(out).sql("SELECT count(DISTINCT domain) AS n FROM tokens").n[0] == 4


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda d: ["--model", str(d / "no-model"), "--data", str(SAMPLE)],
            "model path .*no-model does not exist",
        ),
        (lambda d: (d / "empty").mkdir() or ["--data", str(d / "empty")], "holds no .txt"),
        (
            lambda d: (
                (d / "a.jsonl").write_text('{"text": "x"}\n{"body": 1}\n') and ["--data", str(d / "a.jsonl")]
            ),
            r"a\.jsonl:2: no 'text' field",
        ),
        (
            lambda d: (
                (d / "b.jsonl").write_text('{"text": "x", "domain": 7}\n') and ["--data", str(d / "b.jsonl")]
            ),
            r"b\.jsonl:1: label field 'domain' must be a string",
        ),
        (lambda d: ["--data", str(SAMPLE), "--batch-size", "0"], "--batch-size must be at least 1"),
    ],
)
def test_profile_bad_input_exits_2_with_one_line(make, message, tmp_path, capsys):
    import re

    code = main(["profile", *make(tmp_path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_profile_append_max_tokens_and_the_existing_run_hint(corpus_slice, tmp_path, capsys):
    out = tmp_path / "run"
    base = [
        "profile",
        "--data",
        str(corpus_slice),
        "--out",
        str(out),
        "--max-length",
        "16",
        "--batch-size",
        "3",
    ]
    assert main([*base, "--max-tokens", "10"]) == 0
    captured = capsys.readouterr()
    assert "--max-tokens 10 reached" in captured.out + captured.err
    first = rs.open_run(out).manifest["tokens"]
    assert main(base) == 2  # an existing run: the hint names options that exist
    err = capsys.readouterr().err
    assert "--append" in err and "--overwrite" in err
    assert main([*base, "--append"]) == 0
    run = rs.open_run(out)
    assert run.manifest["tokens"] > first
    assert run.sql("SELECT count(*) - count(DISTINCT (seq_id, pos)) AS d FROM tokens").d[0] == 0
    assert main([*base, "--append", "--overwrite"]) == 2


def test_profile_model_that_is_a_run_directory_says_so(corpus_slice, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["profile", "--data", str(corpus_slice), "--out", str(run), "--max-length", "8"]) == 0
    capsys.readouterr()
    assert (
        main(["profile", "--model", str(run), "--data", str(corpus_slice), "--out", str(tmp_path / "b")]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a routescope run directory, not a model" in err
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_profile_into_an_existing_run_refuses_before_loading_the_model(tmp_path, capsys):
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text("{}", encoding="utf-8")
    # a model path that does not exist: refusing the output first never reaches the model
    code = main(["profile", "--model", str(tmp_path / "no-model"), "--out", str(run)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "already holds a routescope run" in err and "--append" in err
    check = "import sys, routescope.cli as c; c.main(sys.argv[1:]); print('torch' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", check, "profile", "--out", str(run)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.strip() == "False", done.stderr  # no model (nor torch) was loaded

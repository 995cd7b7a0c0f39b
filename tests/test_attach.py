"""`routescope run --out RUN -- python script.py`: records a script's MoE models without changing it.

The scripts below are plain transformers code that loads the bundled model (data/model); the
child processes are real Python processes started by the command.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import routescope as rs
from routescope.commands.attach import SITE_DIR, parse_labels, recorded_runs
from routescope.commands.inputs import bundled_model

TEXTS = ["def add(a, b):\n    return a + b", "The cat sat on the mat and"]
GENERATE = """
import sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(1)
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path, padding_side="left")
model = AutoModelForCausalLM.from_pretrained(path).eval()
batch = tok({texts!r}, return_tensors="pt", padding=True)
out = model.generate(**batch, max_new_tokens=4, do_sample=False)
print("generated", tuple(out.shape))
{tail}
"""


def routescope_run(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """The real command line, in a fresh process (as a user types it)."""
    base = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "routescope.cli", "run", *args]
    return subprocess.run(cmd, cwd=cwd, env=base, capture_output=True, text=True, timeout=600)


def write_script(tmp_path: Path, tail: str = "") -> Path:
    script = tmp_path / "script.py"
    script.write_text(GENERATE.format(texts=TEXTS, tail=textwrap.dedent(tail)), encoding="utf-8")
    return script


@pytest.mark.slow
def test_run_records_every_moe_model_the_script_loads(tmp_path: Path):
    # the script loads the model twice; a sitecustomize of the user's own must still run
    user_site = tmp_path / "user_site"
    user_site.mkdir()
    marker = tmp_path / "user_sitecustomize_ran"
    (user_site / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').close()\n", encoding="utf-8")
    tail = """
    second = AutoModelForCausalLM.from_pretrained(path).eval()
    second(**batch)
    """
    script = write_script(tmp_path, tail)
    out = tmp_path / "runs" / "demo"
    model_dir = str(bundled_model())
    result = routescope_run(
        [
            "--out",
            str(out),
            "--labels",
            "domain=mixed,split=test",
            "--",
            sys.executable,
            str(script),
            model_dir,
        ],
        cwd=tmp_path,
        env={"PYTHONPATH": str(user_site)},
    )
    assert result.returncode == 0, result.stderr
    assert "generated (2," in result.stdout
    assert marker.exists(), "the user's sitecustomize was shadowed"
    assert recorded_runs(out) == [out, out.parent / "demo-2"]

    with rs.open_run(out) as run:
        assert run.complete and run.manifest["model_type"] == "qwen3_moe"
        assert run.labels == ["domain", "split"]
        phases = run.sql(
            "SELECT phase, count(DISTINCT step) AS steps FROM tokens GROUP BY phase ORDER BY phase"
        )
        assert phases.to_dict("list") == {"phase": ["decode", "prefill"], "steps": [3, 1]}
        assert run.sql("SELECT DISTINCT domain, split FROM tokens").values.tolist() == [["mixed", "test"]]
        recorded = run.sql("SELECT seq_id, pos, layer, slot, expert, weight FROM routing ORDER BY ALL")
    with rs.open_run(out.parent / "demo-2") as second:
        assert second.complete
        assert second.sql("SELECT DISTINCT phase FROM tokens").phase.tolist() == ["prefill"]

    # the same generate recorded in-process with rs.record gives the same routing, exactly
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad(), rs.record(model, tmp_path / "direct"):
        model.generate(**batch, max_new_tokens=4, do_sample=False)
    with rs.open_run(tmp_path / "direct") as direct:
        expected = direct.sql("SELECT seq_id, pos, layer, slot, expert, weight FROM routing ORDER BY ALL")
    assert len(recorded) == len(expected) > 0
    assert recorded.equals(expected)


@pytest.mark.slow
def test_a_crashing_script_leaves_an_incomplete_run_and_its_exit_code(tmp_path: Path):
    script = write_script(tmp_path, 'raise RuntimeError("script failed after generate")')
    out = tmp_path / "crash"
    result = routescope_run(
        ["--out", str(out), "--", sys.executable, str(script), str(bundled_model())], tmp_path
    )
    assert result.returncode == 1
    assert "script failed after generate" in result.stderr
    with rs.open_run(out) as run:
        assert not run.complete
        assert int(run.sql("SELECT count(*) AS n FROM tokens").n[0]) > 0  # what was recorded is kept


@pytest.mark.slow
def test_a_script_without_moe_model_records_nothing_and_keeps_its_exit_code(tmp_path: Path):
    result = routescope_run(
        ["--out", str(tmp_path / "none"), "--", sys.executable, "-c", "raise SystemExit(3)"], tmp_path
    )
    assert result.returncode == 3
    assert "nothing recorded" in result.stderr
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            [
                "--out",
                "r",
                "--",
            ],
            "no command to run",
        ),
        (["--out", "r", "--labels", "domain", "--", "python", "-c", "0"], "use name=value"),
        (["--out", "r", "--labels", "step=1", "--", "python", "-c", "0"], "reserved"),
        (["--out", "r", "--", "no-such-program-xyz"], "command not found"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message, tmp_path: Path):
    from routescope.cli import main

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["run", *args])
    finally:
        os.chdir(cwd)
    assert code == 2
    assert message in err.getvalue()


@pytest.mark.slow
def test_labels_parse_and_site_dir_holds_the_hook():
    assert parse_labels(["a=1,b=2", "c=x=y"]) == {"a": "1", "b": "2", "c": "x=y"}
    assert (SITE_DIR / "sitecustomize.py").is_file()

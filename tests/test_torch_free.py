"""Reading a run needs no torch: `import routescope`, `rs.open_run`, every metric, `rs.compare`,
`routescope report` / `compare` and the dashboard's queries run in a fresh interpreter
that never imports torch. The runs are recorded here, in the test process, from a real
tiny model; the reading happens in a subprocess so that this process's torch does not count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import routescope as rs

REPO = Path(__file__).resolve().parent.parent

# Run in a fresh interpreter: argv[1:] = run A, run B. Prints one JSON line: what it called,
# and the heavy modules found in sys.modules afterwards.
READER = r"""
import inspect, json, sys
import routescope as rs
from routescope.analysis.metrics import METRICS

run_a, run_b = sys.argv[1:3]
called = []
with rs.open_run(run_a) as run:
    layers, labels = run.moe_layers, run.labels
    values = {"layer": layers[0], "next_layer": layers[1], "by": labels[0]}
    for name, metric in METRICS.items():
        params = inspect.signature(metric).parameters.values()
        needed = [p.name for p in params if p.default is inspect.Parameter.empty][1:]
        df = getattr(run, name)(**{p: values[p] for p in needed})
        assert len(df.columns), f"{name} returned no columns"
        called.append(name)
    assert len(run.balance(where="phase = 'prefill'")) == len(layers)
    assert run.expert_load()["tokens"].sum() == run.manifest["tokens"] * sum(map(run.top_k, layers))
    if run.has_table("expert_activations"):
        classified = rs.classify_super_experts(run.expert_activations(), run.manifest["num_hidden_layers"])
        assert "is_super" in classified.columns
        called.append("classify_super_experts")
    import routescope.dashboard.queries as dq
    assert dq.summary(run)["tokens"] == run.manifest["tokens"]
    called.append("dashboard.queries")
    assert {"severity", "finding", "evidence", "sql"} <= set(run.doctor().columns)
    called.append("doctor")
result = rs.compare(run_a, run_b)
assert len(result.saturation) == len(layers)
called.append("compare")
if "--cli" in sys.argv:
    import contextlib, io
    from routescope.cli import main
    commands = {"cli report": ["report", run_a], "cli report --json": ["report", run_a, "--json"],
                "cli compare": ["compare", run_a, run_b], "cli check": ["check", run_a]}
    for name, argv in commands.items():
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert main(argv) == 0, argv
        assert out.getvalue().strip(), argv
        called.append(name)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["doctor", run_a]) in (0, 1, 3)  # healthy, warnings, critical: not bad input
    assert "DOCTOR" in out.getvalue()
    called.append("cli doctor")
heavy = sorted(m for m in ("torch", "transformers", "accelerate", "safetensors") if m in sys.modules)
print(json.dumps({"called": called, "heavy": heavy}))
"""


def _record(model: torch.nn.Module, out: Path, seed: int) -> Path:
    gen = torch.Generator().manual_seed(seed)
    with rs.record(model, out, labels={"domain": "code"}, router_stats=True) as rec, torch.no_grad():
        model(input_ids=torch.randint(1, 100, (2, 10), generator=gen))
        rec.set_labels(domain="math")
        model(input_ids=torch.randint(1, 100, (2, 10), generator=gen))
    return out


def _read_in_fresh_interpreter(*args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", READER, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_reading_a_run_never_imports_torch(tiny_model, tmp_path: Path):
    from routescope.analysis.metrics import METRICS

    model = tiny_model("qwen3_moe")
    run_a = _record(model, tmp_path / "a", seed=0)
    run_b = _record(model, tmp_path / "b", seed=0)  # same tokens: saturation has matches
    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(1, 100, (2, 12), generator=gen)} for _ in range(2)]
    rs.find_super_experts(model, batches, out=run_a, progress=False)  # + expert_activations, hidden_stats
    result = _read_in_fresh_interpreter(str(run_a), str(run_b), "--cli")
    assert result["heavy"] == [], f"reading imported {result['heavy']}"
    assert set(METRICS) <= set(result["called"])
    expected = {"classify_super_experts", "dashboard.queries", "compare", "doctor"}
    expected |= {"cli report", "cli report --json", "cli compare", "cli check", "cli doctor"}
    assert expected <= set(result["called"])


@pytest.mark.slow
def test_import_routescope_is_torch_free_and_capture_names_still_resolve():
    code = (
        "import sys, routescope as rs; assert 'torch' not in sys.modules, 'import routescope loaded torch';"
        "names = [rs.record, rs.Recorder, rs.RunExistsError, rs.RunBusyError, rs.find_routers, rs.find_super_experts,"
        " rs.classify_super_experts, rs.prune_experts];"
        "from routescope.capture import RouterSite, record;"
        "assert record is rs.record; print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "True"  # the capture names do load torch, on first use


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'recorder_of_nothing'"):
        rs.recorder_of_nothing  # noqa: B018
    assert set(rs.__all__) <= set(dir(rs))

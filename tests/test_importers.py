"""Importers in general: the CLI command, overwrite rules, the manifest, no torch import when reading.

Engine layouts are tested in tests/test_importers_sglang.py and tests/test_importers_vllm.py,
bad input in tests/test_importers_bad_input.py.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import routescope as rs
from routescope.commands.import_run import main as import_main
from routescope.importers import build_manifest
from routescope.importers.vllm import import_vllm


def routed(tokens, layers=3, k=2, seed=0):
    rng = np.random.default_rng(seed)
    return (
        np.stack([rng.permutation(8)[:k] for _ in range(tokens * layers)])
        .reshape(tokens, layers, k)
        .astype(np.int32)
    )


@pytest.mark.slow
def test_registered_cli_command_and_overwrite(tmp_path, capsys):
    from routescope import cli

    np.save(tmp_path / "routed.npy", routed(5))
    out = tmp_path / "run"
    argv = ["import", "vllm", str(tmp_path / "routed.npy"), "--out", str(out)]
    assert cli.main(argv) == 0
    with rs.open_run(out) as run:
        assert run.manifest["tokens"] == 5
        assert run.manifest["imported_from"]["engine"] == "vllm"
    assert cli.main(argv) == 2  # a run is there; --overwrite replaces it
    assert "--overwrite" in capsys.readouterr().err
    np.save(tmp_path / "routed.npy", routed(7, seed=1))
    assert cli.main([*argv, "--overwrite"]) == 0
    with rs.open_run(out) as run:
        assert run.manifest["tokens"] == 7
        assert run.sql("SELECT count(*) AS n FROM routing")["n"][0] == 7 * 3 * 2


@pytest.mark.slow
def test_npz_companions_give_token_ids_and_phases(tmp_path):
    a, b = routed(6, seed=2), routed(4, seed=3)
    np.savez(
        tmp_path / "routed.npz",
        req0=a,
        req0_token_ids=np.arange(100, 107),
        req0_prompt_len=np.array([4]),
        req1=b,
    )
    out = tmp_path / "run"
    assert import_main(["vllm", str(tmp_path / "routed.npz"), "--out", str(out), "--num-experts", "8"]) == 0
    with rs.open_run(out) as run:
        rows = run.sql(
            "SELECT t.step, r.pos, r.layer, r.slot, r.expert, t.token_id, t.phase FROM routing r "
            "JOIN tokens t USING (seq_id, pos) ORDER BY ALL"
        )
        for step, array in enumerate((a, b)):
            np.testing.assert_array_equal(
                rows[rows.step == step]["expert"].to_numpy().reshape(array.shape), array
            )
        first = rows[rows.step == 0].drop_duplicates("pos")
        assert first["token_id"].tolist() == list(range(100, 106))  # 4 prompt + 3 generated - 1 rows
        assert first["phase"].tolist() == ["prefill"] * 4 + ["decode"] * 2
        assert run.manifest["num_experts"] == {"0": 8, "1": 8, "2": 8}


def test_manifest_builder_is_one_function(tmp_path):
    np.save(tmp_path / "r.npy", routed(3))
    imported = import_vllm(tmp_path / "r.npy")
    manifest = build_manifest(imported, "qwen3_moe", [tmp_path / "r.npy"])
    assert manifest["model_type"] == "qwen3_moe" and manifest["moe_layers"] == [0, 1, 2]
    assert manifest["tokens"] == 3 and manifest["counts_only"] is False
    assert manifest["imported_from"]["files"] == [str(tmp_path / "r.npy")]


@pytest.mark.slow
def test_importing_and_reading_never_import_torch():
    code = (
        "import sys\n"
        "import routescope.importers.vllm, routescope.importers.sglang, routescope.commands.import_run\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr

"""Issue 38 item 13: `routescope import ... --append` (successive rollout batches into one run)
and `--labels k=v` (a label column on an imported batch), on real vLLM arrays and SGLang-style
server responses. Each batch is checked row for row against a run imported in one go.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import routescope as rs
from routescope.cli import main
from routescope.store.rundir import RunDirectory
from tests.test_importers_vllm import capturer_rows, known_routing


def vllm_file(tmp_path, name: str, tokens: int, seed: int):
    path = tmp_path / f"{name}.npy"
    np.save(path, capturer_rows(known_routing(tokens, seed=seed)))
    return path


@pytest.mark.slow
def test_append_continues_seq_ids_and_steps_and_labels_each_batch(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    first, second = vllm_file(tmp_path, "a", 5, 1), vllm_file(tmp_path, "b", 7, 2)
    argv = ["import", "vllm", str(first), "--out", str(out), "--prompt-len", "2"]
    assert main([*argv, "--labels", "rollout_step=1"]) == 0
    capsys.readouterr()
    assert main([*argv, "--labels", "rollout_step=2"]) == 2  # an existing run: say --append
    assert "--append" in capsys.readouterr().err
    argv2 = ["import", "vllm", str(second), "--out", str(out), "--prompt-len", "2", "--append"]
    assert main([*argv2, "--labels", "rollout_step=2"]) == 0
    said = capsys.readouterr().out
    assert "imported 7 tokens" in said and "the run now holds 12 tokens" in said

    with rs.open_run(out) as run:
        assert run.manifest["tokens"] == 12 and run.token_count() == 12
        assert run.labels == ["rollout_step"] and run.verify().ok and run.damage == []
        per_batch = run.sql(
            "SELECT rollout_step, count(*) AS n, min(seq_id) AS s0, max(seq_id) AS s1, min(step) AS t0 "
            "FROM tokens GROUP BY 1 ORDER BY 1"
        )
        assert per_batch.rollout_step.tolist() == ["1", "2"] and per_batch.n.tolist() == [5, 7]
        assert per_batch.s0[1] > per_batch.s1[0]  # seq ids continue
        assert per_batch.t0[1] >= 1  # steps continue after the first batch's
        assert len(run.manifest["imports"]) == 2 and run.manifest["next_seq_id"] > per_batch.s1[1]
        # the second batch's routing equals the same file imported alone
        batch = run.sql(
            "SELECT t.pos, r.layer, r.slot, r.expert FROM routing r JOIN tokens t USING (seq_id, pos) "
            "WHERE rollout_step = '2' ORDER BY ALL"
        )
        specialization = run.specialization(by="rollout_step")
        assert set(specialization.rollout_step) == {"1", "2"}
    alone = tmp_path / "alone"
    assert main(["import", "vllm", str(second), "--out", str(alone), "--prompt-len", "2"]) == 0
    with rs.open_run(alone) as run:
        want = run.sql(
            "SELECT t.pos, r.layer, r.slot, r.expert FROM routing r JOIN tokens t USING (seq_id, pos) ORDER BY ALL"
        )
    assert batch.values.tolist() == want.values.tolist()


@pytest.mark.slow
def test_append_to_a_run_imported_before_next_seq_id_was_kept(tmp_path) -> None:
    """A run whose manifest lacks next_seq_id (older imports): the batch starts above the parts'
    seq ids, read from their footers, so no key repeats."""
    out = tmp_path / "run"
    assert main(["import", "vllm", str(vllm_file(tmp_path, "a", 4, 1)), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("next_seq_id"), manifest.pop("steps")
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert main(["import", "vllm", str(vllm_file(tmp_path, "b", 4, 2)), "--out", str(out), "--append"]) == 0
    with rs.open_run(out) as run:
        assert run.verify().ok and run.manifest["tokens"] == 8
        assert run.sql("SELECT count(DISTINCT seq_id) AS n FROM tokens").n[0] == 2


def test_bad_batch_options_are_one_line(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    path = vllm_file(tmp_path, "a", 3, 1)
    assert main(["import", "vllm", str(path), "--out", str(out), "--labels", "step=3"]) == 2
    assert "reserved" in capsys.readouterr().err
    assert main(["import", "vllm", str(path), "--out", str(out), "--labels", "nolabel"]) == 2
    assert "use name=value" in capsys.readouterr().err
    assert main(["import", "vllm", str(path), "--out", str(out), "--append", "--overwrite"]) == 2
    assert not out.exists() or not (out / "manifest.json").exists()


@pytest.mark.slow
def test_append_waits_for_the_writer_and_busy_exits_4(tmp_path, capsys) -> None:
    """An import into a run being written takes the writer lock as recording does."""
    out = tmp_path / "run"
    path = vllm_file(tmp_path, "a", 3, 1)
    assert main(["import", "vllm", str(path), "--out", str(out)]) == 0
    holder = RunDirectory(out)
    holder.lock()
    try:
        assert main(["import", "vllm", str(path), "--out", str(out), "--append"]) == 4
        assert main(["import", "vllm", str(path), "--out", str(out), "--append", "--wait", "0.2"]) == 4
        assert "waiting for it" in capsys.readouterr().err
    finally:
        holder.close()
    assert main(["import", "vllm", str(path), "--out", str(out), "--append"]) == 0
    with rs.open_run(out) as run:
        assert run.manifest["tokens"] == 6 and run.verify().ok


def test_every_import_subcommand_has_the_batch_options(capsys) -> None:
    for engine in ("sglang", "vllm"):
        assert main(["import", engine, "--help"]) == 0
        text = capsys.readouterr().out
        for option in ("--append", "--labels", "--overwrite", "--wait"):
            assert option in text, (engine, option)

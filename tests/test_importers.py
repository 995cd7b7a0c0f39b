"""Importers: files built in SGLang's and vLLM's dump layouts convert into runs with the same decisions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import routescope as rs
from routescope.commands.import_run import main as import_main
from routescope.importers import ImportFormatError, write_imported_run
from routescope.importers.sglang import import_sglang
from routescope.importers.vllm import import_vllm

# physical expert -> logical expert per layer (6 physical slots, 4 logical experts: 2 replicas)
P2L = torch.tensor([[0, 1, 2, 3, 0, 3]] * 3)


def sglang_record(fid, ids, positions, lens, mode, topk, rank=0):
    """A per_token record shaped like sglang's _DetailSinglePassGatherer.collect() + accumulator fields."""
    padded = torch.full((3, len(ids), 8), -1, dtype=torch.int32)  # _TOP_K_NUM = 8, -1 = unused
    padded[:, :, : topk.shape[2]] = topk
    return dict(
        forward_pass_id=fid,
        rank=rank,
        gatherer_key="primary",
        input_ids=ids,
        positions=positions,
        extend_seq_lens=lens,
        forward_mode=mode,
        topk_ids_of_layer=padded,
        misc_objects=[],
        global_physical_count=torch.zeros(3, 6, dtype=torch.int32),
    )


def per_token_dump():
    g = torch.Generator().manual_seed(0)

    def topk(tokens):
        t = torch.full((3, tokens, 2), -1, dtype=torch.int32)  # layer 0 is dense: never routed
        for layer in (1, 2):
            for i in range(tokens):
                t[layer, i] = torch.randperm(6, generator=g)[:2].int()
        return t

    prefill = sglang_record(0, [11, 12, 13, 21, 22], [0, 1, 2, 0, 1], [3, 2], 1, topk(5))
    decode = sglang_record(1, [14, 23], [3, 2], None, 2, topk(2))
    return {"records": [prefill, decode], "last_physical_to_logical_map": P2L}


def test_sglang_per_token(tmp_path):
    dump = per_token_dump()
    torch.save(dump, tmp_path / "expert_distribution_recorder_1.0_0.pt")
    assert (
        import_main(
            [
                "sglang",
                str(tmp_path / "expert_distribution_recorder_1.0_0.pt"),
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )

    expected = []
    for step, record in enumerate(dump["records"]):
        topk = record["topk_ids_of_layer"]
        for t, (token, pos) in enumerate(zip(record["input_ids"], record["positions"], strict=True)):
            for layer in (1, 2):
                for slot in range(2):
                    physical = int(topk[layer, t, slot])
                    expected.append((step, token, pos, layer, slot, int(P2L[layer, physical])))
    with rs.open_run(tmp_path / "run") as run:
        assert run.manifest["moe_layers"] == [1, 2]
        assert run.manifest["num_hidden_layers"] == 3
        assert run.manifest["top_k"] == {"1": 2, "2": 2}
        assert run.manifest["num_experts"] == {"1": 4, "2": 4}
        assert run.manifest["tokens"] == 7 and not run.manifest["counts_only"]
        got = run.sql(
            """SELECT t.step, t.token_id, r.pos, r.layer, r.slot, r.expert FROM routing r
               JOIN tokens t USING (seq_id, pos) ORDER BY ALL"""
        )
        assert [tuple(int(v) for v in row) for row in got.itertuples(index=False)] == sorted(expected)
        phases = run.sql(
            "SELECT step, phase, count(DISTINCT seq_id) AS seqs FROM tokens GROUP BY ALL ORDER BY step"
        )
        assert phases.values.tolist() == [[0, "prefill", 2], [1, "decode", 2]]
        unique = run.sql("SELECT count(*) AS n, count(DISTINCT (seq_id, pos)) AS u FROM tokens")
        assert unique["n"][0] == unique["u"][0]


def stat_dump():
    counts = torch.zeros(4, 3, 4, dtype=torch.int32)  # [buffered passes, layers, logical experts]
    counts[0, 1] = torch.tensor([3, 1, 0, 4])
    counts[0, 2] = torch.tensor([2, 2, 2, 2])
    counts[2, 1] = torch.tensor([1, 1, 1, 1])
    counts[2, 2] = torch.tensor([0, 0, 4, 0])  # pass 1 and 3: unused circular-buffer slots
    return {"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None}


def test_sglang_stat_counts_only(tmp_path):
    torch.save(stat_dump(), tmp_path / "stat.pt")
    out = tmp_path / "run"
    assert import_main(["sglang", str(tmp_path / "stat.pt"), "--out", str(out), "--top-k", "2"]) == 0
    with rs.open_run(out) as run:
        assert run.manifest["counts_only"] is True
        assert run.manifest["moe_layers"] == [1, 2]
        assert run.manifest["tokens"] == (8 + 4) // 2
        assert "expert_counts" in run.tables
        totals = run.sql(
            "SELECT layer, expert, sum(tokens) AS n FROM expert_counts GROUP BY ALL ORDER BY ALL"
        )
        assert totals[totals.layer == 1]["n"].tolist() == [4, 2, 1, 5]
        assert totals[totals.layer == 2]["n"].tolist() == [2, 2, 6, 2]
        assert run.sql("SELECT DISTINCT step FROM expert_counts ORDER BY step")["step"].tolist() == [0, 1]
        assert run.sql("SELECT count(*) AS n FROM routing")["n"][0] == 0


def test_sglang_per_pass_maps_physical_to_logical(tmp_path):
    records = []
    for fid in range(2):
        count = torch.zeros(3, 6, dtype=torch.int32)
        count[1] = torch.tensor([1, 2, 3, 4, 5, 6]) * (fid + 1)
        records.append(dict(forward_pass_id=fid, rank=0, gatherer_key="primary", global_physical_count=count))
    torch.save({"records": records, "last_physical_to_logical_map": P2L}, tmp_path / "pass.pt")
    imported = import_sglang([tmp_path / "pass.pt"], top_k=2)
    write_imported_run(imported, tmp_path / "run")
    with rs.open_run(tmp_path / "run") as run:
        got = run.sql("SELECT step, expert, tokens FROM expert_counts WHERE layer = 1 ORDER BY ALL")
        # logical 0 = physical 0 + 4, logical 3 = physical 3 + 5
        assert got[got.step == 0]["tokens"].tolist() == [1 + 5, 2, 3, 4 + 6]
        assert got[got.step == 1]["tokens"].tolist() == [12, 4, 6, 20]
        assert run.manifest["moe_layers"] == [1]


def test_sglang_wrong_layouts(tmp_path, capsys):
    torch.save({"something": torch.zeros(2)}, tmp_path / "bad.pt")
    with pytest.raises(ImportFormatError, match="expected an SGLang expert-distribution dump.*'records'"):
        import_sglang([tmp_path / "bad.pt"])
    record = sglang_record(0, [1], [0], [1], 1, torch.zeros(3, 1, 2, dtype=torch.int32))
    record["topk_ids_of_layer"] = torch.zeros(3, 2, dtype=torch.int32)
    torch.save({"records": [record]}, tmp_path / "flat.pt")
    with pytest.raises(ImportFormatError, match=r"\[num_layers, num_tokens, top_k\]"):
        import_sglang([tmp_path / "flat.pt"])
    torch.save(stat_dump(), tmp_path / "stat.pt")
    assert import_main(["sglang", str(tmp_path / "stat.pt"), "--out", str(tmp_path / "run")]) == 2
    assert "--top-k" in capsys.readouterr().err
    assert import_main(["sglang", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "run")]) == 2


def test_vllm_npz_with_layer_mapping(tmp_path):
    rng = np.random.default_rng(0)
    a = np.stack([rng.permutation(8)[:2] for _ in range(6 * 3)]).reshape(6, 3, 2).astype(np.int32)
    b = np.stack([rng.permutation(8)[:2] for _ in range(4 * 3)]).reshape(4, 3, 2).astype(np.int32)
    np.savez(
        tmp_path / "routed.npz",
        req0=a,
        req0_token_ids=np.arange(100, 107),
        req0_prompt_len=np.array([4]),
        req1=b,
    )
    out = tmp_path / "run"
    argv = [
        "vllm",
        str(tmp_path / "routed.npz"),
        "--out",
        str(out),
        "--moe-layers",
        "1-3",
        "--num-experts",
        "8",
    ]
    assert import_main(argv) == 0
    with rs.open_run(out) as run:
        assert run.manifest["moe_layers"] == [1, 2, 3]
        assert run.manifest["num_experts"] == {"1": 8, "2": 8, "3": 8}
        assert run.manifest["tokens"] == 10
        rows = run.sql(
            "SELECT t.step, r.pos, r.layer, r.slot, r.expert, t.token_id, t.phase FROM routing r "
            "JOIN tokens t USING (seq_id, pos) ORDER BY ALL"
        )
        assert len(rows) == (6 + 4) * 3 * 2
        for step, array in enumerate((a, b)):
            part = rows[rows.step == step]
            got = part["expert"].to_numpy().reshape(array.shape)
            np.testing.assert_array_equal(got, array)
        first = rows[rows.step == 0].drop_duplicates("pos")
        assert first["token_id"].tolist() == list(range(100, 106))
        assert first["phase"].tolist() == ["prefill"] * 4 + ["decode"] * 2
    assert import_main(argv) == 2  # exists; --overwrite replaces
    assert import_main([*argv, "--overwrite"]) == 0


def test_vllm_json_choices_and_npy(tmp_path):
    experts = [[[0, 1], [2, 3]], [[1, 2], [3, 0]], [[2, 3], [0, 1]]]
    response = {"choices": [{"routed_experts": experts, "prompt_token_ids": [5, 6], "token_ids": [7]}]}
    (tmp_path / "resp.json").write_text(json.dumps(response))
    imported = import_vllm(tmp_path / "resp.json")
    assert imported.num_experts == {0: 4, 1: 4} and imported.top_k == {0: 2, 1: 2}
    assert imported.tokens["token_id"].tolist() == [5, 6, 7]
    assert imported.tokens["phase"].tolist() == ["prefill", "prefill", "decode"]

    np.save(tmp_path / "flat.npy", np.zeros((5, 2), dtype=np.int32))
    with pytest.raises(ImportFormatError, match=r"shape \(5, 2\).*\[num_tokens, num_moe_layers, top_k\]"):
        import_vllm(tmp_path / "flat.npy")
    np.save(tmp_path / "ok.npy", np.zeros((5, 2, 2), dtype=np.int32))
    with pytest.raises(ValueError, match="--moe-layers lists 3 layers"):
        import_vllm(tmp_path / "ok.npy", moe_layers=[1, 2, 3])


def test_registered_cli_command(tmp_path, capsys):
    from routescope import cli

    np.save(tmp_path / "routed.npy", np.array([[[0, 1]], [[1, 2]]], dtype=np.int32))
    out = tmp_path / "run"
    assert cli.main(["import", "vllm", str(tmp_path / "routed.npy"), "--out", str(out)]) == 0
    assert rs.open_run(out).manifest["tokens"] == 2
    np.save(tmp_path / "flat.npy", np.zeros(3, dtype=np.int32))
    assert cli.main(["import", "vllm", str(tmp_path / "flat.npy"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "[num_tokens, num_moe_layers, top_k]" in err[0]

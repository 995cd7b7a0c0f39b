"""`routescope import` on bad input: exit code 2 and one clean line naming what was wrong.

Table-driven: each case writes its bad file(s) and gives the argv; the line on stderr must
name the file (or the option) and never carry a traceback, ANSI escapes, or a loader's
advice to switch its safety off.
"""

from __future__ import annotations

import base64
import io
import json
import zipfile
from fractions import Fraction

import numpy as np
import pytest
import torch

from routescope import cli

P2L = torch.tensor([[0, 1, 2, 3, 0, 3]] * 3)


def token_record(**change):
    topk = torch.full((3, 2, 8), -1, dtype=torch.int32)
    topk[1:, :, :2] = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    record = dict(
        forward_pass_id=0,
        rank=0,
        gatherer_key="primary",
        input_ids=[5, 6],
        positions=[0, 1],
        extend_seq_lens=[2],
        forward_mode=1,
        topk_ids_of_layer=topk,
        misc_objects=[],
        global_physical_count=torch.zeros(3, 6, dtype=torch.int32),
    )
    record.update(change)
    return record


def pt(tmp, name, obj):
    torch.save(obj, tmp / name)
    return str(tmp / name)


def text(tmp, name, content):
    (tmp / name).write_text(content)
    return str(tmp / name)


def raw(tmp, name, content: bytes):
    (tmp / name).write_bytes(content)
    return str(tmp / name)


def npy_bytes(array, allow_pickle=False):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def zip_file(tmp, name, members):
    with zipfile.ZipFile(tmp / name, "w") as archive:
        for member, content in members.items():
            archive.writestr(member, content)
    return str(tmp / name)


def small_npy():
    return npy_bytes(np.tile(np.array([0, 1], dtype=np.int32), (2, 2, 1)))


def truncated_pt(tmp, name):
    full = (tmp / "full.pt").as_posix()
    torch.save(VALID_PT, full)
    with open(full, "rb") as fh:
        return raw(tmp, name, fh.read()[:300])


def big_topk():
    topk = token_record()["topk_ids_of_layer"].clone()
    topk[1, 0, 0] = 9  # only 6 physical slots in the map
    return topk


def stat(counts):
    return {"rank": 0, "logical_count": torch.tensor(counts, dtype=torch.int32)}


OK_ROWS = [[[0, 1], [2, 3]], [[1, 2], [3, 0]]]
VALID_PT = {"records": [token_record()], "last_physical_to_logical_map": P2L}

# (case id, builder(tmp) -> (argv after "import", text the error line must contain))
CASES = {
    # SGLang
    "physical id beyond the map": lambda t: (
        [
            "sglang",
            pt(
                t,
                "beyond.pt",
                {
                    "records": [token_record(topk_ids_of_layer=big_topk())],
                    "last_physical_to_logical_map": P2L,
                },
            ),
        ],
        "beyond.pt",
    ),
    "map narrower than the counts": lambda t: (
        [
            "sglang",
            pt(
                t,
                "narrow.pt",
                {
                    "records": [
                        dict(
                            forward_pass_id=0,
                            rank=0,
                            global_physical_count=torch.ones(3, 8, dtype=torch.int32),
                        )
                    ],
                    "last_physical_to_logical_map": P2L,
                },
            ),
            "--top-k",
            "2",
        ],
        "narrow.pt",
    ),
    "record not a dict": lambda t: (["sglang", pt(t, "notdict.pt", {"records": [[1, 2, 3]]})], "notdict.pt"),
    "empty .pt": lambda t: (["sglang", raw(t, "empty.pt", b"")], "empty.pt"),
    "truncated .pt": lambda t: (
        ["sglang", truncated_pt(t, "trunc.pt")],
        "trunc.pt",
    ),
    "pickled object in .pt": lambda t: (
        ["sglang", pt(t, "object.pt", {"records": Fraction(1, 3)})],
        "object.pt",
    ),
    "a directory": lambda t: (["sglang", str(t)], str(t)),
    "missing file": lambda t: (["sglang", str(t / "missing.pt")], "missing.pt"),
    "--top-k 0": lambda t: (["sglang", pt(t, "s.pt", stat([[[0, 0], [1, 1]]])), "--top-k", "0"], "--top-k"),
    "--top-k missing for counts": lambda t: (["sglang", pt(t, "s.pt", stat([[[0, 0], [1, 1]]]))], "--top-k"),
    "all-zero counts": lambda t: (
        ["sglang", pt(t, "zeros.pt", stat([[[0, 0], [0, 0]]])), "--top-k", "2"],
        "zeros.pt",
    ),
    "no records": lambda t: (["sglang", pt(t, "norec.pt", {"records": []})], "norec.pt"),
    "records without ids or counts": lambda t: (
        ["sglang", pt(t, "nokeys.pt", {"records": [{"rank": 0}]})],
        "nokeys.pt",
    ),
    "topk of wrong rank": lambda t: (
        [
            "sglang",
            pt(
                t,
                "flat.pt",
                {"records": [token_record(topk_ids_of_layer=torch.zeros(3, 2, dtype=torch.int32))]},
            ),
        ],
        "flat.pt",
    ),
    "expert id below -1": lambda t: (
        [
            "sglang",
            pt(
                t,
                "neg.pt",
                {"records": [token_record(topk_ids_of_layer=torch.full((3, 2, 2), -4, dtype=torch.int32))]},
            ),
        ],
        "neg.pt",
    ),
    "extend_seq_lens not adding up": lambda t: (
        ["sglang", pt(t, "lens.pt", {"records": [token_record(extend_seq_lens=[5])]})],
        "lens.pt",
    ),
    "CSV with another header": lambda t: (
        ["sglang", text(t, "counts.csv", "layer,expert,n\n1,0,3\n"), "--top-k", "2"],
        "counts.csv",
    ),
    "CSV with a non-integer": lambda t: (
        ["sglang", text(t, "bad.csv", "layer_id,expert_id,count\n1,x,3\n"), "--top-k", "2"],
        "bad.csv",
    ),
    "modes mixed": lambda t: (
        ["sglang", pt(t, "a.pt", VALID_PT), pt(t, "b.pt", stat([[[1, 1], [1, 1]]]))],
        "b.pt",
    ),
    "--num-experts too small": lambda t: (
        ["sglang", pt(t, "ok.pt", VALID_PT), "--num-experts", "2"],
        "ok.pt",
    ),
    "same rank's dump twice": lambda t: (
        ["sglang", pt(t, "r0.pt", VALID_PT), pt(t, "r0copy.pt", VALID_PT)],
        "r0copy.pt",
    ),
    "--tp-size not matching the copies": lambda t: (
        [
            "sglang",
            pt(t, "tp0.pt", VALID_PT),
            pt(t, "tp1.pt", {**VALID_PT, "records": [token_record(rank=1)]}),
            "--tp-size",
            "3",
        ],
        "--tp-size 3",
    ),
    # vLLM
    "negative expert id in JSON": lambda t: (
        ["vllm", text(t, "neg.json", json.dumps({"choices": [{"routed_experts": [[[0, -3], [1, 2]]]}]}))],
        "neg.json",
    ),
    "truncated .npy": lambda t: (
        ["vllm", raw(t, "trunc.npy", npy_bytes(np.zeros((4, 2, 2), np.int32))[:90])],
        "trunc.npy",
    ),
    "empty .npy": lambda t: (["vllm", raw(t, "empty.npy", b"")], "empty.npy"),
    "non-.npy member in .npz": lambda t: (
        ["vllm", zip_file(t, "notes.npz", {"notes.txt": "hello"})],
        "notes.npz",
    ),
    "truncated member in .npz": lambda t: (
        ["vllm", zip_file(t, "trunc.npz", {"req0.npy": npy_bytes(np.zeros((4, 2, 2), np.int32))[:90]})],
        "trunc.npz",
    ),
    "empty .npz": lambda t: (["vllm", raw(t, "empty.npz", b"")], "empty.npz"),
    "2-D array in .npz": lambda t: (
        ["vllm", zip_file(t, "flat.npz", {"req0.npy": npy_bytes(np.zeros((4, 2), np.int32))})],
        "flat.npz",
    ),
    "invalid JSON": lambda t: (["vllm", text(t, "broken.json", '{"choices": [')], "broken.json"),
    "JSON without routed_experts": lambda t: (
        ["vllm", text(t, "keys.json", json.dumps({"text": "hi"}))],
        "keys.json",
    ),
    "ragged routed_experts": lambda t: (
        ["vllm", text(t, "ragged.json", json.dumps({"routed_experts": [[[0, 1]], [[1, 2], [3, 4]]]}))],
        "ragged.json",
    ),
    "string that is not base64": lambda t: (
        ["vllm", text(t, "b64.json", json.dumps({"routed_experts": "not base64 at all!"}))],
        "b64.json",
    ),
    "base64 .npy of Python objects": lambda t: (
        [
            "vllm",
            text(
                t,
                "pickled.json",
                json.dumps(
                    {
                        "routed_experts": base64.b64encode(
                            npy_bytes(np.array([Fraction(1, 3)], dtype=object), True)
                        ).decode()
                    }
                ),
            ),
        ],
        "pickled.json",
    ),
    "float array": lambda t: (
        ["vllm", raw(t, "float.npy", npy_bytes(np.zeros((4, 2, 2), np.float32)))],
        "float.npy",
    ),
    "unknown suffix": lambda t: (["vllm", text(t, "routed.txt", "0 1 2")], "routed.txt"),
    "rows not prompt + output - 1": lambda t: (
        [
            "vllm",
            text(
                t,
                "rows.json",
                json.dumps(
                    {
                        "prompt_token_ids": [1, 2, 3],
                        "choices": [{"token_ids": [4, 5], "routed_experts": OK_ROWS}],
                    }
                ),
            ),
        ],
        "rows.json",
    ),
    "--moe-layers text": lambda t: (
        ["vllm", raw(t, "r.npy", small_npy()), "--moe-layers", "one"],
        "--moe-layers",
    ),
    "--moe-layers not fitting": lambda t: (
        ["vllm", raw(t, "r.npy", small_npy()), "--moe-layers", "3-5"],
        "r.npy",
    ),
    "--num-experts 0": lambda t: (
        ["vllm", raw(t, "r.npy", small_npy()), "--num-experts", "0"],
        "--num-experts",
    ),
    "object array in .pt": lambda t: (
        ["vllm", pt(t, "objects.pt", [np.array([Fraction(1, 2)], dtype=object)])],
        "objects.pt",
    ),
    "-1 filling part of a row": lambda t: (
        [
            "vllm",
            text(t, "partial.json", json.dumps({"routed_experts": [[[0, 1], [-1, -1]], [[1, 2], [3, 0]]]})),
        ],
        "partial.json",
    ),
    "requests disagree on layers": lambda t: (
        [
            "vllm",
            text(
                t,
                "layers.jsonl",
                json.dumps({"routed_experts": OK_ROWS})
                + "\n"
                + json.dumps({"routed_experts": [[[0, 1]]]})
                + "\n",
            ),
        ],
        "layers.jsonl",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_one_clean_line(case, tmp_path, capsys):
    argv, named = CASES[case](tmp_path)
    code = cli.main(["import", *argv, "--out", str(tmp_path / "out_run")])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("routescope: error: "), err
    assert named in lines[0], lines[0]
    for forbidden in (
        "Traceback",
        "\x1b",
        "weights_only=False",
        "weights_only` set to `False",
        "add_safe_globals",
    ):
        assert forbidden not in err
    assert not (tmp_path / "out_run" / "manifest.json").exists()


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_out_that_is_or_lies_under_a_file(where, tmp_path, capsys):
    np.save(tmp_path / "r.npy", np.array([[[0, 1]], [[1, 2]]], dtype=np.int32))
    (tmp_path / "taken").write_text("x")
    out = tmp_path / "taken" if where == "file" else tmp_path / "taken" / "run"
    assert cli.main(["import", "vllm", str(tmp_path / "r.npy"), "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--out" in lines[0] and str(tmp_path / "taken") in lines[0]

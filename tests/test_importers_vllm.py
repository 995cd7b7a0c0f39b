"""vLLM importer: files in the layouts vLLM really returns, built from a known routing.

- before 0.21: `RoutedExpertsCapturer` writes int32 rows [token, num_hidden_layers, top_k]
  into a zeroed buffer, only for MoE layers (`capture(layer_id, topk_ids)`), and the
  request gets the rows of its prompt and generated tokens except the last generated one
  (never fed back), on the choice as `routed_experts`;
- 0.21 and later: int16 [tokens, MoE layers, top_k] with -1 for rows never computed, the
  prompt part at the response level (`prompt_routed_experts`, `prompt_token_ids`), each
  choice's generated part in `routed_experts` / `token_ids`;
- vLLM's `/generate`: the rows as a base64 `np.save` string.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch

import routescope as rs
from routescope.commands.import_run import main as import_main
from routescope.importers import write_imported_run
from routescope.importers.vllm import import_vllm

HIDDEN_LAYERS = 4
MOE = (1, 2, 3)  # decoder layer 0 is dense
TOP_K = 2
EXPERTS = 8


def known_routing(tokens, seed):
    """[tokens, MoE layers, top_k] logical expert ids, distinct within a token."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(EXPERTS)[:TOP_K] for _ in range(tokens * len(MOE))]).reshape(
        tokens, len(MOE), TOP_K
    )


def capturer_rows(routing):
    """vLLM < 0.21: the shared buffer is zeroed; capture() writes only MoE layers' rows."""
    buffer = np.zeros((routing.shape[0], HIDDEN_LAYERS, TOP_K), dtype=np.int32)
    for i, layer in enumerate(MOE):
        buffer[:, layer, :] = routing[:, i, :]
    return buffer


def imported_table(run):
    got = run.sql(
        """SELECT t.seq_id, t.pos, t.token_id, t.phase, r.layer, r.slot, r.expert
           FROM routing r JOIN tokens t USING (seq_id, pos) ORDER BY ALL"""
    )
    return [
        tuple(int(v) if not isinstance(v, str) else v for v in row) for row in got.itertuples(index=False)
    ]


def expected_table(seq_id, routing, positions, token_ids, prompt_len, layers=MOE):
    rows = []
    for row, pos in enumerate(positions):
        phase = "prefill" if pos < prompt_len else "decode"
        for i, layer in enumerate(MOE):
            if layer not in layers:
                continue
            for slot in range(TOP_K):
                rows.append((seq_id, pos, token_ids[row], phase, layer, slot, int(routing[row, i, slot])))
    return rows


def test_before_021_decoder_layer_axis_with_dense_layer(tmp_path):
    prompt, output = [11, 12, 13, 14, 15], [21, 22, 23]
    routing = known_routing(len(prompt) + len(output) - 1, seed=0)
    response = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "..."},
                "token_ids": output,
                "routed_experts": capturer_rows(routing).tolist(),
            }
        ],
        "prompt_token_ids": prompt,
    }
    (tmp_path / "resp.json").write_text(json.dumps(response))
    ids = prompt + output[:-1]
    expected = expected_table(0, routing, range(7), ids, len(prompt))
    for extra in ([], ["--moe-layers", "1-3"]):
        out = tmp_path / f"run{len(extra)}"
        assert import_main(["vllm", str(tmp_path / "resp.json"), "--out", str(out), *extra]) == 0
        with rs.open_run(out) as run:
            assert imported_table(run) == sorted(expected)
            assert run.manifest["moe_layers"] == [1, 2, 3]  # dense layer 0 is not an MoE layer
            assert run.manifest["num_hidden_layers"] == HIDDEN_LAYERS
            assert run.manifest["top_k"] == {"1": 2, "2": 2, "3": 2}
    assert (
        import_main(
            ["vllm", str(tmp_path / "resp.json"), "--out", str(tmp_path / "sub"), "--moe-layers", "1,3"]
        )
        == 0
    )
    with rs.open_run(tmp_path / "sub") as run:
        assert imported_table(run) == sorted(expected_table(0, routing, range(7), ids, 5, layers=(1, 3)))


@pytest.mark.slow
def test_021_prompt_part_at_response_level_and_generated_part_per_choice(tmp_path):
    prompt = list(range(100, 109))  # 9 prompt tokens
    outputs = [[201, 202, 203, 204, 205], [301, 302, 303, 304, 305]]  # n=2 choices, 5 tokens each
    prompt_routing = known_routing(9, seed=1)
    gen_routing = [known_routing(4, seed=2), known_routing(4, seed=3)]
    prompt_rows = prompt_routing.astype(np.int16)
    prompt_rows[:2] = -1  # a prefix-cache hit: those rows were never computed
    response = {
        "id": "cmpl-2",
        "object": "text_completion",
        "choices": [
            {
                "index": j,
                "text": "",
                "token_ids": outputs[j],
                "routed_experts": gen_routing[j].astype(np.int16).tolist(),
            }
            for j in range(2)
        ],
        "prompt_token_ids": prompt,
        "prompt_routed_experts": prompt_rows.tolist(),
    }
    (tmp_path / "resp.json").write_text(json.dumps(response))
    out = tmp_path / "run"
    assert import_main(["vllm", str(tmp_path / "resp.json"), "--out", str(out), "--moe-layers", "1-3"]) == 0
    expected = expected_table(0, prompt_routing[2:], range(2, 9), prompt[2:], 9)
    for j in range(2):
        # choice 0 continues the prompt's sequence; choice 1 is its own sequence from position 9
        expected += expected_table(j, gen_routing[j], range(9, 13), outputs[j][:4], 9)
    with rs.open_run(out) as run:
        assert imported_table(run) == sorted(expected)
        assert run.manifest["tokens"] == 7 + 4 + 4  # the prompt once, each choice's generated tokens
        assert run.manifest["imported_from"]["rows_never_computed"] == 2
        assert run.manifest["moe_layers"] == [1, 2, 3]
    imported = import_vllm(tmp_path / "resp.json")  # without --moe-layers the axis is MoE-indexed
    assert sorted(imported.num_experts) == [0, 1, 2]
    assert imported.extra["layer_numbering"].startswith("moe_index")


def npy_base64(array):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode()


def test_generate_endpoint_base64_npy(tmp_path):
    prompt_len, output = 6, [41, 42, 43, 44]
    routing = known_routing(prompt_len + len(output) - 1, seed=4)
    response = {
        "request_id": "gen-1",
        "choices": [
            {
                "index": 0,
                "finish_reason": "length",
                "token_ids": output,
                "routed_experts": npy_base64(capturer_rows(routing)),
            }
        ],
    }
    (tmp_path / "gen.json").write_text(json.dumps(response))
    imported = import_vllm(tmp_path / "gen.json")
    write_imported_run(imported, tmp_path / "run")
    ids = [-1] * prompt_len + output[:-1]  # prompt ids are not in the response; its length is implied
    with rs.open_run(tmp_path / "run") as run:
        assert imported_table(run) == sorted(expected_table(0, routing, range(9), ids, prompt_len))


def test_pt_of_request_outputs_holding_numpy_arrays(tmp_path):
    prompt, output = [7, 8, 9], [31, 32, 33]
    prompt_routing, gen_routing = known_routing(3, seed=5), known_routing(2, seed=6)
    outputs = [
        {
            "request_id": "0",
            "prompt_token_ids": prompt,
            "prompt_routed_experts": prompt_routing.astype(np.int16),
            "outputs": [{"index": 0, "token_ids": output, "routed_experts": gen_routing.astype(np.int16)}],
            "finished": True,
        }
    ]
    torch.save(outputs, tmp_path / "outputs.pt")
    imported = import_vllm(tmp_path / "outputs.pt", moe_layers=list(MOE))
    write_imported_run(imported, tmp_path / "run")
    expected = expected_table(0, prompt_routing, range(3), prompt, 3)
    expected += expected_table(0, gen_routing, range(3, 5), output[:2], 3)
    with rs.open_run(tmp_path / "run") as run:
        assert imported_table(run) == sorted(expected)


def test_moe_layers_that_fit_neither_reading_are_refused(tmp_path):
    np.save(tmp_path / "r.npy", capturer_rows(known_routing(3, seed=7)))
    with pytest.raises(ValueError, match=r"--moe-layers lists 3 layers up to 4.*layer axis of 4"):
        import_vllm(tmp_path / "r.npy", moe_layers=[2, 3, 4])


# -- issue 26, item 12: a bare array does not know its phases --------------------------------
def test_bare_npy_writes_phase_unknown(tmp_path):
    np.save(tmp_path / "r.npy", capturer_rows(known_routing(5, seed=3)))
    assert import_main(["vllm", str(tmp_path / "r.npy"), "--out", str(tmp_path / "run")]) == 0
    with rs.open_run(tmp_path / "run") as run:
        assert set(run.sql("SELECT DISTINCT phase FROM tokens").phase) == {"unknown"}
        assert run.manifest["imported_from"]["phases_known"] is False
        assert run.token_count("phase = 'prefill'") == 0


def test_bare_npy_with_prompt_len_splits_prefill_and_decode(tmp_path):
    np.save(tmp_path / "r.npy", capturer_rows(known_routing(5, seed=3)))
    argv = ["vllm", str(tmp_path / "r.npy"), "--out", str(tmp_path / "run"), "--prompt-len", "3"]
    assert import_main(argv) == 0
    with rs.open_run(tmp_path / "run") as run:
        phases = run.sql("SELECT pos, phase FROM tokens ORDER BY pos")
        assert phases.phase.tolist() == ["prefill"] * 3 + ["decode"] * 2
    assert import_main([*argv[:-1], "-1", "--overwrite"]) == 2

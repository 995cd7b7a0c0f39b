"""Server responses (SGLang, vLLM) -> run -> rs.replay: the R3 path, on real tiny models.

Routing is recorded by rs.record while tiny models with a dense first decoder layer generate;
the recorded rows are then encoded the way each engine puts them on the wire, transcribed
from the engines' sources:

- SGLang, sgl-project/sglang @ a6463a1003429d415506fe0d97b4c548b85444e1,
  `python/sglang/srt/state_capturer/routed_experts_wire.py`: `encode_routed_experts_for_wire`
  (flat row-major `(positions, num_hidden_layers, top_k)`, cast to the configured dtype,
  kept int32 when a value does not fit, base64 of `tobytes()`); positions
  `[routed_experts_start_len, seqlen - 1)` from `state_capturer/base.py` `get_topk`
  (@ 0564b5215b333749d722348c3b3d9b92c3de8c44); dense layers' rows stay zero (the host
  buffer is zeroed, `state_capturer/routed_experts.py` @ 024911f2cc90d79489fb93f66747a2b7bd9f1a4c);
  the OpenAI-compatible server's `choices[i].sgl_ext.routed_experts` as SGLang's
  `test_return_routed_experts.py` reads it.
- vLLM, vllm-project/vllm @ 184bf81304786278679d609dd1fccc998ead9f5d,
  `tests/entrypoints/openai/test_return_routed_experts.py`: `choices[0].routed_experts` is
  base64 of `np.save` bytes, `(tokens, num_hidden_layers, top_k)`; `routed_experts_prompt_start`
  from `vllm/sampling_params.py` @ 00388f6573ccfcffad607b8c9ecdf341a4669ceb; the 0.21 split
  (`prompt_routed_experts` + `routed_experts`, int16, MoE layers only) as in
  tests/test_importers_vllm.py.

Every imported row is checked against the recording, and replay over prompt + completion
gives every returned token its recorded experts after the routers were perturbed.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import routescope as rs
from routescope.commands.import_run import main as import_main
from routescope.importers.core.model_layout import load_layout
from routescope.importers.responses import import_responses
from tests.tiny_models import build_tiny_model

PROMPT, NEW = 6, 5  # prompt tokens, generated tokens
# Dense decoder layer 0 in both: Qwen3-MoE by mlp_only_layers, DeepSeek-V3 by first_k_dense_replace.
MODELS = {
    "sglang": ("qwen3_moe", dict(num_hidden_layers=3, mlp_only_layers=[0])),
    "vllm": ("deepseek_v3", {}),
}


# -- the engines' wire encodings (transcribed, see the module docstring) ---------------------
def sglang_wire(rows: np.ndarray, dtype: str | None) -> tuple[str, str]:
    """encode_routed_experts_for_wire: unsigned dtypes fall back to int32 when a value does not fit."""
    target = np.dtype(dtype or "int32")
    if target.kind == "u" and rows.size and (rows.min() < 0 or rows.max() > np.iinfo(target).max):
        target = np.dtype(np.int32)
    return base64.b64encode(rows.astype(target).tobytes()).decode("utf-8"), target.name


def vllm_wire(rows: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, rows, allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode()


# -- recordings ---------------------------------------------------------------------------
class Recording:
    """A tiny model's generate, recorded: per sequence the token ids and the [tokens - 1,
    num_hidden_layers, top_k] rows a server would return (dense layers zero)."""

    def __init__(self, engine: str, tmp_path) -> None:
        model_type, overrides = MODELS[engine]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = build_tiny_model(model_type, seed=3, **overrides)
        self.layout = load_layout(self.model.config)
        prompts = torch.randint(2, 100, (2, PROMPT), generator=torch.Generator().manual_seed(5))
        run_dir = self.run_dir = tmp_path / f"recorded_{engine}"
        with torch.no_grad(), rs.record(self.model, run_dir):
            out = self.model.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=NEW,
                min_new_tokens=NEW,
                do_sample=False,
            )
        self.ids = out.tolist()
        with rs.open_run(run_dir) as run:
            routing = run.sql("SELECT seq_id, pos, layer, slot, expert FROM routing ORDER BY ALL")
            seq_ids = sorted(run.sql("SELECT DISTINCT seq_id FROM tokens")["seq_id"])
        k, hidden = self.layout.top_k, self.layout.num_hidden_layers
        self.rows = []
        for seq_id in seq_ids:
            part = routing[routing.seq_id == seq_id]
            rows = np.zeros((PROMPT + NEW - 1, hidden, k), dtype=np.int64)
            rows[part.pos, part.layer, part.slot] = part.expert
            self.rows.append(rows)

    def truth(self, seq: int, start: int = 0, end: int | None = None) -> set[tuple]:
        """(token-id prefix, layer, slot, expert) of positions start..end-1 of sequence `seq`, MoE layers."""
        end = PROMPT + NEW - 1 if end is None else end
        ids = self.ids[seq]
        return {
            (tuple(ids[: pos + 1]), layer, slot, int(self.rows[seq][pos, layer, slot]))
            for pos in range(start, end)
            for layer in self.layout.moe_layers
            for slot in range(self.layout.top_k)
        }


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    path = tmp_path_factory.mktemp("recorded")
    return {engine: Recording(engine, path) for engine in MODELS}


def run_rows(run_dir, seq_ids=None) -> set[tuple]:
    """(token-id prefix, layer, slot, expert) of every routing row of a run; context tokens (ids
    without routing) complete the prefixes."""
    with rs.open_run(run_dir) as run:
        tokens = run.sql(
            """SELECT seq_id, pos, token_id FROM tokens UNION ALL
               SELECT seq_id, pos, token_id FROM context_tokens ORDER BY seq_id, pos"""
        )
        routing = run.sql("SELECT seq_id, pos, layer, slot, expert FROM routing")
    ids = {s: g["token_id"].tolist() for s, g in tokens.groupby("seq_id")}
    assert all(g["pos"].tolist() == list(range(len(g))) for _, g in tokens.groupby("seq_id"))
    return {
        (tuple(ids[r.seq_id][: r.pos + 1]), int(r.layer), int(r.slot), int(r.expert))
        for r in routing.itertuples()
        if seq_ids is None or r.seq_id in seq_ids
    }


def sglang_native(rec: Recording, seq: int, start=0, dtype="uint8", prompt=True, end=None, **extra) -> dict:
    end = PROMPT + NEW if end is None else end
    rows = rec.rows[seq][start : end - 1]
    payload, sent = sglang_wire(rows, dtype)
    meta = {"id": f"rid-{seq}", "routed_experts": payload, "prompt_tokens": PROMPT, "completion_tokens": NEW}
    if dtype is not None:
        meta["routed_experts_dtype"] = sent
    if start:
        meta["routed_experts_start_len"] = start
    record = {"text": "", "output_ids": rec.ids[seq][PROMPT:end], "meta_info": meta, **extra}
    if prompt:
        record["input_ids"] = rec.ids[seq][:PROMPT]
    return record


def vllm_newest(rec: Recording, seq: int, start=0, dtype=np.uint8) -> dict:
    rows = rec.rows[seq][start:].astype(dtype)
    choice = {"index": 0, "text": "", "token_ids": rec.ids[seq][PROMPT:], "routed_experts": vllm_wire(rows)}
    record = {"id": f"cmpl-{seq}", "choices": [choice], "prompt_token_ids": rec.ids[seq][:PROMPT]}
    if start:
        record["request"] = {"routed_experts_prompt_start": start}
    return record


def vllm_split(rec: Recording, seq: int) -> dict:
    moe = list(rec.layout.moe_layers)
    rows = rec.rows[seq][:, moe, :].astype(np.int16)
    return {
        "request_id": f"req-{seq}",
        "prompt_token_ids": rec.ids[seq][:PROMPT],
        "prompt_routed_experts": rows[:PROMPT].tolist(),
        "outputs": [
            {"index": 0, "token_ids": rec.ids[seq][PROMPT:], "routed_experts": rows[PROMPT:].tolist()}
        ],
    }


# -- every dtype and layout imports exactly -------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [None, "int32", "uint16", "uint8"])
def test_sglang_native_every_wire_dtype_imports_every_row(recordings, tmp_path, dtype):
    rec = recordings["sglang"]
    records = [sglang_native(rec, 0, dtype=dtype), sglang_native(rec, 1, dtype=dtype)]
    imported = import_responses("sglang", records, rec.layout, out=tmp_path / "run")
    assert run_rows(tmp_path / "run") == rec.truth(0) | rec.truth(1)
    with rs.open_run(tmp_path / "run") as run:
        assert run.moe_layers == [1, 2] and run.manifest["num_hidden_layers"] == 3
        assert run.manifest["tokens"] == 2 * (PROMPT + NEW - 1)  # the last generated token is absent
        assert run.verify().ok
        phases = run.sql("SELECT phase, count(*) AS n FROM tokens GROUP BY phase ORDER BY phase")
    assert phases.to_dict("list") == {"phase": ["decode", "prefill"], "n": [2 * (NEW - 1), 2 * PROMPT]}
    assert imported.extra["context_tokens"] == 0


@pytest.mark.slow
def test_sglang_openai_choices_and_prompts_file_via_cli(recordings, tmp_path, capsys):
    rec = recordings["sglang"]
    records = []
    for seq in (0, 1):
        native = sglang_native(rec, seq, dtype="uint16", prompt=False)
        ext = {"routed_experts": native["meta_info"]["routed_experts"], "routed_experts_dtype": "uint16"}
        choice = {
            "index": 0,
            "message": {"role": "assistant"},
            "sgl_ext": ext,
            "output_ids": native["output_ids"],
        }
        if seq == 1:  # return_meta_info: output ids as (logprob, token_id, text) triples
            logprobs = [[-0.5, token, "t"] for token in choice.pop("output_ids")]
            choice["meta_info"] = {"output_token_logprobs": logprobs}
        records.append({"id": f"chatcmpl-{seq}", "choices": [choice]})
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "prompts.txt").write_text("".join(" ".join(map(str, ids[:PROMPT])) + "\n" for ids in rec.ids))
    rec.model.config.save_pretrained(tmp_path / "model")
    argv = ["sglang", str(tmp_path / "r.jsonl"), "--model", str(tmp_path / "model"), "--prompts"]
    assert import_main([*argv, str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "run")]) == 0
    assert "MoE layers [1, 2]" in capsys.readouterr().out
    assert run_rows(tmp_path / "run") == rec.truth(0) | rec.truth(1)
    with rs.open_run(tmp_path / "run") as run:
        assert (
            run.manifest["model_type"] == "qwen3_moe" and run.manifest["imported_from"]["engine"] == "sglang"
        )


@pytest.mark.parametrize("layout", ["newest_uint8", "newest_uint16", "split_0_21"])
def test_vllm_layouts_import_every_row(recordings, tmp_path, layout):
    rec = recordings["vllm"]
    make = {
        "newest_uint8": lambda s: vllm_newest(rec, s, dtype=np.uint8),
        "newest_uint16": lambda s: vllm_newest(rec, s, dtype=np.uint16),
        "split_0_21": lambda s: vllm_split(rec, s),
    }[layout]
    (tmp_path / "r.json").write_text(json.dumps([make(0), make(1)]))
    (tmp_path / "config.json").write_text(rec.model.config.to_json_string())
    argv = [
        "vllm",
        str(tmp_path / "r.json"),
        "--model",
        str(tmp_path / "config.json"),
        "--out",
        str(tmp_path / "run"),
    ]
    assert import_main(argv) == 0
    assert run_rows(tmp_path / "run") == rec.truth(0) | rec.truth(1)


# -- positions: starts, sessions, context -----------------------------------------------------
@pytest.mark.parametrize("named", [True, False])
def test_multi_turn_records_continue_one_sequence(recordings, tmp_path, named):
    """Turn 1 stops after 2 tokens; turn 2's prompt repeats it and starts where turn 1's rows ended
    (prompt + output - 1, the never-returned last token), as multi-turn RL clients ask."""
    rec = recordings["sglang"]
    extra = {"session_id": "conv-a"} if named else {}
    turn1 = sglang_native(rec, 0, end=PROMPT + 2, **extra)
    turn2 = sglang_native(rec, 0, start=PROMPT + 1, end=PROMPT + NEW, **extra)
    turn2["input_ids"], turn2["output_ids"] = rec.ids[0][: PROMPT + 3], rec.ids[0][PROMPT + 3 :]
    other = sglang_native(rec, 1)
    imported = import_responses("sglang", [turn1, other, turn2], rec.model.config, out=tmp_path / "run")
    assert imported.extra["sequences"] == 2
    assert run_rows(tmp_path / "run") == rec.truth(0) | rec.truth(1)
    with rs.open_run(tmp_path / "run") as run:
        steps = run.sql("SELECT pos, step FROM tokens WHERE seq_id = 0 ORDER BY pos")["step"].tolist()
    assert steps == [0] * (PROMPT + 1) + [2] * (NEW - 2)


@pytest.mark.slow
def test_start_skips_a_known_prefix_kept_as_context(recordings, tmp_path):
    rec = recordings["vllm"]
    imported = import_responses(
        "vllm", [vllm_newest(rec, 0, start=3)], rec.model.config, out=tmp_path / "run"
    )
    assert imported.extra["context_tokens"] == 3
    assert run_rows(tmp_path / "run") == rec.truth(0, start=3)
    with rs.open_run(tmp_path / "run") as run:
        assert (
            run.manifest["tokens"] == run.sql("SELECT count(*) AS n FROM tokens")["n"][0] == PROMPT + NEW - 4
        )
        context = run.sql("SELECT seq_id, pos, token_id FROM context_tokens ORDER BY pos")
        assert context["pos"].tolist() == [0, 1, 2] and context["token_id"].tolist() == rec.ids[0][:3]
        assert run.verify().ok  # every token of `tokens` has its k rows per MoE layer (SPEC 3.2)
    # the same rows as a {data, shape, dtype, start} pack, the start carried in the pack
    rows = rec.rows[0][3:].astype(np.uint8)
    pack = {
        "data": base64.b64encode(rows.tobytes()).decode(),
        "shape": list(rows.shape),
        "dtype": "uint8",
        "start": 3,
    }
    record = vllm_newest(rec, 0)
    record["choices"][0]["routed_experts"] = pack
    import_responses("vllm", [record], rec.model.config, out=tmp_path / "packed")
    assert run_rows(tmp_path / "packed") == rec.truth(0, start=3)


def test_compare_aligns_an_import_with_context_tokens_to_the_recording(recordings, tmp_path):
    """The prompt prefix a server returned no routing for is in context_tokens; compare's
    content keys use it, so every imported token matches its recorded twin exactly."""
    rec = recordings["vllm"]
    import_responses("vllm", [vllm_newest(rec, 0, start=3)], rec.model.config, out=tmp_path / "run")
    result = rs.compare(rec.run_dir, tmp_path / "run")
    sat = result.saturation
    assert (sat["tokens_matched"] == PROMPT + NEW - 4).all(), sat
    assert (sat["saturation"] == 1.0).all() and (sat["top1_agreement"] == 1.0).all()
    assert (sat["exact_match"] == 1.0).all()
    agreement = result.token_agreement.iloc[0]
    assert agreement["any_layer_differs"] == 0.0
    # B's tokens: PROMPT + NEW - 4 routed, 3 context tokens with no routing
    assert agreement["missing_routes"] == pytest.approx(3 / (3 + PROMPT + NEW - 4))


def test_vllm_0_21_rows_never_computed_become_context(recordings, tmp_path):
    rec = recordings["vllm"]
    record = vllm_split(rec, 0)
    record["prompt_routed_experts"][0] = record["prompt_routed_experts"][1] = [[-1, -1], [-1, -1]]
    imported = import_responses("vllm", [record], rec.model.config, out=tmp_path / "run")
    assert imported.extra["context_tokens"] == 2
    assert run_rows(tmp_path / "run") == rec.truth(0, start=2)
    with rs.open_run(tmp_path / "run") as run:
        assert run.verify().ok


# -- R3 end to end ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_replay_gives_every_returned_token_its_routing(recordings, tmp_path, engine):
    rec = recordings[engine]
    if engine == "sglang":
        records = [sglang_native(rec, 0, dtype="uint8"), sglang_native(rec, 1, start=2, dtype=None)]
    else:
        records = [vllm_newest(rec, 0), vllm_newest(rec, 1, start=2)]
    import_responses(engine, records, rec.model.config, out=tmp_path / "run")
    model = rec.model
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        with torch.no_grad():  # the routers now choose differently: replay must not follow them
            for name, p in model.named_parameters():
                if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                    p.add_(
                        torch.randn(p.shape, generator=torch.Generator().manual_seed(9)) * 4 * p.abs().mean()
                    )
        ids = torch.tensor(rec.ids)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with rs.replay(model, tmp_path / "run", weights="router", missing="router") as replayer:
                with torch.no_grad(), rs.record(model, tmp_path / "inside"):
                    model(input_ids=ids)
        # per sequence the last token (never returned) falls back; sequence 1 also its 2 context tokens
        assert replayer.fallback_tokens == 2 + 2
        assert replayer.replayed_tokens == ids.numel() - 4
        got = run_rows(tmp_path / "inside")
        assert rec.truth(0) | rec.truth(1, start=2) <= got
        assert not rec.truth(1, end=2) <= got  # the perturbed routers route the context tokens elsewhere
        # the R3 check of docs/replay.md: the training forward recorded, compared with the rollout
        with torch.no_grad(), rs.record(model, tmp_path / "own"):
            model(input_ids=ids)  # no replay: the perturbed routers' own choices
        returned = ids.numel() - 4  # tokens the rollout has routing for
        missing = 2 / (returned + 2)  # sequence 1's two context tokens, over B's tokens
        for recorded, differs in (("inside", 0.0), ("own", None)):
            agreement = rs.compare(tmp_path / recorded, tmp_path / "run").token_agreement.iloc[0]
            assert agreement["tokens_matched"] == returned
            assert agreement["missing_routes"] == pytest.approx(missing)
            if differs is None:
                assert agreement["any_layer_differs"] > 0.5
            else:
                assert agreement["any_layer_differs"] == differs
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(saved[name])


# -- bad payloads: one line naming the request and what was expected, exit code 2 --------------
def _bad_cases(rec: Recording) -> dict[str, tuple[dict, str]]:
    short = sglang_native(rec, 0, dtype="uint8")
    raw = base64.b64decode(short["meta_info"]["routed_experts"])
    short["meta_info"]["routed_experts"] = base64.b64encode(raw[:-1]).decode()
    rows = sglang_native(rec, 0, dtype="uint8")
    rows["output_ids"] = rows["output_ids"][:-1]
    dtype = sglang_native(rec, 0, dtype="uint8")
    dtype["meta_info"]["routed_experts_dtype"] = "int64"
    start = sglang_native(rec, 0, dtype="uint8")
    start["meta_info"]["routed_experts_start_len"] = PROMPT + 1
    return {
        "length": (
            short,
            r"record 0 \(rid rid-0\): routed_experts holds \d+ bytes .* not a whole number of rows of "
            r"num_hidden_layers x top_k = 3 x 2",
        ),
        "rows": (
            rows,
            r"record 0 \(rid rid-0\): 10 routing rows; expected prompt 6 \+ output 4 - 1 - start 0 = 9",
        ),
        "dtype": (
            dtype,
            r"record 0 \(rid rid-0\): routed_experts_dtype 'int64' is not one SGLang sends; expected "
            r"int32, uint16, uint8",
        ),
        "start": (start, r"record 0 \(rid rid-0\): routing starts at position 7, past the 6-token prompt"),
        "no_prompt": (
            sglang_native(rec, 0, prompt=False),
            r"record 0 \(rid rid-0\): no prompt token ids .* --prompts",
        ),
    }


@pytest.mark.parametrize("case", ["length", "rows", "dtype", "start", "no_prompt"])
def test_bad_payloads_are_refused_naming_the_request(recordings, tmp_path, capsys, case):
    rec = recordings["sglang"]
    record, message = _bad_cases(rec)[case]
    (tmp_path / "r.jsonl").write_text(json.dumps(record) + "\n")
    (tmp_path / "config.json").write_text(rec.model.config.to_json_string())
    argv = [
        "sglang",
        str(tmp_path / "r.jsonl"),
        "--model",
        str(tmp_path / "config.json"),
        "--out",
        str(tmp_path / "o"),
    ]
    assert import_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("routescope: error: ")
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_vllm_bad_payloads_and_missing_model(recordings, tmp_path, capsys):
    rec = recordings["vllm"]
    (tmp_path / "r.json").write_text(json.dumps(vllm_newest(rec, 0)))
    (tmp_path / "config.json").write_text(rec.model.config.to_json_string())
    argv = ["vllm", str(tmp_path / "r.json"), "--model", str(tmp_path), "--out", str(tmp_path / "o")]
    assert import_main([*argv, "--num-experts", "8"]) == 2
    assert "--num-experts do not apply to server responses" in capsys.readouterr().err
    assert import_main(["sglang", str(tmp_path / "r.json"), "--out", str(tmp_path / "o")]) == 2
    assert "SGLang server responses need --model CONFIG" in capsys.readouterr().err
    wrong = vllm_newest(rec, 0)
    wrong["choices"][0]["token_ids"] = wrong["choices"][0]["token_ids"][:-2]
    with pytest.raises(
        rs.RouteScopeError, match=r"record 0 choice 0 \(id cmpl-0\): 10 routing rows; expected .* = 8"
    ):
        import_responses("vllm", [wrong], rec.model.config)
    past = vllm_newest(rec, 0, start=2)
    past["request"]["routed_experts_prompt_start"] = PROMPT + 2
    with pytest.raises(rs.RouteScopeError, match="routing starts at position 8, past the 6-token prompt"):
        import_responses("vllm", [past], rec.model.config)
    layers = vllm_newest(rec, 0)
    layers["choices"][0]["routed_experts"] = vllm_wire(rec.rows[0][:, :2, :].astype(np.uint8))
    all_moe = dict(rec.model.config.to_dict(), first_k_dense_replace=0)  # three MoE layers
    with pytest.raises(
        rs.RouteScopeError, match=r"has 2 layers; expected 3 \(every decoder layer\) or 3 \(the MoE"
    ):
        import_responses("vllm", [layers], all_moe)
    with pytest.raises(rs.RouteScopeError, match="no prompt token ids"):
        import_responses(
            "vllm",
            [{"choices": [{"token_ids": [1], "routed_experts": vllm_wire(rec.rows[0][:0])}]}],
            rec.model.config,
        )


def test_sessions_must_continue_one_sequence_and_prompts_must_match_records(recordings):
    rec = recordings["sglang"]
    turn1 = sglang_native(rec, 0, end=PROMPT + 2, session_id="a")
    turn2 = sglang_native(rec, 0, start=PROMPT + 1, session_id="a")
    turn2["input_ids"] = [rec.ids[0][0], rec.ids[0][1] + 1, *rec.ids[0][2 : PROMPT + 3]]
    turn2["output_ids"] = rec.ids[0][PROMPT + 3 :]
    with pytest.raises(
        rs.RouteScopeError, match=r"record 1 \(rid rid-0\): its prompt differs from its session's "
    ):
        import_responses("sglang", [turn1, turn2], rec.model.config)
    with pytest.raises(rs.RouteScopeError, match="--prompts has 1 prompts for 2 response records"):
        import_responses("sglang", [turn1, turn1], rec.model.config, prompts=[rec.ids[0][:PROMPT]])


def test_layout_rules_agree_with_the_layers_record_finds(recordings):
    for engine, rec in recordings.items():
        sites = [
            s.layer
            for s in __import__("routescope.capture.discovery", fromlist=["x"]).find_routers(rec.model)
        ]
        assert list(rec.layout.moe_layers) == sites == [1, 2], engine
    assert load_layout(
        {"num_hidden_layers": 4, "num_local_experts": 8, "num_experts_per_tok": 2}
    ).moe_layers == (0, 1, 2, 3)
    with pytest.raises(rs.RouteScopeError, match="no expert count, top-k in the model config"):
        load_layout({"num_hidden_layers": 4, "model_type": "llama"})


@pytest.mark.slow
def test_reading_responses_never_imports_torch(recordings, tmp_path):
    rec = recordings["vllm"]
    (tmp_path / "r.jsonl").write_text(json.dumps(vllm_newest(rec, 0)) + "\n")
    (tmp_path / "config.json").write_text(rec.model.config.to_json_string())
    code = (
        "import sys; from routescope.importers.responses import import_response_file; "
        f"import_response_file('vllm', {str(tmp_path / 'r.jsonl')!r}, {str(tmp_path)!r}); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)

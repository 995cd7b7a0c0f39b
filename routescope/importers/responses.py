"""Rollouts as SGLang and vLLM servers return them: response records -> sequences -> a run.

RL frameworks keep each generation's response with the experts the server routed every
token to, and replay that routing in training (R3, docs/replay.md). The engine modules
(`sglang/responses.py`, `vllm/responses.py`) decode one record into `Turn`s: the prompt
and output token ids, the first position the routing covers, and one row per covered
position with the top-k ids of every MoE layer. This module places the turns:

- **Positions.** A turn's rows cover `[start, prompt + output - 1)`: `start` is SGLang's
  `routed_experts_start_len` or vLLM's `routed_experts_prompt_start` (0 when absent), and
  the last generated token has no row because the server never runs it through the model.
  A row count that differs is refused, naming the request.
- **Layers.** Rows hold every decoder layer (dense ones zero), or the MoE layers only
  (vLLM 0.21). Which layers are MoE comes from the model config (`core/model_layout.py`), never
  from looking for zeros: zero is also a valid expert id.
- **Sessions.** The turns of one multi-turn conversation continue one sequence (one
  `seq_id`): the second turn's prompt repeats the first turn's tokens and sets `start` to
  skip the routing already returned. A turn joins the sequence named by its `session_id`
  (the record's `session_id`, `metadata.session_id` or SGLang's `session_params.id`);
  without one, a turn with `start > 0` continues the most recent sequence that its prompt
  extends (equal token ids before `start`, and `start` at or past that sequence's last
  returned row). Rows from `start` on replace what earlier turns said for those positions.
- **Context tokens.** Prompt positions before `start` that no earlier turn covered (a
  lone later turn, or a `start` past the previous turn) and rows never computed go to the
  `context_tokens` table (ids only, `schema.CONTEXT_TOKENS`), not to `tokens`: every token
  keeps its k routing rows per MoE layer, and later tokens still match by content in replay.
  The last generated token is not written: nothing follows it, and it has no routing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from routescope import schema
from routescope.importers.core.files import check_input_file, clean_text
from routescope.importers.core.model_layout import MoELayout, load_layout
from routescope.importers.core.tables import (
    ImportedRun,
    ImportFormatError,
    sequences_to_tables,
    write_imported_run,
)
from routescope.importers.core.turns import (  # noqa: F401 - older imports read them here
    Lookup,
    Turn,
    session_of,
    start_of,
    to_moe_rows,
    token_ids,
)
from routescope.importers.sglang import responses as sglang_responses
from routescope.importers.vllm import responses as vllm_responses


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Response records from JSON lines (one object per line) or one JSON list / object."""
    path = check_input_file(path, "a server-response JSON / JSONL")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ImportFormatError(
            f"{path}: not UTF-8 text; expected JSON lines or a JSON list of responses"
        ) from None
    try:
        stripped = text.lstrip()
        if stripped.startswith("[") or (stripped.startswith("{") and _one_document(text)):
            loaded = json.loads(text)
            records = loaded if isinstance(loaded, list) else [loaded]
        else:
            records = []
            for number, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except ValueError as exc:
                        raise ImportFormatError(
                            f"{path}: line {number} is not JSON ({clean_text(str(exc), 80)}); expected one "
                            "response object per line"
                        ) from None
    except ValueError as exc:
        if isinstance(exc, ImportFormatError):
            raise
        raise ImportFormatError(f"{path}: not valid JSON: {clean_text(str(exc), 120)}") from None
    flat: list[Any] = []
    for record in records:  # SGLang's /generate with n > 1 answers a list per request
        flat.extend(record if isinstance(record, list) else [record])
    for i, record in enumerate(flat):
        if not isinstance(record, dict):
            raise ImportFormatError(
                f"{path}: record {i} is a {type(record).__name__}; expected a response object"
            )
    if not flat:
        raise ImportFormatError(f"{path}: no response records")
    return flat


def _one_document(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def read_prompts(path: str | Path) -> list[list[int]]:
    """--prompts FILE: one prompt's token ids per line, as a JSON list or ints separated by spaces / commas."""
    path = check_input_file(path, "a prompt token-id")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            ids = (
                json.loads(line)
                if line.lstrip().startswith("[")
                else [int(x) for x in line.replace(",", " ").split()]
            )
        except ValueError:
            ids = None
        if not isinstance(ids, list) or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in ids
        ):
            raise ImportFormatError(
                f"--prompts {path}: line {number} is not a list of token ids; expected e.g. [1, 2, 3] or '1 2 3'"
            )
        prompts.append(ids)
    return prompts


@dataclass
class _Sequence:
    ids: list[int]  # every token id known, up to the latest turn's last generated token
    experts: np.ndarray  # [len(ids), MoE layers, k], -1 where no routing was returned
    phase: list[str]
    step: list[int]
    returned_end: int  # one past the last position with a returned row


def assemble(turns: Iterable[Turn], layout: MoELayout) -> tuple[list[_Sequence], dict[str, int]]:
    """Place each turn's rows at their positions; turns of one session continue one sequence."""
    sequences: list[_Sequence] = []
    by_session: dict[str, _Sequence] = {}
    width, k = len(layout.moe_layers), layout.top_k
    for turn in turns:
        p, o = len(turn.prompt_ids), len(turn.output_ids)
        if turn.start > p:
            raise ImportFormatError(
                f"{turn.name}: routing starts at position {turn.start}, past the {p}-token prompt; "
                f"expected a start in 0..{p}"
            )
        expected = max(p + o - 1 - turn.start, 0)
        if turn.rows.shape[0] != expected:
            raise ImportFormatError(
                f"{turn.name}: {turn.rows.shape[0]} routing rows; expected prompt {p} + output {o} - 1 - start "
                f"{turn.start} = {expected} (the last generated token is never returned)"
            )
        ids = turn.prompt_ids + turn.output_ids
        seq = by_session.get(turn.session) if turn.session is not None else None
        if seq is None and turn.session is None and turn.start > 0:
            seq = _continued(sequences, ids, turn.start)
        if seq is None:
            seq = _Sequence([], np.full((0, width, k), -1, dtype=np.int64), [], [], 0)
            sequences.append(seq)
            if turn.session is not None:
                by_session[turn.session] = seq
        known = min(turn.start, len(seq.ids))
        if seq.ids[:known] != ids[:known]:
            at = next(i for i in range(known) if seq.ids[i] != ids[i])
            raise ImportFormatError(
                f"{turn.name}: its prompt differs from its session's earlier turns at position {at} "
                f"(token {ids[at]}, earlier {seq.ids[at]}); the turns of one session continue one sequence"
            )
        keep = min(len(seq.ids), turn.start)  # earlier turns' tokens before this turn's rows
        experts = np.full((len(ids), width, k), -1, dtype=np.int64)
        experts[:keep] = seq.experts[:keep]
        experts[turn.start : turn.start + expected] = turn.rows
        phase = seq.phase[:keep] + [
            schema.PHASE_PREFILL if i < p else schema.PHASE_DECODE for i in range(keep, len(ids))
        ]
        seq.step = seq.step[:keep] + [turn.step] * (len(ids) - keep)
        seq.ids, seq.experts, seq.phase = ids, experts, phase
        returned = np.flatnonzero((experts >= 0).all(axis=(1, 2)))
        seq.returned_end = int(returned[-1]) + 1 if len(returned) else 0
    counts = {"sequences": len(sequences), "sessions_named": len(by_session)}
    return sequences, counts


def _continued(sequences: list[_Sequence], ids: list[int], start: int) -> _Sequence | None:
    """The most recent sequence this prompt extends: equal ids before `start`, and `start` not
    before that sequence's last returned row (so a sibling's later turns are never overwritten)."""
    for seq in reversed(sequences):
        n = min(start, len(seq.ids))
        if seq.returned_end <= start and seq.ids[:n] == ids[:n]:
            return seq
    return None


def to_imported_run(
    sequences: list[_Sequence], layout: MoELayout, engine: str, extra: dict[str, Any]
) -> ImportedRun:
    """Sequences -> tokens and routing (positions with returned rows) and context_tokens (ids only,
    positions before a returned row that have none); positions after the last returned row are left out."""
    chunks: list[dict[str, Any]] = []
    context: dict[str, list[np.ndarray]] = {"seq_id": [], "pos": [], "token_id": []}
    for seq_id, seq in enumerate(sequences):
        n = seq.returned_end
        if n == 0:
            continue
        routed = (seq.experts[:n] >= 0).all(axis=(1, 2))
        pos = np.arange(n)
        ids = np.asarray(seq.ids[:n], dtype=np.int64)
        context["seq_id"].append(np.full(int((~routed).sum()), seq_id, dtype=np.int64))
        context["pos"].append(pos[~routed].astype(np.int32))
        context["token_id"].append(ids[~routed].astype(np.int32))
        chunks.append(
            {
                "seq_id": seq_id,
                "experts": seq.experts[:n][routed],
                "pos": pos[routed],
                "token_ids": ids[routed],
                "step": np.asarray(seq.step[:n])[routed],
                "phase": np.asarray(seq.phase[:n], dtype=object)[routed],
            }
        )
    if not chunks:
        raise ImportFormatError("no record returned any routing row; nothing to import")
    layers = list(layout.moe_layers)
    tokens, routing, _ = sequences_to_tables(chunks, layers)
    context_cols = {name: np.concatenate(parts) for name, parts in context.items()}
    return ImportedRun(
        engine=engine,
        mode="responses",
        num_hidden_layers=layout.num_hidden_layers,
        num_experts={layer: layout.num_experts for layer in layers},
        top_k={layer: layout.top_k for layer in layers},
        tokens=tokens,
        routing=routing,
        context_tokens=context_cols if len(context_cols["pos"]) else None,
        extra={
            **extra,
            "sequences": len(chunks),
            "context_tokens": len(context_cols["pos"]),
            "layer_numbering": f"decoder_layer (model config: {layout.rule})",
            "num_experts_inferred": False,
        },
    )


def import_responses(
    engine: str,
    responses: Sequence[dict[str, Any]],
    config: Any,
    out: str | Path | None = None,
    prompts: Sequence[Sequence[int]] | None = None,
    overwrite: bool = False,
    source: str = "responses",
) -> ImportedRun:
    """Import SGLang or vLLM server responses (dicts as the server returned them) as a run.

    `engine`: 'sglang' or 'vllm'. `config`: the model's config (a config.json path, a model
    folder, a dict or a transformers config) saying which decoder layers are MoE.
    `prompts`: the prompt token ids of each response, in order, for responses that do not
    carry them. With `out`, the run is written there. Returns the ImportedRun.
    """
    decoders = {"sglang": sglang_responses.turns_of, "vllm": vllm_responses.turns_of}
    if engine not in decoders:
        raise ValueError(f"engine={engine!r} is not allowed; use one of {', '.join(decoders)}")
    layout = config if isinstance(config, MoELayout) else load_layout(config)
    if prompts is not None and len(prompts) != len(responses):
        raise ImportFormatError(
            f"--prompts has {len(prompts)} prompts for {len(responses)} response records; expected one per record"
        )
    turns: list[Turn] = []
    for i, record in enumerate(responses):
        if not isinstance(record, dict):
            raise ImportFormatError(
                f"{source}: record {i} is a {type(record).__name__}; expected a response object"
            )
        given = list(prompts[i]) if prompts is not None else None
        turns += decoders[engine](record, i, given, layout, f"{source}: record {i}")
    sequences, counts = assemble(turns, layout)
    imported = to_imported_run(
        sequences, layout, engine, {"requests": len(responses), "turns": len(turns), **counts}
    )
    if out is not None:
        write_imported_run(imported, out, model_type=layout.model_type, overwrite=overwrite, sources=[source])
    return imported


def import_response_file(
    engine: str,
    path: str | Path,
    config: Any,
    prompts: str | Path | None = None,
) -> tuple[ImportedRun, MoELayout]:
    """`routescope import {sglang,vllm} FILE --model CONFIG [--prompts FILE]`: read and convert."""
    layout = load_layout(config)
    records = read_records(path)
    given = read_prompts(prompts) if prompts is not None else None
    return import_responses(engine, records, layout, prompts=given, source=str(path)), layout

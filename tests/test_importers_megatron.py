"""`routescope import megatron DIR`: Megatron-Core router traces, written here exactly as the
merged tracer (NVIDIA/Megatron-LM c1560d94, megatron/core/transformer/moe/router_trace.py)
writes them, from routing recorded on tiny transformers models, so every count is known.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import routescope as rs
from routescope.cli import main as cli_main
from routescope.importers.core.errors import ImportFormatError
from routescope.importers.core.tables import write_imported_run
from routescope.importers.megatron import import_megatron
from routescope.importers.megatron.sidecars import bf16_to_float32
from tests.tiny_models import build_tiny_model

E, K = 4, 2


# -- the tracer's output, as router_trace.py writes it ------------------------------------
def trace_line(step, block, layer, rank, top, mtp_idx=None, logits_at=None, hs_at=None) -> str:
    """One record: keys in the tracer's order (_make_index_record, then the sidecars, then
    top_indices appended by _flush_records_to_disk), serialised with json.dumps."""
    record = {
        "step": int(step),
        "stage": "pre_dispatch",
        "block": block,
        "layer": int(layer),
        "rank": rank,
        "num_tokens": int(top.shape[0]),
        "topk": int(top.shape[1]),
    }
    if mtp_idx is not None:
        record["mtp_idx"] = int(mtp_idx)
    if hs_at is not None:
        record["hs_offset"], record["hs_bytes"], record["hs_shape"] = hs_at
    if logits_at is not None:
        record["logit_offset"], record["logit_bytes"], record["logit_shape"] = logits_at
    record["top_indices"] = torch.as_tensor(top, dtype=torch.int32).tolist()
    return json.dumps(record) + "\n"


class TraceWriter:
    """router_trace_rank{r}.jsonl and logits_rank{r}.bin of one rank."""

    def __init__(self, trace_dir: Path, rank: int, logits: bool = False, hidden: bool = False) -> None:
        trace_dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.logits, self.hidden = rank, logits, hidden
        self.hs_bin, self.hs_offset = trace_dir / f"hidden_states_rank{rank}.bin", 0
        self.jsonl = trace_dir / f"router_trace_rank{rank}.jsonl"
        self.bin = trace_dir / f"logits_rank{rank}.bin"
        self.jsonl.write_text("")
        if logits:
            self.bin.write_bytes(b"")
        self.offset = 0

    def add(self, step, layer, top, logits=None, block="decoder", mtp_idx=None, hidden=None) -> None:
        at = hs_at = None
        if self.hidden and hidden is not None:  # the hidden-state sidecar comes before the logits
            data = torch.as_tensor(hidden).to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
            with open(self.hs_bin, "ab") as f:
                f.write(data)
            hs_at = (self.hs_offset, len(data), list(hidden.shape))
            self.hs_offset += len(data)
        if self.logits and logits is not None:
            data = torch.as_tensor(logits).to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
            with open(self.bin, "ab") as f:
                f.write(data)
            at = (self.offset, len(data), list(logits.shape))
            self.offset += len(data)
        with open(self.jsonl, "a") as f:
            f.write(trace_line(step, block, layer, self.rank, top, mtp_idx, at, hs_at))


# -- recordings ---------------------------------------------------------------------------
def tiny(seed=0, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_tiny_model("qwen3_moe", seed=seed, **overrides)
    for layer in model.model.layers:  # a sharper router: bf16 logits keep every first choice apart
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.weight.data *= 30
    return model


class Recording:
    """Forwards of a tiny model recorded with rs.record; per forward and MoE layer the ranked
    experts [B, T, k] (from the run) and the fp32 router logits [B, T, E] (a hook on the gate)."""

    def __init__(self, model, run_dir: Path, batches=None, generate=None) -> None:
        self.model, self.run_dir = model, run_dir
        self.moe = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
        self.logits: list[dict[int, torch.Tensor]] = []
        self.hidden_flat: list[dict[int, torch.Tensor]] = []  # the router's input [B * T, H]
        hooks = [model.model.layers[i].mlp.gate.register_forward_pre_hook(self._hook(i)) for i in self.moe]
        try:
            with torch.no_grad(), rs.record(model, run_dir, router_stats=True):
                for ids in batches or []:
                    model(ids)
                if generate is not None:
                    model.generate(
                        input_ids=generate,
                        attention_mask=torch.ones_like(generate),
                        max_new_tokens=3,
                        min_new_tokens=3,
                        do_sample=False,
                        pad_token_id=0,
                    )
        finally:
            for hook in hooks:
                hook.remove()
        with rs.open_run(run_dir) as run:
            self.routing = run.sql(
                "SELECT t.step, r.seq_id, r.pos, r.layer, r.slot, r.expert, t.phase FROM routing r "
                "JOIN tokens t USING (seq_id, pos) ORDER BY ALL"
            )
            self.router_stats = run.sql("SELECT step, layer, expert, prob_sum, tokens FROM router_stats")
            self.router_tokens = run.sql("SELECT seq_id, pos, layer, entropy, margin FROM router_tokens")

    def _hook(self, layer):
        def hook(module, inputs):
            if not self.logits or layer in self.logits[-1]:  # a layer firing again: the next forward
                self.logits.append({})
                self.hidden_flat.append({})
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            self.logits[-1][layer] = F.linear(x, module.weight.float())
            self.hidden_flat[-1][layer] = x

        return hook

    def experts(self, step: int, layer: int) -> np.ndarray:
        """[B, T, k] ranked experts of recorded step `step` (rows ordered by seq_id, pos)."""
        part = self.routing[(self.routing.step == step) & (self.routing.layer == layer)]
        seqs = sorted(part.seq_id.unique())
        first = part.pos.min()  # a decode step holds one position per sequence
        out = np.full((len(seqs), part.pos.max() + 1 - first, K), -1)
        out[np.searchsorted(seqs, part.seq_id), part.pos - first, part.slot] = part.expert
        return out

    def step_logits(self, step: int, layer: int) -> torch.Tensor:
        b, t, _ = self.experts(step, layer).shape
        return self.logits[step][layer].reshape(b, t, -1)

    @property
    def hidden(self) -> list[dict[int, torch.Tensor]]:
        """Per forward and MoE layer the router input [B, T, H]."""
        out = []
        for step, layers in enumerate(self.hidden_flat):
            out.append(
                {layer: x.reshape(*self.experts(step, layer).shape[:2], -1) for layer, x in layers.items()}
            )
        return out


def training_rows(x) -> np.ndarray:
    """[B, T, ...] -> Megatron's sequence-first flattening [T * B, ...] (row = position * B + sample)."""
    x = np.asarray(x)
    return x.transpose(1, 0, *range(2, x.ndim)).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def loads(run_or_frame, where: str = "") -> dict[tuple, int]:
    if isinstance(run_or_frame, rs.Run):
        df = run_or_frame.sql(
            f"SELECT t.step, r.layer, r.expert, count(*) AS n FROM routing r JOIN tokens t USING (seq_id, pos) "
            f"{where} GROUP BY ALL"
        )
    else:
        df = run_or_frame.groupby(["step", "layer", "expert"]).size().reset_index(name="n")
    return {(int(s), int(layer), int(e)): int(n) for s, layer, e, n in df.itertuples(index=False)}


def first_choice_pairs(frame) -> dict[tuple, int]:
    """Contingency of (slot-0 expert at layer a, slot-0 expert at the next MoE layer b)."""
    top1 = frame[frame.slot == 0].pivot_table(index=["seq_id", "pos"], columns="layer", values="expert")
    a, b = top1.columns[:2]
    counts = top1.groupby([a, b]).size()
    return {(int(x), int(y)): int(n) for (x, y), n in counts.items()}


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    """Dense layer 0, MoE layers 1-2; two data-parallel ranks, logits on rank 1 only.
    Rank 0: iteration 100 with two micro-batches (forwards 0, 1); rank 1: iterations 100, 101."""
    root = tmp_path_factory.mktemp("megatron_training")
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(2, 100, (2, 5), generator=gen) for _ in range(4)]
    rec = Recording(tiny(num_hidden_layers=3, mlp_only_layers=[0]), root / "recorded", batches=batches)
    trace = root / "trace"
    writers = {0: TraceWriter(trace, 0), 1: TraceWriter(trace, 1, logits=True)}
    plan = [(0, 100), (0, 100), (1, 100), (1, 101)]  # (rank, iteration) of each forward
    for forward, (rank, iteration) in enumerate(plan):
        for layer in rec.moe:
            ranked = rec.experts(forward, layer)
            top = np.sort(training_rows(ranked), axis=1)  # routing_map.nonzero(): ascending ids
            logits = torch.as_tensor(training_rows(rec.step_logits(forward, layer)))
            writers[rank].add(iteration, layer, top, logits)
    return rec, trace, plan


def imported(trace, out, **kwargs):
    imp = import_megatron(trace, **kwargs)
    write_imported_run(imp, out, overwrite=True, sources=[trace])
    return rs.open_run(out)


# -- training: two data-parallel ranks, logits on one ------------------------------------
@pytest.mark.slow
def test_training_loads_ranks_and_first_choices_equal_the_recording(training, tmp_path):
    rec, trace, plan = training
    run = imported(trace, tmp_path / "run", mode="training")
    m = run.manifest
    assert m["moe_layers"] == [1, 2] and m["num_hidden_layers"] == 3  # the dense layer 0 wrote nothing
    assert m["num_experts"] == {"1": E, "2": E} or m["num_experts"] == {1: E, 2: E}
    assert m["imported_from"]["num_experts_from"] == "logits sidecar shape"
    assert m["imported_from"]["slot_order"] == "mixed"
    assert m["imported_from"]["slot_order_ties"] == 0  # precondition: bf16 kept every choice apart
    # loads per layer and trace step equal the recorded forwards of that (rank, iteration)
    truth: dict[tuple, int] = {}
    for forward, (_, iteration) in enumerate(plan):
        for (_step, layer, expert), n in loads(rec.routing[rec.routing.step == forward]).items():
            truth[(iteration, layer, expert)] = truth.get((iteration, layer, expert), 0) + n
    assert loads(run) == truth
    # tokens per rank, and one sequence per (rank, iteration, micro-batch)
    per_rank = run.sql(
        "SELECT rank, count(*) AS n, count(DISTINCT seq_id) AS seqs FROM tokens GROUP BY rank ORDER BY rank"
    )
    assert per_rank.values.tolist() == [[0, 20, 2], [1, 20, 2]]
    assert set(run.sql("SELECT DISTINCT phase FROM tokens").phase) == {"prefill"}
    assert run.sql("SELECT max(pos) AS p FROM tokens").p[0] == 9  # rows of one [T * B] forward
    # with logits (rank 1), slot 0 is the first choice: first-choice contingencies equal the recording
    known = run.sql(
        "SELECT r.* FROM routing r JOIN tokens t USING (seq_id, pos) WHERE t.slot_order <> 'unknown'"
    )
    assert run.sql("SELECT DISTINCT rank FROM tokens WHERE slot_order <> 'unknown'")["rank"].tolist() == [1]
    recorded = rec.routing[rec.routing.step.isin([2, 3])]
    assert first_choice_pairs(known) == first_choice_pairs(recorded)
    assert sorted(map(tuple, known[["layer", "slot", "expert"]].values.tolist())) == sorted(
        map(tuple, recorded[["layer", "slot", "expert"]].values.tolist())
    )
    trans = run.transition(1, 2, where="slot_order <> 'unknown'")
    assert {(int(a), int(b)): int(n) for a, b, n in trans[["expert_a", "expert_b", "count"]].values if n} == (
        first_choice_pairs(recorded)
    )


@pytest.mark.slow
def test_training_router_stats_come_from_the_logits(training, tmp_path):
    rec, trace, _ = training
    run = imported(trace, tmp_path / "run", mode="training")
    assert run.manifest["router_stats"] is True
    got = run.sql("SELECT step, layer, expert, prob_sum, tokens FROM router_stats ORDER BY ALL")
    want = rec.router_stats[rec.router_stats.step.isin([2, 3])].sort_values(["step", "layer", "expert"])
    assert got.tokens.tolist() == want.tokens.tolist()
    assert got.step.tolist() == [100 if s == 2 else 101 for s in want.step]
    np.testing.assert_allclose(got.prob_sum, want.prob_sum, rtol=0.05, atol=0.05)  # bf16 logits
    assert run.sql("SELECT count(*) AS n FROM router_tokens").n[0] == 20 * 2  # rank 1's tokens, 2 layers
    entropy = run.sql("SELECT avg(entropy) AS h, avg(margin) AS m FROM router_tokens")
    recorded = rec.router_tokens.merge(
        rec.routing[rec.routing.step.isin([2, 3])][["seq_id"]].drop_duplicates(), on="seq_id"
    )
    assert entropy.h[0] == pytest.approx(recorded.entropy.mean(), abs=0.02)
    assert entropy.m[0] == pytest.approx(recorded.margin.mean(), abs=0.02)


@pytest.mark.slow
def test_unknown_slot_order_is_said_not_guessed(training, tmp_path):
    _rec, trace, _ = training
    run = imported(trace, tmp_path / "run")
    imp = run.manifest["imported_from"]
    assert imp["slot_order_unknown_tokens"] == 20  # rank 0: ascending ids, no logits
    assert set(run.sql("SELECT DISTINCT phase FROM tokens").phase) == {"unknown"}  # no --mode
    for metric in (run.entanglement, run.repetition_rate, run.pathways):
        with pytest.raises(ValueError, match="unknown slot order"):
            metric()
    assert not run.entanglement(where="slot_order <> 'unknown'").empty
    assert run.balance()["tokens"].sum() > 0  # loads need no slot order
    from routescope.analysis.compare import router_saturation

    saturation, notes = router_saturation(run, run)
    assert saturation.empty and notes == [
        "run A has no token ids (token_id -1): router saturation matches tokens by content"
    ]


@pytest.mark.slow
def test_report_and_dashboard_queries_work_on_the_import(training, tmp_path, capsys):
    _, trace, _ = training
    out = tmp_path / "run"
    assert cli_main(["import", "megatron", str(trace), "--out", str(out), "--mode", "training"]) == 0
    assert "imported 40 tokens from ranks [0, 1]" in capsys.readouterr().out
    assert cli_main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "unknown slot order" in printed  # entanglement is skipped, and says why
    assert cli_main(["check", str(out)]) == 0
    assert cli_main(["placement", str(out), "--ep-size", "2"]) == 0
    capsys.readouterr()
    assert cli_main(["compare", str(out), str(out)]) == 0
    assert "no token ids" in capsys.readouterr().out
    from routescope.dashboard import queries

    run = rs.open_run(out)
    assert queries.summary(run)
    assert not queries.balance(run).empty
    assert not queries.step_loads(run).empty
    ranks = queries.rank_loads(run)
    assert sorted(ranks["rank"].unique()) == [0, 1]
    from routescope.dashboard.app import create_app
    from routescope.dashboard.pages import entanglement

    create_app([out])
    state = {"run": "0", "version": None}
    *_figures, message = entanglement.update_entanglement(state, "1-2", 10)
    assert "unknown slot order" in str(message)  # the page says why instead of lowest-id pairs


# -- inference with decode steps ----------------------------------------------------------
@pytest.mark.slow
def test_inference_steps_and_phases_equal_the_recording(tmp_path):
    prompts = torch.randint(2, 100, (2, 5), generator=torch.Generator().manual_seed(2))
    rec = Recording(tiny(seed=1), tmp_path / "recorded", generate=prompts)
    steps = sorted(rec.routing.step.unique())
    assert len(steps) == 3  # prefill and two decode forwards
    writer = TraceWriter(tmp_path / "trace", 0)
    for step in steps:
        for layer in rec.moe:
            ranked = rec.experts(step, layer)
            rows = ranked.reshape(-1, K)  # the engine's flattened [B * T] rows
            writer.add(step, layer, np.sort(rows, axis=1))  # hook path: routing_map.nonzero()
    run = imported(tmp_path / "trace", tmp_path / "run", mode="inference", num_experts=E)
    assert loads(run) == loads(rec.routing)
    phases = run.sql(
        "SELECT step, min(phase) AS p, max(phase) AS q, count(*) AS n FROM tokens GROUP BY step ORDER BY step"
    )
    recorded = rec.routing[rec.routing.slot == 0].groupby("step").agg(p=("phase", "min"), n=("phase", "size"))
    assert phases.p.tolist() == phases.q.tolist() == recorded.p.tolist() == ["prefill", "decode", "decode"]
    assert phases.n.tolist() == (recorded.n // len(rec.moe)).tolist()
    assert run.manifest["imported_from"]["num_experts_from"] == "--num-experts"
    assert run.manifest["imported_from"]["slot_order"] == "unknown"
    # the sink path (--moe-enable-routing-replay) writes the router's ranked top-k indices:
    # rows that are not ascending show it, and their order is kept as the first choice
    sink = TraceWriter(tmp_path / "sink", 0)
    for step in steps:
        for layer in rec.moe:
            sink.add(step, layer, rec.experts(step, layer).reshape(-1, K))
    ranked = imported(tmp_path / "sink", tmp_path / "sink_run", mode="inference", num_experts=E)
    assert ranked.manifest["imported_from"]["slot_order"] == "written"
    assert ranked.manifest["imported_from"]["slot_order_unknown_tokens"] == 0
    trans = ranked.transition(*rec.moe)
    got = {(int(a), int(b)): int(n) for a, b, n in trans[["expert_a", "expert_b", "count"]].values if n}
    assert got == first_choice_pairs(rec.routing)


# -- MTP colliding with decoder layer 0 ----------------------------------------------------
@pytest.mark.slow
def test_mtp_layer_0_stays_apart_from_decoder_layer_0(tmp_path):
    ids = torch.randint(2, 100, (2, 6), generator=torch.Generator().manual_seed(3))
    rec = Recording(tiny(seed=2, num_hidden_layers=3), tmp_path / "recorded", batches=[ids])
    writer = TraceWriter(tmp_path / "trace", 0, logits=True, hidden=True)
    for layer in rec.moe:  # recorded layer 2 plays the MTP head's layer 0
        block, mtp_idx, number = ("mtp", 0, 0) if layer == 2 else ("decoder", None, layer)
        logits = torch.as_tensor(training_rows(rec.step_logits(0, layer)))
        hidden = torch.as_tensor(training_rows(rec.hidden[0][layer]))
        top = np.sort(training_rows(rec.experts(0, layer)), axis=1)
        writer.add(7, number, top, logits, block, mtp_idx, hidden)
    text = (tmp_path / "trace" / "router_trace_rank0.jsonl").read_text().splitlines()
    assert list(json.loads(text[2])) == [
        "step", "stage", "block", "layer", "rank", "num_tokens", "topk", "mtp_idx",
        "hs_offset", "hs_bytes", "hs_shape", "logit_offset", "logit_bytes", "logit_shape", "top_indices",
    ]  # fmt: skip
    run = imported(tmp_path / "trace", tmp_path / "run", mode="training")
    assert run.moe_layers == [0, 1, 2]
    assert run.manifest["imported_from"]["layers"]["2"] == {
        "block": "mtp",
        "layer": 0,
        "stage": 0,
        "mtp_idx": 0,
    }
    assert run.manifest["imported_from"]["layers"]["0"] == {"block": "decoder", "layer": 0, "stage": 0}
    truth = {(7, layer, e): n for (_, layer, e), n in loads(rec.routing).items()}
    assert loads(run) == truth  # layer 0 holds the decoder's loads only, layer 2 the MTP's


# -- pipeline stages restart `layer` at 0 --------------------------------------------------
@pytest.mark.slow
def test_pipeline_stages_are_renumbered_and_join_the_same_tokens(tmp_path):
    ids = torch.randint(2, 100, (2, 4), generator=torch.Generator().manual_seed(4))
    rec = Recording(tiny(seed=3, num_hidden_layers=4), tmp_path / "recorded", batches=[ids])
    writers = {0: TraceWriter(tmp_path / "trace", 0), 1: TraceWriter(tmp_path / "trace", 1)}
    for layer in rec.moe:  # stage 0: layers 0-1, stage 1: layers 2-3 written as its 0-1
        top = np.sort(training_rows(rec.experts(0, layer)), axis=1)
        writers[layer // 2].add(3, layer % 2, top)
    run = imported(tmp_path / "trace", tmp_path / "run", num_experts=E, pipeline_stages=2)
    assert run.moe_layers == [0, 1, 2, 3]
    assert run.sql("SELECT DISTINCT rank FROM tokens")["rank"].tolist() == [0]
    assert run.sql("SELECT count(*) AS n FROM tokens").n[0] == 8
    assert loads(run) == {(3, layer, e): n for (_, layer, e), n in loads(rec.routing).items()}
    assert run.manifest["imported_from"]["layers"]["3"] == {"block": "decoder", "layer": 1, "stage": 1}
    spaced = import_megatron(tmp_path / "trace", num_experts=E, pipeline_stages=2, layers_per_stage=5)
    assert spaced.moe_layers == [0, 1, 5, 6]  # stage 1 starts at 5 (e.g. uneven stages, dense layers)
    with pytest.raises(ImportFormatError, match="--pipeline-stages 3 does not divide the 2 ranks"):
        import_megatron(tmp_path / "trace", num_experts=E, pipeline_stages=3)
    # stages whose layers differ, without --pipeline-stages: refused with the hint
    lines = writers[1].jsonl.read_text().splitlines(keepends=True)
    writers[1].jsonl.write_text(lines[0])
    with pytest.raises(ImportFormatError, match="--pipeline-stages"):
        import_megatron(tmp_path / "trace", num_experts=E)


def test_tensor_parallel_copies_are_kept_once(training, tmp_path):
    """Without sequence parallelism the TP ranks of one data-parallel slot trace the same tokens."""
    _, trace, _ = training
    copy = tmp_path / "trace"
    shutil.copytree(trace, copy)
    lines = (copy / "router_trace_rank1.jsonl").read_text().splitlines()
    (copy / "router_trace_rank2.jsonl").write_text(
        "".join(line.replace('"rank": 1', '"rank": 2') + "\n" for line in lines)
    )
    shutil.copy(copy / "logits_rank1.bin", copy / "logits_rank2.bin")
    plain, copied = import_megatron(trace), import_megatron(copy)
    assert copied.extra["rank_copies"] == {"2": 1} and copied.extra["ranks"] == [0, 1, 2]
    assert copied.token_count() == plain.token_count() == 40


# -- the number of experts ----------------------------------------------------------------
def test_num_experts_from_the_router_state_or_refused(training, tmp_path):
    rec, trace, _ = training
    only_rank0 = tmp_path / "trace"
    only_rank0.mkdir()
    shutil.copy(trace / "router_trace_rank0.jsonl", only_rank0)
    with pytest.raises(
        ImportFormatError, match=r"cannot tell the number of experts.*--num-experts E.*E >= 4"
    ):
        import_megatron(only_rank0)
    gate = rec.model.model.layers[1].mlp.gate
    state = {("decoder", None, 1): {"weight": gate.weight.detach().float(), "expert_bias": None,
                                     "score_function": "softmax", "topk": 2}}  # fmt: skip
    torch.save(state, only_rank0 / "router_state_rank0.pt")
    imp = import_megatron(only_rank0)
    assert imp.num_experts == {1: E, 2: E} and imp.extra["num_experts_from"] == "router-state dump"


# -- bad inputs ---------------------------------------------------------------------------
@pytest.fixture
def bad_copy(training, tmp_path):
    _, trace, _ = training
    copy = tmp_path / "trace"
    shutil.copytree(trace, copy)
    return copy


def _rewrite(path: Path, line: int, change) -> None:
    lines = path.read_text().splitlines(keepends=True)
    record = json.loads(lines[line - 1])
    change(record)
    lines[line - 1] = json.dumps(record) + "\n"
    path.write_text("".join(lines))


@pytest.mark.slow
def test_truncated_last_line_is_named_or_skipped_and_counted(bad_copy, tmp_path, capsys):
    path = bad_copy / "router_trace_rank1.jsonl"
    text = path.read_text()
    path.write_text(text[: len(text) - 40])  # a killed job: the last record is cut off
    with pytest.raises(
        ImportFormatError, match=r"router_trace_rank1\.jsonl:4: the last line is cut off.*--skip-corrupt"
    ):
        import_megatron(bad_copy)
    imp = import_megatron(bad_copy, skip_corrupt=True)
    assert imp.extra["skipped_records"]["counts"] == {"truncated_line": 1}
    assert imp.token_count() == 40  # the tokens stay; only layer 2 of the last step is gone
    run = imported(bad_copy, tmp_path / "run", skip_corrupt=True)
    assert run.sql("SELECT count(*) AS n FROM routing WHERE layer = 2").n[0] == (40 - 10) * K
    assert cli_main(["check", str(tmp_path / "run")]) == 1  # the 10 tokens without layer 2 are reported
    assert "FAIL  k_rows_per_token" in capsys.readouterr().out


def test_missing_rank_inconsistent_topk_and_id_out_of_range(bad_copy):
    with pytest.raises(ImportFormatError, match=r"--num-experts 3, but the logits sidecar holds \[4\]"):
        import_megatron(bad_copy, num_experts=3)
    _rewrite(bad_copy / "router_trace_rank0.jsonl", 3, lambda r: r["top_indices"][5].__setitem__(1, 4))
    with pytest.raises(ImportFormatError, match=r"rank0\.jsonl:3: expert id 4 >= 4 experts"):
        import_megatron(bad_copy)
    imp = import_megatron(bad_copy, skip_corrupt=True)
    assert imp.extra["skipped_records"]["counts"] == {"bad_expert_id": 1}
    _rewrite(
        bad_copy / "router_trace_rank1.jsonl", 2, lambda r: r.update(topk=3, top_indices=[[0, 1, 2]] * 10)
    )
    with pytest.raises(ImportFormatError, match=r"rank1\.jsonl:2: topk 3 for decoder layer 2.*topk 2"):
        import_megatron(bad_copy)
    imp = import_megatron(bad_copy, skip_corrupt=True)
    assert imp.extra["skipped_records"]["counts"] == {"bad_expert_id": 1, "inconsistent_topk": 1}
    (bad_copy / "router_trace_rank0.jsonl").unlink()
    with pytest.raises(ImportFormatError, match=r"router_trace_rank0\.jsonl: missing"):
        import_megatron(bad_copy)
    imp = import_megatron(bad_copy, skip_corrupt=True)
    assert imp.extra["skipped_records"]["counts"]["missing_rank"] == 1
    assert sorted(imp.rank_tables) == [1] and imp.extra["ranks"] == [1]


def test_cli_bad_input_exits_2_with_one_line_and_keeps_an_existing_run(bad_copy, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["import", "megatron", str(bad_copy), "--out", str(out)]) == 0
    before = sorted(p.name for p in out.rglob("*"))
    path = bad_copy / "router_trace_rank0.jsonl"
    _rewrite(path, 1, lambda r: r.update(rank=5))
    capsys.readouterr()
    assert cli_main(["import", "megatron", str(bad_copy), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "router_trace_rank0.jsonl:1: rank 5 in a file named for rank 0" in err[0]
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing already imported is lost
    args = ["import", "megatron", str(bad_copy), "--out", str(out), "--overwrite", "--skip-corrupt"]
    assert cli_main(args) == 0
    assert "skipped: 1 bad_record" in capsys.readouterr().out
    assert rs.open_run(out).manifest["imported_from"]["skipped_records"]["counts"] == {"bad_record": 1}
    assert cli_main(["import", "megatron", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r2")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bf16_sidecar_is_read_without_torch():
    values = torch.tensor([1.0, -2.5, 0.15625, 3.0e-3, 65504.0], dtype=torch.bfloat16)
    raw = np.frombuffer(values.view(torch.int16).numpy().tobytes(), dtype="<u2")
    assert bf16_to_float32(raw).tolist() == values.float().tolist()

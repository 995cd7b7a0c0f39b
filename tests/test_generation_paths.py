"""Every generation path records what the dynamic-cache eager recording of the same inputs
records (which test_capture pins to the routers' own outputs), or is refused up front."""

from __future__ import annotations

import inspect
import time
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import routescope as rs
from routescope.capture.recording import decoded
from routescope.errors import RouteScopeError
from tests.test_capture import padded_batch

COLUMNS = "t.seq_id, t.pos, t.token_id, t.phase, r.layer, r.slot, r.expert, r.weight"


def rows(run_dir) -> pd.DataFrame:
    """Routing rows with their token, seq_ids renumbered from 0 in order of appearance."""
    run = rs.open_run(run_dir)
    df = run.sql(
        f"SELECT {COLUMNS} FROM tokens t JOIN routing r USING (seq_id, pos) "
        "ORDER BY t.seq_id, t.pos, r.layer, r.slot"
    )
    df["seq_id"] = df.seq_id.rank(method="dense").astype(int) - 1
    return df.reset_index(drop=True)


def assert_same_rows(got: pd.DataFrame, want: pd.DataFrame, atol: float = 0.0) -> None:
    keys = ["seq_id", "pos", "token_id", "phase", "layer", "slot", "expert"]
    pd.testing.assert_frame_equal(got[keys], want[keys], check_dtype=False)
    assert (got.weight - want.weight).abs().max() <= atol


def generate(model, ids, mask, **kwargs):
    kwargs.setdefault("max_new_tokens", 4)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0, **kwargs)


@pytest.fixture
def model(tiny_model):
    return tiny_model("qwen3_moe")


def record_generate(model, path, ids, mask, **kwargs):
    with rs.record(model, path):
        out = generate(model, ids, mask, min_new_tokens=4, **kwargs)
    return out


def test_batched_generate_without_padding_continues_each_sequence(model, tmp_path, device):
    ids = torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(1)).to(device)
    with rs.record(model, tmp_path / "run"):
        out = generate(model, ids, None, min_new_tokens=4)
    run = rs.open_run(tmp_path / "run")
    seqs = run.sql("SELECT seq_id, count(*) AS n, max(pos) AS last FROM tokens GROUP BY 1 ORDER BY 1")
    assert len(seqs) == 2
    assert seqs.n.tolist() == [5 + 3, 5 + 3] and seqs["last"].tolist() == [7, 7]
    phases = run.sql("SELECT phase, count(*) AS n FROM tokens GROUP BY 1 ORDER BY 1")
    assert phases.set_index("phase").n.to_dict() == {"decode": 6, "prefill": 10}
    fed = run.sql("SELECT seq_id, pos, token_id FROM tokens ORDER BY seq_id, pos")
    for row, (_, seq) in enumerate(fed.groupby("seq_id")):
        assert seq.token_id.tolist() == out[row, :-1].tolist()  # the sequence generate returned


@pytest.mark.parametrize("padding_side", ["left"])
def test_static_cache_generate_records_what_dynamic_records(model, tmp_path, device, padding_side):
    ids, mask = padded_batch(device, padding_side, lengths=(6, 3))
    out_dynamic = record_generate(model, tmp_path / "dynamic", ids, mask)
    out_static = record_generate(model, tmp_path / "static", ids, mask, cache_implementation="static")
    assert torch.equal(out_dynamic, out_static)
    assert_same_rows(rows(tmp_path / "static"), rows(tmp_path / "dynamic"), atol=1e-5)
    assert rs.open_run(tmp_path / "static").sql("SELECT count(*) AS n FROM tokens").n[0] == 9 + 2 * 3


@pytest.mark.slow
def test_static_cache_with_compile_config_records_compiled(model, tmp_path, device):
    """The decode steps run compiled and the graph records them (capture/recording/compiled.py; inductor
    and fullgraph in tests/test_compiled_capture.py)."""
    from transformers import CompileConfig

    ids, mask = padded_batch(device, "left", lengths=(6, 3))
    config = CompileConfig(backend="eager")
    config._compile_all_devices = True  # transformers compiles on CUDA only by default
    record_generate(model, tmp_path / "dynamic", ids, mask)
    record_generate(
        model, tmp_path / "compiled", ids, mask, cache_implementation="static", compile_config=config
    )
    assert "_compiled_call" in vars(model)
    del model._compiled_call
    assert_same_rows(rows(tmp_path / "compiled"), rows(tmp_path / "dynamic"), atol=1e-5)


def cache_keyword(model) -> str:
    """transformers 5.24 renamed the forward's `past_key_values` to `cache`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def test_manual_decode_loop_with_the_cache_keyword(model, tmp_path, device):
    from transformers import DynamicCache

    ids, mask = padded_batch(device, "left", lengths=(6, 3))
    record_generate(model, tmp_path / "generate", ids, mask)
    key = cache_keyword(model)
    with rs.record(model, tmp_path / "manual"), torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **{key: cache})
        for _ in range(3):
            nxt = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = model(input_ids=nxt, attention_mask=mask, use_cache=True, **{key: cache})
    assert_same_rows(rows(tmp_path / "manual"), rows(tmp_path / "generate"), atol=1e-5)


def test_manual_decode_loop_without_mask_counts_positions(model, tmp_path, device):
    from transformers import DynamicCache

    ids = torch.randint(1, 100, (2, 4), generator=torch.Generator().manual_seed(2)).to(device)
    with rs.record(model, tmp_path / "run"), torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, use_cache=True, **{cache_keyword(model): cache})
        for _ in range(2):
            out = model(
                input_ids=out.logits[:, -1:].argmax(-1), use_cache=True, **{cache_keyword(model): cache}
            )
    tokens = rs.open_run(tmp_path / "run").sql("SELECT seq_id, pos, phase FROM tokens ORDER BY seq_id, pos")
    assert tokens.seq_id.nunique() == 2
    assert tokens.groupby("seq_id").pos.apply(list).tolist() == [[0, 1, 2, 3, 4, 5]] * 2
    assert (tokens.phase[tokens.pos >= 4] == "decode").all()


@pytest.mark.slow
def test_resumed_cache_after_unrelated_forward_of_same_batch_size(model, tmp_path, device):
    from transformers import DynamicCache

    ids = torch.randint(1, 100, (2, 4), generator=torch.Generator().manual_seed(3)).to(device)
    other = torch.randint(1, 100, (2, 3), generator=torch.Generator().manual_seed(4)).to(device)
    with rs.record(model, tmp_path / "run"), torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, use_cache=True, **{cache_keyword(model): cache})
        model(input_ids=other)  # an unrelated forward, same batch size
        model(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True, **{cache_keyword(model): cache})
    run = rs.open_run(tmp_path / "run")
    assert run.sql("SELECT count(*) - count(DISTINCT (seq_id, pos)) AS d FROM tokens").d[0] == 0
    decode = run.sql("SELECT seq_id, pos FROM tokens WHERE phase = 'decode' ORDER BY seq_id")
    first = run.sql("SELECT DISTINCT seq_id FROM tokens WHERE step = 0 ORDER BY 1").seq_id.tolist()
    assert decode.seq_id.tolist() == first and decode.pos.tolist() == [4, 4]


def test_prompt_lookup_never_records_rejected_candidates(model, tmp_path, device):
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]], device=device)
    with rs.record(model, tmp_path / "run"):
        out = generate(model, ids, None, max_new_tokens=8, min_new_tokens=8, prompt_lookup_num_tokens=3)
    run = rs.open_run(tmp_path / "run")
    tokens = run.sql("SELECT seq_id, pos, token_id FROM tokens ORDER BY pos")
    assert tokens.seq_id.nunique() == 1
    assert tokens.pos.tolist() == list(range(out.shape[1] - 1))  # each position once, none beyond
    assert tokens.token_id.tolist() == out[0, :-1].tolist()  # only accepted tokens
    assert run.manifest["skipped"].get("rejected_candidates", 0) >= 0


@pytest.mark.parametrize("cache", [None, "static"])  # static: decode steps given a 4-D mask
@pytest.mark.parametrize("max_run", [64, 2])  # 2: the decode steps' masks made in chained runs
def test_finished_rows_are_not_recorded_after_end_of_text(
    model, tmp_path, device, cache, max_run, monkeypatch
):
    monkeypatch.setattr(decoded, "MAX_RUN", max_run)
    ids, mask = padded_batch(device, "left", lengths=(6, 3))
    given = {"cache_implementation": cache} if cache else {}
    free = generate(model, ids, mask, max_new_tokens=6, **given)
    eos = int(free[0, ids.shape[1] + 1])  # row 0's second new token ends it
    if (free[1, ids.shape[1] :] == eos).any():
        pytest.skip("row 1 emits the same token; pick another seed")
    with rs.record(model, tmp_path / "run"):
        out = generate(model, ids, mask, max_new_tokens=6, eos_token_id=eos, **given)
    run = rs.open_run(tmp_path / "run")
    row0 = run.sql("SELECT token_id FROM tokens WHERE seq_id = 0 ORDER BY pos").token_id.tolist()
    kept = out[0][mask[0].bool().tolist() + [True] * (out.shape[1] - ids.shape[1])]
    # the prompt, the first new token, and end-of-text itself (fed once); never the pads after
    assert row0 == kept[: int(mask[0].sum()) + 2].tolist()
    row1 = run.sql("SELECT count(*) AS n FROM tokens WHERE seq_id = 1").n[0]
    assert row1 == 3 + out.shape[1] - ids.shape[1] - 1


@pytest.mark.slow
def test_labels_are_pinned_per_sequence_at_prefill(model, tmp_path, device):
    from transformers import DynamicCache

    ids = torch.randint(1, 100, (1, 4), generator=torch.Generator().manual_seed(5)).to(device)
    with rs.record(model, tmp_path / "run", labels={"domain": "a"}) as rec, torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, use_cache=True, **{cache_keyword(model): cache})
        rec.set_labels(domain="b")
        model(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True, **{cache_keyword(model): cache})
        model(input_ids=ids)
    labels = rs.open_run(tmp_path / "run").sql("SELECT seq_id, phase, domain FROM tokens ORDER BY step, pos")
    assert labels[labels.seq_id == labels.seq_id.iloc[0]].domain.unique().tolist() == ["a"]
    assert labels[labels.seq_id != labels.seq_id.iloc[0]].domain.unique().tolist() == ["b"]


def test_beam_search_is_refused_before_the_first_forward(model, tmp_path, device):
    ids, mask = padded_batch(device, "left", lengths=(6, 3))
    with pytest.raises(RouteScopeError, match="beam search"):
        with rs.record(model, tmp_path / "run"):
            generate(model, ids, mask, num_beams=2)
    run = rs.open_run(tmp_path / "run")
    assert run.manifest["tokens"] == 0 and run.manifest["complete"] is False
    assert "generate" not in vars(model)  # the wrapper is gone


def test_continuous_batching_is_refused(model, tmp_path):
    with pytest.raises(RouteScopeError, match="continuous batching"):
        with rs.record(model, tmp_path / "run"):
            model.generate_batch(inputs=[[1, 2, 3]])


def test_packed_inputs_are_refused(model, tmp_path, device):
    ids = torch.randint(1, 100, (1, 6), device=device)
    cu = torch.tensor([0, 3, 6], dtype=torch.int32, device=device)
    with pytest.raises(RouteScopeError, match="packed"):
        with rs.record(model, tmp_path / "run"):
            model(input_ids=ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=3, max_length_k=3)


def test_writer_error_is_not_hidden_when_the_block_raises(model, tmp_path, device):
    ids, mask = padded_batch(device, "left", lengths=(6, 3))
    run_dir = tmp_path / "run"
    with pytest.raises(KeyError), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with rs.record(model, run_dir, rows_per_part=1) as rec, torch.no_grad():
            (run_dir / "routing").mkdir(parents=True, exist_ok=True)
            (run_dir / "routing" / "rank=0").write_text("not a folder")  # the next part cannot be written
            model(input_ids=ids, attention_mask=mask)
            for _ in range(200):
                if rec.writer.failed:
                    break
                time.sleep(0.05)
            raise KeyError("the user's own error")
    messages = [str(w.message) for w in caught]
    assert any("writer failed" in m for m in messages), messages
    manifest = _manifest(run_dir)
    assert manifest["complete"] is False
    assert manifest["skipped"].get("steps_lost_on_writer_error", 0) >= 1


def _manifest(run_dir):
    import json

    return json.loads((run_dir / "manifest.json").read_text())


@pytest.mark.slow
def test_sample_records_a_seeded_fraction_of_sequences(model, tmp_path, device):
    from routescope.capture.recording.identity import sampled

    ids = torch.randint(1, 100, (16, 4), generator=torch.Generator().manual_seed(6)).to(device)
    with rs.record(model, tmp_path / "run", sample=0.5, seed=3), torch.no_grad():
        model(input_ids=ids)
        model(input_ids=ids)
    run = rs.open_run(tmp_path / "run")
    assert run.manifest["sample"] == 0.5 and run.manifest["sample_seed"] == 3
    seqs = run.sql("SELECT DISTINCT seq_id FROM tokens ORDER BY 1").seq_id.to_numpy()
    want = np.arange(32)[sampled(np.arange(32), 0.5, 3)]
    assert seqs.tolist() == want.tolist() and 0 < len(seqs) < 32
    per = run.sql("SELECT seq_id, count(*) AS n FROM tokens GROUP BY 1")
    assert (per.n == 4).all()  # a sampled sequence is recorded whole


def test_layers_records_a_subset_and_refuses_unknown_layers(model, tmp_path, device):
    ids = torch.randint(1, 100, (2, 4), generator=torch.Generator().manual_seed(7)).to(device)
    with rs.record(model, tmp_path / "run", layers=[1]), torch.no_grad():
        model(input_ids=ids)
    run = rs.open_run(tmp_path / "run")
    assert run.manifest["moe_layers"] == [1]
    assert run.sql("SELECT DISTINCT layer FROM routing").layer.tolist() == [1]
    with pytest.raises(ValueError, match="MoE layers are"):
        with rs.record(model, tmp_path / "bad", layers=[7]):
            pass


@pytest.mark.slow
def test_manifest_states_what_recording_cost(model, tmp_path, device):
    ids = torch.randint(1, 100, (2, 4), generator=torch.Generator().manual_seed(8)).to(device)
    with rs.record(model, tmp_path / "run"), torch.no_grad():
        model(input_ids=ids)
        model(input_ids=ids)
    overhead = rs.open_run(tmp_path / "run").manifest["overhead"]
    assert overhead["seconds"] > 0 and overhead["per_step_ms"] == pytest.approx(
        1000 * overhead["seconds"] / 2, rel=1e-3
    )


@pytest.mark.slow
def test_a_block_whose_forwards_recorded_nothing_warns_and_says_so(model, tmp_path, device):
    bad = torch.full((1, 3), 10_000, device=device)  # outside the vocabulary: fails before any MoE layer
    with pytest.warns(RuntimeWarning, match="forwards_without_routing"):
        with rs.record(model, tmp_path / "run"), torch.no_grad():
            with pytest.raises(IndexError):
                model(input_ids=bad)
    manifest = rs.open_run(tmp_path / "run").manifest
    assert manifest["skipped"] == {"forwards_without_routing": 1} and manifest["tokens"] == 0


@pytest.mark.slow
def test_sampled_load_shares_are_within_binomial_error_of_the_full_run(model, tmp_path, device):
    ids = torch.randint(1, 100, (64, 16), generator=torch.Generator().manual_seed(9)).to(device)
    with rs.record(model, tmp_path / "full"), torch.no_grad():
        model(input_ids=ids)
    with rs.record(model, tmp_path / "sampled", sample=0.25, seed=1), torch.no_grad():
        model(input_ids=ids)
    full = rs.open_run(tmp_path / "full").expert_load()
    part = rs.open_run(tmp_path / "sampled").expert_load()
    sequences = rs.open_run(tmp_path / "sampled").sql("SELECT count(DISTINCT seq_id) AS n FROM tokens").n[0]
    assert 8 <= sequences <= 26  # about a quarter of 64
    merged = full.merge(part, on=["layer", "expert"], suffixes=("_full", "_sampled"))
    slots = merged.groupby("layer").tokens_sampled.transform("sum")
    sigma = np.sqrt(merged.share_full * (1 - merged.share_full) / slots)
    assert ((merged.share_sampled - merged.share_full).abs() <= 5 * sigma + 1e-9).all()


def test_generate_marks_its_forwards_as_its_own_and_unmarks_them_after(model, tmp_path, device):
    """Inside generate a decode step's own mask slot is allowed by construction (generate extends
    the mask by a 1 per new token), so the tracker does not read it there (identity.py); the mark
    holds for generate's forwards only, also when generate raises."""
    ids, mask = padded_batch(device, "left", lengths=(6, 3))
    seen = []
    with rs.record(model, tmp_path / "run") as rec:
        handle = model.register_forward_pre_hook(lambda *_: seen.append(rec._tracker.generating))
        try:
            generate(model, ids, mask)
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
            with pytest.raises(ValueError):
                generate(model, ids, mask, max_new_tokens=-1)
        finally:
            handle.remove()
        assert rec._tracker.generating is False
    assert seen == [True] * 4 + [False]

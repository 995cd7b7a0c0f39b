"""SGLang importer: dumps written exactly as sglang's ExpertDistributionRecorder writes them.

A known routing (requests, their tokens, the logical experts each token chose per layer)
is scheduled into forward passes the way SGLang's scheduler batches them (EXTEND, DECODE,
and MIXED = extend requests followed by the running decode requests, one token each), then
written in the recorder's layouts: per_token records from `_DetailSinglePassGatherer.collect()`
plus `_DetailAccumulator.append` fields, per_pass `global_physical_count`, stat
`logical_count` from a `_CircularBuffer`, and the oldest CSV. The import must give back the
known routing exactly.
"""

from __future__ import annotations

import numpy as np
import torch

import routescope as rs
from routescope.commands.import_run import main as import_main
from routescope.importers import write_imported_run
from routescope.importers.sglang import import_sglang

NUM_LAYERS = 3  # layer 0 dense: on_select_experts never runs there, so its rows stay -1
MOE_LAYERS = (1, 2)
TOP_K = 2
P2L = torch.tensor([[0, 1, 2, 3, 0, 3]] * NUM_LAYERS, dtype=torch.int64)  # 6 physical slots, 4 logical
L2P = {0: (0, 4), 1: (1,), 2: (2,), 3: (3, 5)}  # replicas of each logical expert
EXTEND, DECODE, MIXED, TARGET_VERIFY = 1, 2, 3, 5  # sglang ForwardMode values


def make_truth(seed=0):
    """Requests rid -> list of tokens {pos, token_id, phase, experts {layer: [k logical ids]}}."""
    rng = np.random.default_rng(seed)
    prompts = {"A": 4, "B": 3, "C": 2}
    generated = {"A": 3, "B": 3, "C": 1}
    truth = {}
    for r, (rid, plen) in enumerate(prompts.items()):
        tokens = []
        for pos in range(plen + generated[rid]):
            experts = {layer: rng.permutation(4)[:TOP_K].tolist() for layer in MOE_LAYERS}
            phase = "prefill" if pos < plen else "decode"
            tokens.append(dict(pos=pos, token_id=100 * (r + 1) + pos, phase=phase, experts=experts))
        truth[rid] = tokens
    return truth


# (forward_mode, [(rid, first position, count)]): A and B prefill, decode, then C's prefill
# mixed with A's and B's decode tokens, then a decode of all three.
SCHEDULE = [
    (EXTEND, [("A", 0, 4), ("B", 0, 3)]),
    (DECODE, [("A", 4, 1), ("B", 3, 1)]),
    (MIXED, [("C", 0, 2), ("A", 5, 1), ("B", 4, 1)]),
    (DECODE, [("A", 6, 1), ("B", 5, 1), ("C", 2, 1)]),
]


def physical(logical, nth):
    replicas = L2P[logical]
    return replicas[nth % len(replicas)]


def per_token_record(fid, mode, batch, truth, rank=0, with_rids=True, extra=None):
    """What _DetailAccumulator.append stores for one pass (collect() + forward_pass_id/rank/gatherer_key)."""
    tokens = [truth[rid][pos] for rid, start, n in batch for pos in range(start, start + n)]
    topk = torch.full((NUM_LAYERS, len(tokens), 8), -1, dtype=torch.int32)  # _TOP_K_NUM = 8
    for t, token in enumerate(tokens):
        for layer in MOE_LAYERS:
            ids = [physical(e, t + slot) for slot, e in enumerate(token["experts"][layer])]
            topk[layer, t, :TOP_K] = torch.tensor(ids, dtype=torch.int32)
    metadata = dict(
        input_ids=[tok["token_id"] for tok in tokens],
        positions=[tok["pos"] for tok in tokens],
        extend_seq_lens=None if mode == DECODE else [n for _, _, n in batch],
        forward_mode=mode,
    )
    if with_rids:
        metadata = dict(rids=[rid for rid, _, _ in batch], **metadata)
    gpc = torch.zeros(NUM_LAYERS, 6, dtype=torch.int32)
    valid = topk[:, :, :] >= 0
    for layer in range(NUM_LAYERS):
        ids = topk[layer][valid[layer]].long()
        gpc[layer] += torch.bincount(ids, minlength=6).int()
    record = dict(
        forward_pass_id=fid,
        rank=rank,
        gatherer_key="primary",
        **metadata,
        topk_ids_of_layer=topk,
        misc_objects=[],
        global_physical_count=gpc,
    )
    record.update(extra or {})
    return record


def save_dump(path, records):
    torch.save({"records": records, "last_physical_to_logical_map": P2L}, path)
    return path


def truth_rows(truth, requests=None):
    """(rid, pos, token_id, phase, layer, slot, expert) of every routed slot, sorted."""
    rows = []
    for rid, tokens in truth.items():
        if requests is not None and rid not in requests:
            continue
        for tok in tokens:
            if (rid, tok["pos"]) in scheduled_positions():
                for layer in MOE_LAYERS:
                    for slot, e in enumerate(tok["experts"][layer]):
                        rows.append((rid, tok["pos"], tok["token_id"], tok["phase"], layer, slot, e))
    return sorted(rows)


def scheduled_positions():
    return {(rid, p) for _, batch in SCHEDULE for rid, start, n in batch for p in range(start, start + n)}


def imported_rows(run):
    got = run.sql(
        """SELECT t.seq_id, t.pos, t.token_id, t.phase, r.layer, r.slot, r.expert
           FROM routing r JOIN tokens t USING (seq_id, pos) ORDER BY ALL"""
    )
    return [tuple(row) for row in got.itertuples(index=False)]


def with_rid_names(rows, truth):
    """seq_id -> rid through the token ids (100 * request number + position)."""
    rid_of = {tokens[0]["token_id"] // 100: rid for rid, tokens in truth.items()}
    return sorted(
        (rid_of[int(tid) // 100], int(p), int(tid), ph, int(layer), int(s), int(e))
        for _, p, tid, ph, layer, s, e in rows
    )


def test_per_token_with_rids_one_sequence_per_request_and_mixed_phases(tmp_path):
    truth = make_truth()
    records = [per_token_record(fid, mode, batch, truth) for fid, (mode, batch) in enumerate(SCHEDULE)]
    dump = save_dump(tmp_path / "expert_distribution_recorder_1717.25_0.pt", records)
    assert import_main(["sglang", str(dump), "--out", str(tmp_path / "run")]) == 0
    with rs.open_run(tmp_path / "run") as run:
        rows = imported_rows(run)
        assert with_rid_names(rows, truth) == truth_rows(truth)
        seqs = run.sql("SELECT seq_id, count(*) AS n FROM tokens GROUP BY seq_id ORDER BY seq_id")
        assert seqs["n"].tolist() == [7, 6, 3]  # one seq_id per rid, decode tokens linked to their prompt
        assert run.manifest["moe_layers"] == list(MOE_LAYERS)
        assert run.manifest["num_hidden_layers"] == NUM_LAYERS
        assert run.manifest["top_k"] == {"1": 2, "2": 2}
        assert run.manifest["num_experts"] == {"1": 4, "2": 4}
        assert run.manifest["tokens"] == len(scheduled_positions())
        assert run.manifest["imported_from"]["sequence_ids"] == "rids"
        steps = run.sql("SELECT step, phase, count(*) AS n FROM tokens GROUP BY ALL ORDER BY ALL")
        # the MIXED pass (step 2): C's two prompt tokens are prefill, A's and B's tokens decode
        assert steps[steps.step == 2].values.tolist() == [[2, "decode", 2], [2, "prefill", 2]]


def test_per_token_without_rids_keeps_each_request_of_a_pass_apart(tmp_path):
    truth = make_truth(1)
    records = [
        per_token_record(fid, mode, batch, truth, with_rids=False)
        for fid, (mode, batch) in enumerate(SCHEDULE)
    ]
    imported = import_sglang([save_dump(tmp_path / "d.pt", records)])
    write_imported_run(imported, tmp_path / "run")
    with rs.open_run(tmp_path / "run") as run:
        assert with_rid_names(imported_rows(run), truth) == truth_rows(truth)
        # extend requests are one sequence each, every decode token its own sequence
        assert run.sql("SELECT count(DISTINCT seq_id) AS n FROM tokens")["n"][0] == 2 + 2 + 1 + 2 + 3


def test_newer_layout_primary_only_active_layers_and_speculative_passes(tmp_path):
    truth = make_truth(2)
    records = []
    for fid, (mode, batch) in enumerate(SCHEDULE):
        record = per_token_record(fid, mode, batch, truth, extra={"active_layer_indices": list(MOE_LAYERS)})
        record["topk_ids_of_layer"][0] = 0  # an inactive layer's rows hold stale zeros
        records.append(record)
        draft = per_token_record(fid, mode, batch, make_truth(99), extra={"gatherer_key": "draft"})
        records.append(draft)
    verify = per_token_record(len(SCHEDULE), TARGET_VERIFY, [("A", 0, 4)], make_truth(98))
    records.append(verify)
    imported = import_sglang([save_dump(tmp_path / "d.pt", records)])
    write_imported_run(imported, tmp_path / "run")
    with rs.open_run(tmp_path / "run") as run:
        assert with_rid_names(imported_rows(run), truth) == truth_rows(truth)
        assert run.manifest["moe_layers"] == list(MOE_LAYERS)
        assert run.manifest["tokens"] == len(scheduled_positions())
        skipped = run.manifest["imported_from"]["skipped_records"]
        assert skipped == {"forward_mode TARGET_VERIFY": 1, "gatherer_key draft": len(SCHEDULE)}


def test_tensor_parallel_copies_collapse_and_data_parallel_ranks_add(tmp_path):
    truth = make_truth(3)
    files = []
    for rank in (0, 1):  # TP: both ranks record the same passes
        records = [
            per_token_record(fid, mode, batch, truth, rank=rank) for fid, (mode, batch) in enumerate(SCHEDULE)
        ]
        files.append(save_dump(tmp_path / f"expert_distribution_recorder_1.0_{rank}.pt", records))
    imported = import_sglang(files)
    assert imported.extra["rank_copies_collapsed"] == 2
    write_imported_run(imported, tmp_path / "tp")
    with rs.open_run(tmp_path / "tp") as run:
        assert with_rid_names(imported_rows(run), truth) == truth_rows(truth)
    # --tp-size 1 keeps both copies; with rids they are the same (seq_id, pos) and the repeat is dropped
    both = import_sglang(files, tp_size=1)
    assert both.extra["duplicate_tokens_dropped"] == len(scheduled_positions())
    assert len(both.tokens["seq_id"]) == len(scheduled_positions())

    # DP attention: rank 1 serves request C alone, in the same forward passes
    dp_truth = make_truth(4)
    rank0 = [per_token_record(0, EXTEND, [("A", 0, 4), ("B", 0, 3)], dp_truth, rank=0)]
    rank1 = [per_token_record(0, EXTEND, [("C", 0, 2)], dp_truth, rank=1)]
    dp = import_sglang([save_dump(tmp_path / "r0.pt", rank0), save_dump(tmp_path / "r1.pt", rank1)])
    assert dp.extra["rank_copies_collapsed"] == 1
    assert sorted(dp.tokens["token_id"].tolist()) == sorted(
        t["token_id"] for rid in "ABC" for t in dp_truth[rid] if t["phase"] == "prefill"
    )
    assert set(dp.tokens["source_rank"]) == {"0", "1"} and set(dp.tokens["step"].tolist()) == {0}


def per_pass_dump(path, rank, passes):
    """per_pass mode: _SelectExpertsSinglePassGatherer.collect() -> global_physical_count only."""
    records = [
        dict(forward_pass_id=fid, rank=rank, gatherer_key="primary", global_physical_count=torch.tensor(gpc))
        for fid, gpc in passes
    ]
    return save_dump(path, records)


def test_per_pass_two_ranks_sum_per_forward_pass_like_sglang_reader(tmp_path):
    rng = np.random.default_rng(5)
    passes = {
        rank: [(fid, rng.integers(0, 9, (NUM_LAYERS, 6)).astype(np.int32)) for fid in range(6)]
        for rank in (0, 1)
    }
    for rank in (0, 1):
        for _, gpc in passes[rank]:
            gpc[0] = 0  # dense layer
    files = [per_pass_dump(tmp_path / f"pp_{rank}.pt", rank, passes[rank][::-1]) for rank in (0, 1)]
    assert import_main(["sglang", *map(str, files), "--out", str(tmp_path / "run"), "--top-k", "2"]) == 0
    with rs.open_run(tmp_path / "run") as run:
        got = run.sql("SELECT step, layer, expert, tokens FROM expert_counts ORDER BY ALL")
        assert got["step"].nunique() == 6  # one step per forward pass, not per (pass, rank)
        for fid in range(6):
            summed = passes[0][fid][1].astype(np.int64) + passes[1][fid][1]  # reader.py: sum over ranks
            for layer in MOE_LAYERS:
                logical = np.zeros(4, dtype=np.int64)
                np.add.at(logical, P2L[layer].numpy(), summed[layer])
                part = got[(got.step == fid) & (got.layer == layer)]
                assert part["tokens"].tolist() == logical.tolist()
        assert run.manifest["moe_layers"] == list(MOE_LAYERS)


def test_per_pass_tensor_parallel_copies_are_not_double_counted(tmp_path):
    gpc = np.zeros((NUM_LAYERS, 6), dtype=np.int32)
    gpc[1] = [2, 1, 0, 3, 2, 0]
    files = [per_pass_dump(tmp_path / f"pp_{rank}.pt", rank, [(0, gpc), (1, gpc * 2)]) for rank in (0, 1)]
    imported = import_sglang(files, top_k=2)
    assert imported.extra["rank_copies_collapsed"] == 2
    counts = imported.expert_counts
    layer1 = counts["tokens"][(counts["layer"] == 1) & (counts["step"] == 0)]
    assert layer1.tolist() == [2 + 2, 1, 0, 3]
    assert (
        import_sglang(files, top_k=2, tp_size=1).expert_counts["tokens"].sum() == 2 * counts["tokens"].sum()
    )


def circular_buffer_dump(buffer_size, passes):
    """_StatAccumulator with a _CircularBuffer: slot = pass index % buffer_size, dumped in slot order."""
    buffer = torch.zeros(buffer_size, NUM_LAYERS, 4, dtype=torch.int32)
    for i, counts in enumerate(passes):
        buffer[i % buffer_size] = torch.tensor(counts)
    return {"rank": 0, "logical_count": buffer, "average_utilization_rate_over_window": None}


def test_stat_ring_buffer_not_full_keeps_time_order_and_full_is_flagged(tmp_path):
    rng = np.random.default_rng(6)
    passes = [rng.integers(1, 9, (NUM_LAYERS, 4)) * (np.arange(NUM_LAYERS) > 0)[:, None] for _ in range(6)]
    torch.save(circular_buffer_dump(8, passes[:3]), tmp_path / "partial.pt")
    part = import_sglang([tmp_path / "partial.pt"], top_k=2)
    assert part.extra["step_order"] == "time"
    for step in range(3):
        sel = part.expert_counts["step"] == step
        assert part.expert_counts["tokens"][sel].sum() == passes[step].sum()

    torch.save(circular_buffer_dump(4, passes), tmp_path / "wrapped.pt")
    full = import_sglang([tmp_path / "wrapped.pt"], top_k=2)
    assert full.extra["step_order"].startswith("buffer slot")
    kept = sum(passes[2:])  # passes 0 and 1 were overwritten by 4 and 5
    got = np.zeros((NUM_LAYERS, 4), dtype=np.int64)
    for layer, expert, n in zip(
        full.expert_counts["layer"], full.expert_counts["expert"], full.expert_counts["tokens"], strict=True
    ):
        got[layer, expert] += n
    assert got.tolist() == kept.tolist()

    torch.save(circular_buffer_dump(8, [p * 2 for p in passes[:3]]), tmp_path / "tp.pt")
    halved = import_sglang([tmp_path / "tp.pt"], top_k=2, tp_size=2)
    assert halved.expert_counts["tokens"].tolist() == part.expert_counts["tokens"].tolist()


def test_oldest_csv_layout(tmp_path):
    lines = ["layer_id,expert_id,count", "1,0,5", "1,3,7", "2,1,4", "2,2,8"]
    (tmp_path / "expert_distribution_rank0_timestamp1744347750.37.csv").write_text("\n".join(lines) + "\n")
    lines1 = ["layer_id,expert_id,count", "1,1,6", "2,0,6"]
    (tmp_path / "expert_distribution_rank1_timestamp1744347750.01.csv").write_text("\n".join(lines1) + "\n")
    files = sorted(str(p) for p in tmp_path.glob("*.csv"))
    assert (
        import_main(["sglang", *files, "--out", str(tmp_path / "run"), "--top-k", "2", "--num-experts", "4"])
        == 0
    )
    with rs.open_run(tmp_path / "run") as run:
        got = run.sql("SELECT layer, expert, sum(tokens) AS n FROM expert_counts GROUP BY ALL ORDER BY ALL")
        assert got.values.tolist() == [
            [1, 0, 5],
            [1, 1, 6],
            [1, 2, 0],
            [1, 3, 7],
            [2, 0, 6],
            [2, 1, 4],
            [2, 2, 8],
            [2, 3, 0],
        ]
        assert run.manifest["tokens"] == (5 + 6 + 7) // 2
        assert run.manifest["counts_only"] is True


def test_older_managers_layout_with_lists_instead_of_tensors(tmp_path):
    """managers/expert_distribution.py (older releases) turned tensors into lists when no save dir was set."""
    truth = make_truth(7)
    records = []
    for fid, (mode, batch) in enumerate(SCHEDULE):
        record = per_token_record(fid, mode, batch, truth)
        records.append({k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in record.items()})
    torch.save({"records": records, "last_physical_to_logical_map": P2L.tolist()}, tmp_path / "1717.5-0.pt")
    imported = import_sglang([tmp_path / "1717.5-0.pt"])
    write_imported_run(imported, tmp_path / "run")
    with rs.open_run(tmp_path / "run") as run:
        assert with_rid_names(imported_rows(run), truth) == truth_rows(truth)

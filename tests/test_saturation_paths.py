"""Router saturation's two ways of reading routing (analysis/saturation.py, issue 26 item 13):
the scan of slot-ordered rows and the join for any other layout give the same numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

import routescope as rs
from routescope.analysis import compare, saturation
from routescope.analysis.content import match_by_content
from routescope.store.layout import list_parts
from tests.synthetic import sample_topk, write_run

E, K, T = 8, 2, 240


def synthetic(path, seed=0, token_shift=0, **kwargs):
    rng = np.random.default_rng(seed)
    probs = np.full((T, E), 1 / E)
    experts = {layer: sample_topk(rng, probs, K) for layer in (1, 3)}
    tokens = (np.arange(T) * 7 + token_shift) % 50
    return write_run(path, experts, E, seq_len=24, token_id=tokens, **kwargs)


def both_ways(a_dir, b_dir, where=None):
    with rs.open_run(a_dir) as a, rs.open_run(b_dir) as b:
        ta, tb = compare.content_tokens(a, where), compare.content_tokens(b, where)
        pairs, _ = match_by_content(ta, tb)
        layers = [layer for layer in a.moe_layers if layer in b.moe_layers]
        top_k = [min(a.top_k(layer), b.top_k(layer)) for layer in layers]
        slots = max(max(a.top_k(layer), b.top_k(layer)) for layer in layers)
        parts = [str(p) for p in list_parts(b.path, "routing")]
        scanned = saturation.saturation_table(a.con, pairs, layers, top_k, slots, parts, scan=True)
        joined = saturation.saturation_table(a.con, pairs, layers, top_k, slots, parts, scan=False)
        keys = saturation.token_keys(pairs["a_seq_id"], pairs["a_pos"])
        used_scan = saturation._scanned_cells(a.con, "routing_of_a", {}, layers, slots, -1, keys) is not None
    return scanned, joined, used_scan


@pytest.mark.parametrize("where", [None, "pos >= 5", "seq_id % 2 = 0"])
def test_scan_and_join_agree_on_synthetic_runs(tmp_path, where):
    a = synthetic(tmp_path / "a", seed=0)
    b = synthetic(tmp_path / "b", seed=1, token_shift=0, parts=3)
    scanned, joined, used_scan = both_ways(a, b, where)
    assert used_scan
    pd.testing.assert_frame_equal(scanned, joined)
    assert scanned["tokens_matched"].iloc[0] > 0 and scanned["saturation"].between(0, 1).all()


def test_scan_and_join_agree_on_a_recorded_model(tiny_model, tmp_path):
    model = tiny_model("qwen3_moe")
    ids = torch.randint(1, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    for name, rows in (("a", [0, 1, 2]), ("b", [2, 0])):  # other batch order, one text dropped
        with rs.record(model, tmp_path / name), torch.no_grad():
            model(input_ids=ids[rows], attention_mask=mask[rows])
    scanned, joined, used_scan = both_ways(tmp_path / "a", tmp_path / "b")
    assert used_scan
    pd.testing.assert_frame_equal(scanned, joined)
    assert (scanned["saturation"] == 1.0).all() and (scanned["tokens_matched"] == 12 + 8).all()


@pytest.mark.slow
def test_rows_out_of_slot_order_fall_back_to_the_join_with_equal_results(tmp_path):
    a = synthetic(tmp_path / "a", seed=0)
    b = synthetic(tmp_path / "b", seed=1)
    expected = rs.compare(a, b).saturation
    for part in list_parts(a, "routing"):  # the same rows, shuffled inside the part
        table = pq.read_table(part)
        order = np.random.default_rng(5).permutation(table.num_rows)
        pq.write_table(table.take(order), part)
    scanned, joined, used_scan = both_ways(a, b)
    assert not used_scan
    pd.testing.assert_frame_equal(scanned, joined)
    pd.testing.assert_frame_equal(rs.compare(a, b).saturation, expected)


def test_slot_order_check():
    assert saturation._slots_in_order(np.tile(np.arange(8, dtype=np.int8), 5), 8)
    assert saturation._slots_in_order(np.tile(np.arange(3, dtype=np.int8), 5), 3)
    assert not saturation._slots_in_order(np.array([0, 1, 1, 0], dtype=np.int8), 2)
    assert saturation.keys_fit((np.array([0, 5]), np.array([0, 2**24 - 1])))
    assert not saturation.keys_fit((np.array([0]), np.array([2**24])))

"""Content keys: one 64-bit key per token that names the text up to and including it.

Two tokens get the same key when their sequences hold the same token ids at positions
0..pos, whatever their seq_ids, batch order or batch size (SPEC 4.7). `compare` aligns
runs by these keys for router saturation; routing replay matches live tokens to recorded
ones with them. NumPy only: reading a run never imports torch.
"""

from __future__ import annotations

import numpy as np

# A token whose sequence lacks some earlier position (0..pos-1) has no full prefix, so it
# gets this key and matches nothing. A real key is never 0 (a hash that lands on 0 is
# moved to 1), so the sentinel cannot collide with content.
MISSING_KEY = np.uint64(0)

# Odd base, so it is invertible mod 2**64 (the prefix sum below divides by its powers).
_BASE = np.uint64(0x100000001B3)  # the 64-bit FNV prime
_BASE_INV = np.uint64(pow(int(_BASE), -1, 2**64))
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads every input bit over the whole word (wraps mod 2**64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _powers(base: np.uint64, n: int) -> np.ndarray:
    """base**0 .. base**(n-1) mod 2**64."""
    out = np.empty(n, dtype=np.uint64)
    if n:
        out[0] = 1
        out[1:] = base
        out = np.cumprod(out, dtype=np.uint64)
    return out


def _sequence_order(seq: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Row order by (seq_id, pos): none needed when the rows come sorted (the usual case),
    one argsort of a packed key when the ids fit, else a lexsort."""
    n = len(seq)
    if n < 2:
        return np.arange(n)
    ds, dp = np.diff(seq), np.diff(pos)
    if bool(np.all((ds > 0) | ((ds == 0) & (dp > 0)))):
        return np.arange(n)
    if seq.min() >= 0 and seq.max() < 2**32 and pos.max() < 2**31:
        return np.argsort((seq.astype(np.int64) << 31) | pos.astype(np.int64))
    return np.lexsort((pos, seq))


def content_keys(seq_id: np.ndarray, pos: np.ndarray, token_id: np.ndarray) -> np.ndarray:
    """One uint64 content key per row, in the order of the input rows.

    The key is the polynomial hash mod 2**64 of the sequence's token ids at positions
    0..pos (h = Σ_i (token_i + 1) · B**(pos − i)), combined with pos and passed through a
    64-bit mixer. Rows may come in any order; (seq_id, pos) must be unique. A row whose
    sequence lacks any position before it gets `MISSING_KEY` (0).
    """
    seq = np.asarray(seq_id)
    p = np.asarray(pos)
    tok = np.asarray(token_id)
    if not (seq.ndim == p.ndim == tok.ndim == 1) or not (len(seq) == len(p) == len(tok)):
        raise ValueError(
            "content_keys needs three 1-D arrays of equal length (seq_id, pos, token_id); "
            f"got shapes {seq.shape}, {p.shape}, {tok.shape}"
        )
    n = len(seq)
    if n == 0:
        return np.empty(0, dtype=np.uint64)
    for name, arr in (("seq_id", seq), ("pos", p), ("token_id", tok)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"content_keys: {name} must hold integers, got dtype {arr.dtype}")
    if p.min() < 0:
        raise ValueError(f"content_keys: pos must be >= 0, got {int(p.min())}")
    if tok.min() < 0:
        raise ValueError(f"content_keys: token_id must be >= 0, got {int(tok.min())}")

    order = _sequence_order(seq, p)
    s_seq, s_pos = seq[order], p[order].astype(np.int64)
    s_tok = tok[order].astype(np.uint64) + np.uint64(1)  # +1 so token 0 still moves the hash
    new_seq = np.empty(n, dtype=bool)
    new_seq[0] = True
    new_seq[1:] = s_seq[1:] != s_seq[:-1]
    dup = ~new_seq[1:] & (s_pos[1:] == s_pos[:-1])
    if dup.any():
        i = int(np.flatnonzero(dup)[0]) + 1
        raise ValueError(
            f"content_keys: (seq_id, pos) must be unique; ({int(s_seq[i])}, {int(s_pos[i])}) appears twice"
        )

    # Rank of each row within its sequence; a row has its full prefix iff rank == pos.
    starts = np.flatnonzero(new_seq)
    start_of_row = np.repeat(starts, np.diff(np.append(starts, n)))
    rank = np.arange(n) - start_of_row
    complete = rank == s_pos

    # h(pos) = B**pos · Σ_{i<=pos} t_i · B**-i, a per-sequence prefix sum (all mod 2**64).
    # Only complete rows need it, and for them pos == rank, so powers up to the longest
    # complete run suffice.
    max_rank = int(rank.max()) + 1
    pw, pw_inv = _powers(_BASE, max_rank), _powers(_BASE_INV, max_rank)
    with np.errstate(over="ignore"):
        scaled = s_tok * pw_inv[rank]
        csum = np.cumsum(scaled, dtype=np.uint64)
        before = np.concatenate(([np.uint64(0)], csum[:-1]))
        prefix = csum - before[start_of_row]
        h = prefix * pw[rank]
        key = _mix64(h ^ _mix64(s_pos.astype(np.uint64) * _GOLDEN + np.uint64(1)))
    key[key == MISSING_KEY] = np.uint64(1)
    key[~complete] = MISSING_KEY

    out = np.empty(n, dtype=np.uint64)
    out[order] = key
    return out


def match_by_content(
    a: dict[str, np.ndarray], b: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Pairs of tokens with equal content keys, one partner in B for each selected token of A.

    `a` and `b` hold the columns seq_id, pos, token_id of every token of each run (content
    needs whole sequences) and optionally `selected` (bool) for the tokens to match. When a
    content occurs several times, the i-th occurrence in A (in (seq_id, pos) order) pairs
    with the i-th in B, or with B's last when B has fewer: a run compared with itself pairs
    every token with itself. Returns the pairs (a_seq_id, a_pos, b_seq_id, b_pos) and
    counts: `selected_a`, `keyless_a` (selected tokens of A whose sequence lacks an earlier
    position, so they have no content key), `matched`.
    """
    a = {name: np.asarray(col) for name, col in a.items()}
    b = {name: np.asarray(col) for name, col in b.items()}
    sides = {}
    for name, cols in (("a", a), ("b", b)):
        keys = content_keys(cols["seq_id"], cols["pos"], cols["token_id"])
        sel = cols.get("selected")
        chosen = np.ones(len(keys), bool) if sel is None else sel.astype(bool)
        if name == "a":
            keyless = int((keys[chosen] == MISSING_KEY).sum())
            selected = int(chosen.sum())
        # rows in (seq_id, pos) order, then a stable sort by key keeps that order within a key
        in_order = _sequence_order(cols["seq_id"], cols["pos"])
        idx = in_order[chosen[in_order] & (keys[in_order] != MISSING_KEY)]
        order = np.argsort(keys[idx], kind="stable")
        sides[name] = (keys[idx][order], idx[order])
    ka, a_idx = sides["a"]
    kb, b_idx = sides["b"]
    # occurrence rank of each A token within its key group
    a_start = np.ones(len(ka), bool)
    a_start[1:] = ka[1:] != ka[:-1]
    group_start = np.maximum.accumulate(np.where(a_start, np.arange(len(ka)), 0)) if len(ka) else ka
    rank = np.arange(len(ka)) - group_start
    # kb is sorted: its groups start where the key changes
    b_first = (
        np.flatnonzero(np.concatenate(([True], kb[1:] != kb[:-1]))) if len(kb) else np.zeros(0, np.int64)
    )
    b_keys = kb[b_first]
    b_count = np.diff(np.append(b_first, len(kb)))
    g = np.searchsorted(b_keys, ka)
    g_clipped = np.minimum(g, max(len(b_keys) - 1, 0))
    hit = g < len(b_keys)
    if len(b_keys):
        hit &= b_keys[g_clipped] == ka
    partner = b_first[g_clipped] + np.minimum(rank, b_count[g_clipped] - 1) if len(b_keys) else g
    ai, bi = a_idx[hit], b_idx[partner[hit]] if len(b_keys) else b_idx[:0]
    pairs = {
        "a_seq_id": a["seq_id"][ai].astype(np.int64),
        "a_pos": a["pos"][ai].astype(np.int64),
        "b_seq_id": b["seq_id"][bi].astype(np.int64),
        "b_pos": b["pos"][bi].astype(np.int64),
    }
    return pairs, {"selected_a": selected, "keyless_a": keyless, "matched": int(hit.sum())}

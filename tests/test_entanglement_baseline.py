"""The permutation baseline of `entanglement` (SPEC 4.4): drawn row by row from the pair
counts (multivariate hypergeometric), it must keep both margins, be seeded, and have the
distribution of a uniform random permutation of B across the tokens."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from routescope.analysis.metrics import permute_pairs

# one small table (A rows × B columns of token counts), repeated over many layer pairs so one
# call gives many independent draws (each pair has its own stream [seed, layer, next_layer])
TABLE = np.array([[30, 0, 5, 1], [2, 40, 0, 0], [0, 3, 10, 9]], dtype=np.int64)
PAIRS = 200


def counts_frame(table: np.ndarray = TABLE, pairs: int = PAIRS) -> pd.DataFrame:
    a, b = np.nonzero(table)
    return pd.concat(
        [
            pd.DataFrame(
                {"layer": p, "next_layer": p + 1, "expert_a": a, "expert_b": b, "count": table[a, b]}
            )
            for p in range(pairs)
        ],
        ignore_index=True,
    )


def as_tables(permuted: pd.DataFrame, shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros((permuted["layer"].nunique(), *shape), dtype=np.int64)
    layer = permuted["layer"].to_numpy()
    out[layer, permuted["expert_a"].to_numpy(), permuted["expert_b"].to_numpy()] = permuted["count"]
    return out


def test_baseline_keeps_margins_and_is_seeded():
    counts = counts_frame(pairs=5)
    first, again = permute_pairs(counts, seed=3), permute_pairs(counts, seed=3)
    pd.testing.assert_frame_equal(first, again)
    other = permute_pairs(counts, seed=4)
    tables = as_tables(first, TABLE.shape)
    assert not np.array_equal(tables, as_tables(other, TABLE.shape))
    for t in tables:
        np.testing.assert_array_equal(t.sum(axis=1), TABLE.sum(axis=1))
        np.testing.assert_array_equal(t.sum(axis=0), TABLE.sum(axis=0))
    assert (first["count"] > 0).all()


@pytest.mark.slow
def test_baseline_has_the_permutation_distribution():
    """Each cell of a random permutation's table is hypergeometric: mean n_a m_b / N and
    variance n_a (m_b/N)(1 − m_b/N)(N − n_a)/(N − 1). 2,000 draws must show both."""
    tables = np.concatenate(
        [as_tables(permute_pairs(counts_frame(), seed=s), TABLE.shape) for s in range(10)]
    )
    n_a, m_b, total = TABLE.sum(axis=1)[:, None], TABLE.sum(axis=0)[None, :], TABLE.sum()
    mean = n_a * m_b / total
    var = n_a * (m_b / total) * (1 - m_b / total) * (total - n_a) / (total - 1)
    draws = len(tables)
    assert draws == 2000
    np.testing.assert_array_less(np.abs(tables.mean(axis=0) - mean), 4.5 * np.sqrt(var / draws) + 1e-12)
    np.testing.assert_allclose(tables.var(axis=0, ddof=1), var, rtol=0.15)


@pytest.mark.slow
def test_baseline_matches_shuffling_the_tokens():
    """Against the definition itself (expand the tokens, shuffle B, count): the mean table of
    2,000 shuffles and of 2,000 draws agree cell by cell."""
    rng = np.random.default_rng(7)
    a = np.repeat(np.arange(TABLE.shape[0]), TABLE.sum(axis=1))
    b = np.concatenate([np.repeat(np.arange(TABLE.shape[1]), row) for row in TABLE])
    shuffled = np.zeros(TABLE.shape)
    for _ in range(2000):
        np.add.at(shuffled, (a, b[rng.permutation(len(b))]), 1)
    drawn = np.concatenate(
        [as_tables(permute_pairs(counts_frame(), seed=s), TABLE.shape) for s in range(10)]
    ).mean(axis=0)
    np.testing.assert_allclose(drawn, shuffled / 2000, atol=0.35)

"""Ranking metrics against hand-computed values and brute-force numpy references."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from tpad_jax.eval import metrics


def brute_force_ranks(scores, targets):
    """Pessimistic 0-based ranks by explicit comparison with every other item."""
    ranks = []
    for row, target in zip(scores, targets):
        above = sum(1 for j, s in enumerate(row) if s > row[target])
        tied = sum(1 for j, s in enumerate(row) if s == row[target] and j != target)
        ranks.append(above + tied)
    return np.array(ranks)


def test_ranks_hand_computed():
    scores = np.array([[3.0, 1.0, 3.0, 2.0]] * 4, np.float32)
    targets = np.array([0, 1, 2, 3])
    # Items 0 and 2 tie at the top: each is ranked below the other.
    np.testing.assert_array_equal(metrics.ranks_from_scores(scores, targets), [1, 3, 1, 2])


def test_constant_scores_rank_every_target_last():
    ranks = metrics.ranks_from_scores(jnp.zeros((3, 7)), jnp.array([0, 3, 6]))
    np.testing.assert_array_equal(ranks, [6, 6, 6])


def test_nan_target_score_ranks_last():
    scores = np.array([[0.5, np.nan, 0.1, -2.0]], np.float32)
    np.testing.assert_array_equal(metrics.ranks_from_scores(scores, np.array([1])), [3])
    np.testing.assert_array_equal(metrics.ranks_from_scores(scores, np.array([2])), [1])


def test_ranks_match_brute_force_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(37, 23)).astype(np.float32)  # few values, so many ties
    targets = rng.integers(0, 23, size=37)
    ranks = metrics.ranks_from_scores(scores, targets)
    assert ranks.dtype == jnp.int32
    np.testing.assert_array_equal(ranks, brute_force_ranks(scores, targets))


def test_rank_targets_chunks_match_full_ranking():
    rng = np.random.default_rng(1)
    table = rng.integers(0, 4, size=(50, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=50)
    chunk_sizes = []

    def score_fn(indices):
        chunk_sizes.append(len(indices))
        return jnp.asarray(table[indices])

    ranks = metrics.rank_targets(score_fn, np.arange(50), targets, batch_size=16)
    np.testing.assert_array_equal(ranks, brute_force_ranks(table, targets))
    assert chunk_sizes == [16, 16, 16, 2]


def test_rank_targets_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="3 prefixes but 2 targets"):
        metrics.rank_targets(lambda p: np.zeros((len(p), 4)), [0, 1, 2], np.array([0, 1]), 8)


def test_metrics_hand_computed():
    values = metrics.metrics_from_ranks(np.array([0, 1, 4, 25]), ks=(1, 5))
    assert values[("HR", 1)] == pytest.approx(25.0)
    assert values[("MRR", 1)] == pytest.approx(25.0)
    assert values[("NDCG", 1)] == pytest.approx(25.0)
    assert values[("HR", 5)] == pytest.approx(75.0)
    assert values[("MRR", 5)] == pytest.approx(100 * (1 + 1 / 2 + 1 / 5) / 4)
    assert values[("NDCG", 5)] == pytest.approx(100 * (1 + 1 / math.log2(3) + 1 / math.log2(6)) / 4)
    assert set(values) == {(m, k) for m in ("HR", "MRR", "NDCG") for k in (1, 5)}


def test_metrics_match_brute_force_from_scores():
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 30, size=(200, 40)).astype(np.float32)
    targets = rng.integers(0, 40, size=200)
    ranks = brute_force_ranks(scores, targets)
    values = metrics.metrics_from_ranks(metrics.ranks_from_scores(scores, targets), ks=(1, 5, 10, 20))
    for k in (1, 5, 10, 20):
        hits = [r < k for r in ranks]
        assert values[("HR", k)] == pytest.approx(100 * sum(hits) / 200)
        assert values[("MRR", k)] == pytest.approx(100 * sum(1 / (r + 1) for r in ranks if r < k) / 200)
        ndcg = sum(1 / math.log2(r + 2) for r in ranks if r < k)
        assert values[("NDCG", k)] == pytest.approx(100 * ndcg / 200)


def test_slice_rows_split_cold_and_warm():
    ranks = np.array([0, 3, 12, 1, 30])
    cold = np.array([True, False, True, False, False])
    rows = metrics.slice_rows("pop", ranks, cold, ks=(5, 20))
    table = {(r["slice"], r["metric"], r["k"]): r["value"] for r in rows}
    assert len(rows) == 3 * 3 * 2 and {r["model"] for r in rows} == {"pop"}
    for slice_name, selected in (("all", ranks), ("cold", ranks[cold]), ("warm", ranks[~cold])):
        for (metric, k), value in metrics.metrics_from_ranks(selected, ks=(5, 20)).items():
            assert table[(slice_name, metric, k)] == value
    assert table[("cold", "HR", 5)] == pytest.approx(50.0)
    assert table[("warm", "HR", 20)] == pytest.approx(100 * 2 / 3)


def test_slice_rows_without_cold_targets_have_no_cold_rows():
    rows = metrics.slice_rows("pop", np.array([0, 2]), np.array([False, False]), ks=(5,))
    assert {r["slice"] for r in rows} == {"all", "warm"}


def integer_vectors(rng, rows, dim):
    """Small integers: every dot product is exact in fp32, so exact ties are common and well defined."""
    return rng.integers(-2, 3, size=(rows, dim)).astype(np.float32)


@pytest.mark.parametrize("item_chunk", [5, 8, 37, 64])
def test_rank_by_dot_matches_ranks_from_scores_with_ties_and_nan(item_chunk):
    rng = np.random.default_rng(3)
    items = integer_vectors(rng, 37, 3)  # 37 items: no chunk size but 37 and 64 (clipped) divides it
    sessions = integer_vectors(rng, 13, 3)  # more sessions than some chunks hold
    items[4, 1] = np.nan  # a NaN item scores NaN for every session
    sessions[7, 0] = np.nan  # a NaN session scores NaN for every item
    targets = rng.integers(0, 37, size=13)
    targets[:2] = 4
    expected = metrics.ranks_from_scores(sessions @ items.T, targets)
    ranks = metrics.rank_by_dot(sessions, items, targets, item_chunk)
    assert ranks.dtype == jnp.int32
    np.testing.assert_array_equal(ranks, expected)
    assert ranks[7] == ranks[0] == ranks[1] == 36


def test_rank_by_dot_counts_ties_with_identical_float_items():
    """The target's score and the chunks' scores must agree to the last bit for a twin to tie."""
    rng = np.random.default_rng(4)
    items = rng.standard_normal((101, 8)).astype(np.float32)
    sessions = rng.standard_normal((19, 8)).astype(np.float32)
    targets = rng.permutation(50)[:19]
    twins = 50 + np.arange(19)
    items[twins] = items[targets]
    scores = np.asarray(jnp.asarray(sessions) @ jnp.asarray(items).T)
    assert np.all(scores[np.arange(19), targets] == scores[np.arange(19), twins])  # real ties
    for item_chunk in (7, 16, 101):  # more sessions than items per chunk, fewer, and one chunk
        ranks = metrics.rank_by_dot(sessions, items, targets, item_chunk)
        np.testing.assert_array_equal(ranks, metrics.ranks_from_scores(scores, targets))

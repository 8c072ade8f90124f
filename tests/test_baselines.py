"""Classic baselines on tiny hand-made sessions with hand-computed scores."""

import math

import ml_collections
import numpy as np
import pytest

from tpad_jax.eval import baselines

# Item counts: 0:1, 1:3, 2:4, 3:1, 4:1, 5:0 (item 5 never occurs in train).
TRAIN = [np.array(s, np.int32) for s in ([0, 1, 2], [1, 2], [2, 3, 2], [4, 1])]
NUM_ITEMS = 6
# Dense popularity rank over the distinct counts {0, 1, 3, 4}, divided by 4.
TIEBREAK = np.array([1, 2, 3, 1, 1, 0]) / 4


def prefixes(*sessions):
    return [np.array(s, np.int32) for s in sessions]


def sknn_config(k, sample_size):
    config = ml_collections.ConfigDict()
    config.eval = ml_collections.ConfigDict({"sknn_k": k, "sknn_sample_size": sample_size})
    return config


def test_popularity_tiebreak_keeps_ties_and_order():
    np.testing.assert_allclose(baselines.popularity_tiebreak(np.array([1, 3, 4, 1, 1, 0])), TIEBREAK)


def test_pop_scores_are_train_counts():
    scores = baselines.Pop().fit(TRAIN, NUM_ITEMS).score(prefixes([0], [3, 4]))
    assert scores.dtype == np.float32 and scores.shape == (2, NUM_ITEMS)
    np.testing.assert_array_equal(scores, [[1, 3, 4, 1, 1, 0]] * 2)


def test_session_pop_counts_prefix_items_then_popularity():
    scores = baselines.SessionPop().fit(TRAIN, NUM_ITEMS).score(prefixes([3, 0, 3], [5]))
    np.testing.assert_allclose(scores[0], np.array([1, 0, 0, 2, 0, 0]) + TIEBREAK, rtol=1e-6)
    np.testing.assert_allclose(scores[1], np.array([0, 0, 0, 0, 0, 1]) + TIEBREAK, rtol=1e-6)


def test_markov_transition_counts_with_popularity_backoff():
    # Train transitions: 0->1, 1->2 (twice), 2->3, 3->2, 4->1; item 5 is never a source.
    scores = baselines.Markov().fit(TRAIN, NUM_ITEMS).score(prefixes([0, 1], [2, 3], [5]))
    np.testing.assert_allclose(scores[0], np.array([0, 0, 2, 0, 0, 0]) + TIEBREAK, rtol=1e-6)
    np.testing.assert_allclose(scores[1], np.array([0, 0, 1, 0, 0, 0]) + TIEBREAK, rtol=1e-6)
    np.testing.assert_allclose(scores[2], TIEBREAK, rtol=1e-6)


@pytest.mark.parametrize("k, sample_size, votes, scores", [
    # Cosines with {1, 2}: s0 {0,1,2} 2/sqrt(6), s1 {1,2} 1, s2 {2,3} 1/2, s3 {1,4} 1/2.
    # Items 1 and 2 tie on votes: the more popular 2 (4 clicks against 3) ranks first.
    (2, 10, [2 / math.sqrt(6), 1 + 2 / math.sqrt(6), 1 + 2 / math.sqrt(6), 0, 0, 0],
     [1, 2, 3, 0.25, 0.25, 0.0]),
    # Only the two most recent sharing sessions (s3, s2) are candidates: four equal votes, by popularity
    # (item 3 and item 4 both have 1 click and stay tied).
    (2, 2, [0, 0.5, 0.5, 0.5, 0.5, 0], [0.25, 2, 3, 1, 1, 0.0]),
    # s3 and s2 tie at 1/2: the more recent s3 wins.
    (1, 2, [0, 0.5, 0, 0, 0.5, 0], [0.25, 2, 0.75, 0.25, 1, 0.0]),
])
def test_sknn_votes_and_their_order(k, sample_size, votes, scores):
    model = baselines.make_baseline("sknn", sknn_config(k, sample_size)).fit(TRAIN, NUM_ITEMS)
    np.testing.assert_allclose(model.votes(prefixes([1, 2])).toarray()[0], votes, rtol=1e-6)
    np.testing.assert_array_equal(model.score(prefixes([1, 2]))[0], scores)


def test_sknn_without_any_neighbour_ranks_by_popularity():
    scores = baselines.SessionKNN(k=2, sample_size=10).fit(TRAIN, NUM_ITEMS).score(prefixes([5], [0]))
    np.testing.assert_allclose(scores[0], TIEBREAK, rtol=1e-6)
    assert scores[1].argmax() == 2 and np.all(scores[1][[0, 1, 2]] >= 1)  # s0 {0,1,2} votes, 2 most popular


def reference_sknn(train, num_items, prefix, k, sample_size):
    """Session-kNN votes written out with Python sets, for comparison with the sparse implementation."""
    query = set(prefix.tolist())
    sharing = [i for i in range(len(train)) if query & set(train[i].tolist())]
    candidates = sorted(sharing, reverse=True)[:sample_size]
    similarity = {i: len(query & set(train[i].tolist())) / math.sqrt(len(query) * len(set(train[i].tolist())))
                  for i in candidates}
    neighbours = sorted(candidates, key=lambda i: (-similarity[i], -i))[:k]
    votes = np.zeros(num_items)
    for i in neighbours:
        for item in set(train[i].tolist()):
            votes[item] += similarity[i]
    return votes


def test_sknn_matches_set_reference_on_random_sessions():
    rng = np.random.default_rng(0)
    train = [rng.integers(0, 15, size=rng.integers(2, 6)).astype(np.int32) for _ in range(80)]
    queries = [rng.integers(0, 15, size=rng.integers(1, 5)).astype(np.int32) for _ in range(20)]
    model = baselines.SessionKNN(k=5, sample_size=12).fit(train, 15)
    votes, scores = model.votes(queries).toarray(), model.score(queries)
    counts = baselines.item_counts(train, 15)
    for row, query in enumerate(queries):
        expected = reference_sknn(train, 15, query, 5, 12)
        np.testing.assert_allclose(votes[row], expected, rtol=1e-6)
        # Same order as sorting by (voted, votes, popularity): the scores rank exactly that way.
        key = [(v > 0, round(v, 9), c) for v, c in zip(expected, counts)]
        for i in range(15):
            for j in range(15):
                assert (scores[row, i] > scores[row, j]) == (key[i] > key[j]), (row, i, j)


def test_oracle_returns_rows_of_given_examples():
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.testing.assert_array_equal(baselines.Oracle(table).score(np.array([2, 0])), table[[2, 0]])


def test_make_baseline_names():
    config = sknn_config(3, 7)
    assert isinstance(baselines.make_baseline("s-pop", config), baselines.SessionPop)
    sknn = baselines.make_baseline("sknn", config)
    assert (sknn.k, sknn.sample_size) == (3, 7)
    with pytest.raises(ValueError, match="unknown baseline 'gru'"):
        baselines.make_baseline("gru", config)

"""The synthetic catalogue: determinism, sampler == stated process, and the oracle beats POP and Markov."""

import os

import numpy as np
import pytest

from configs import tpad_base
from tpad_jax.data import prepared, raw, synthetic


def small_generate(out_dir, seed):
    return synthetic.generate(str(out_dir), num_items=24, num_sessions=60, cold_item_fraction=0.2, noise=0.1,
                              seed=seed, image_size=16)


def folder_bytes(folder):
    return {os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(folder) for name in names}


def test_same_seed_gives_identical_bytes(tmp_path):
    small_generate(tmp_path / "one", seed=3)
    small_generate(tmp_path / "two", seed=3)
    small_generate(tmp_path / "other", seed=4)
    one = folder_bytes(tmp_path / "one")
    assert len([name for name in one if name.startswith("images")]) == 24
    assert one == folder_bytes(tmp_path / "two")
    assert one["sessions.jsonl"] != folder_bytes(tmp_path / "other")["sessions.jsonl"]


def test_written_catalogue_is_valid_canonical_data(tmp_path):
    process = small_generate(tmp_path, seed=0)
    items = raw.read_items(str(tmp_path / "items.jsonl"))  # also PIL-verifies every image
    sessions = raw.read_sessions(str(tmp_path / "sessions.jsonl"), {i.item_id for i in items})
    assert [i.item_id for i in items] == process.item_ids.tolist() and len(sessions) == 60
    assert all(len(s.items) >= 2 for s in sessions)
    assert all(synthetic.CATEGORIES[c] in item.title for c, item in zip(process.category, items))


def total_variation(counts, probs):
    return 0.5 * np.abs(counts / counts.sum() - probs).sum()


def test_sampler_follows_the_stated_probabilities():
    process = synthetic.make_process(24, 20000, 0.2, 0.1, seed=1)
    sessions, styles = synthetic.sample_sessions(process, 20000, np.random.default_rng(2))
    # E[TV] <= 0.5 sqrt(N / n) for n draws of a correct sampler; a wrong one is off by far more.
    first = np.array([s[0] for s in sessions])
    for style in range(len(synthetic.STYLES)):
        draws = first[styles == style]
        bound = np.sqrt(process.num_items / len(draws))
        assert total_variation(np.bincount(draws, minlength=24), process.first_item_probs(style)) < bound
    pairs = np.concatenate([np.stack([np.full(len(s) - 1, st), s[:-1], s[1:]], 1)
                            for s, st in zip(sessions, styles)])
    keys, counts = np.unique(pairs[:, :2], axis=0, return_counts=True)
    for style, current in keys[np.argsort(-counts)[:3]]:
        following = pairs[(pairs[:, 0] == style) & (pairs[:, 1] == current), 2]
        expected = process.transition_rows(np.array([current]), style)[0]
        bound = np.sqrt(process.num_items / len(following))
        assert total_variation(np.bincount(following, minlength=24), expected) < bound


def test_oracle_equals_brute_force_posterior():
    process = synthetic.make_process(30, 100, 0.2, 0.1, seed=5)
    prefixes = [np.array([3]), np.array([3, 7, 7, 12]), np.array([29, 0])]
    expected = []
    for prefix in prefixes:
        # Joint over styles from full transition rows (a different code path than the oracle's pairs).
        joint = np.array([process.first_item_probs(s)[prefix[0]] * np.prod(
            [process.transition_rows(np.array([a]), s)[0, b] for a, b in zip(prefix[:-1], prefix[1:])])
            for s in range(len(synthetic.STYLES))])
        rows = np.stack([process.transition_rows(prefix[-1:], s)[0] for s in range(len(synthetic.STYLES))])
        expected.append(joint @ rows / joint.sum())
    np.testing.assert_allclose(process.next_item_probs(prefixes), np.array(expected), rtol=1e-10)


def ranks(scores, targets):
    """Pessimistic 0-based ranks of the targets."""
    target_scores = scores[np.arange(len(targets)), targets][:, None]
    return (scores > target_scores).sum(1) + (scores == target_scores).sum(1) - 1


def hr_mrr(scores, targets, k=20):
    r = ranks(scores, targets)
    return np.mean(r < k), np.mean(np.where(r < k, 1.0 / (r + 1), 0.0))


@pytest.fixture(scope="module")
def small_prepared(tmp_path_factory):
    config = tpad_base.get_config("tiny")
    config.data.synthetic.num_items = 200
    config.data.synthetic.num_sessions = 4000
    config.data.image_size = 8
    return prepared.load_or_prepare(config, str(tmp_path_factory.mktemp("synthetic")))


def test_oracle_beats_pop_and_markov(small_prepared):
    data = small_prepared
    prefixes, targets = data.examples("test")
    oracle = data.oracle_scores("test")
    assert oracle.shape == (len(targets), data.num_items) and oracle.dtype == np.float32
    np.testing.assert_allclose(oracle.sum(1), 1.0, atol=1e-5)
    pop = np.broadcast_to(data.train_item_counts.astype(np.float64), oracle.shape)
    transitions = np.zeros((data.num_items, data.num_items))
    for session in data.train:
        np.add.at(transitions, (session[:-1], session[1:]), 1.0)
    # Markov on the last item, ties broken by popularity.
    markov = transitions[[p[-1] for p in prefixes]] + 1e-6 * data.train_item_counts
    hr_oracle, mrr_oracle = hr_mrr(oracle, targets)
    for baseline in (pop, markov):
        hr, mrr = hr_mrr(baseline, targets)
        assert hr_oracle > hr + 0.05 and mrr_oracle > mrr + 0.02, (hr_oracle, hr, mrr_oracle, mrr)

"""The synthetic catalogue: determinism, sampler == stated process, exact expected counts, and an oracle
that beats POP and Markov overall and on cold targets."""

import os

import numpy as np
import pytest

from configs import tpad_base
from tpad_jax.data import prepared, raw, synthetic
from tpad_jax.eval import baselines, metrics


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
    for i, item in enumerate(items):
        assert synthetic.CATEGORIES[process.category[i]] in item.title
        assert synthetic.STYLES[process.style[i]].capitalize() in item.title
        assert synthetic.MATERIALS[process.material[i]] in item.title


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


def test_next_distribution_equals_dense_transition():
    process = synthetic.make_process(30, 100, 0.2, 0.1, seed=5)
    dist = np.random.default_rng(0).dirichlet(np.ones(30))
    for style in range(len(synthetic.STYLES)):
        dense = dist @ process.transition_rows(np.arange(30), style)
        np.testing.assert_allclose(process.next_distribution(dist, style), dense, rtol=1e-12)


def test_expected_item_counts_match_sampled_counts():
    process = synthetic.make_process(24, 20000, 0.2, 0.1, seed=1)
    sessions, _ = synthetic.sample_sessions(process, 20000, np.random.default_rng(2))
    expected = synthetic.expected_item_counts(process, 20000)
    # E[length] of min(1 + Geometric(p), M) in closed form.
    p, m = synthetic.LENGTH_GEOMETRIC_P, synthetic.MAX_GENERATED_LENGTH
    np.testing.assert_allclose(expected.sum(), 20000 * (1 + (1 - (1 - p) ** (m - 1)) / p), rtol=1e-12)
    sampled = np.bincount(np.concatenate(sessions), minlength=24)
    assert total_variation(sampled, expected / expected.sum()) < np.sqrt(24 / sampled.sum())


def test_cold_items_are_calibrated_to_their_expected_count():
    process = synthetic.make_process(400, 3000, 0.6, 0.03, seed=0)
    counts = synthetic.expected_item_counts(process, 3000)
    relative_error = np.abs(counts / synthetic.COLD_EXPECTED_CLICKS - 1)
    # Exactly the 240 cold items sit at the target; the warm ones, far more popular, stay well above it.
    assert np.sum(relative_error < 0.02) == 240


@pytest.fixture(scope="module")
def small_prepared(tmp_path_factory):
    config = tpad_base.get_config("tiny")
    config.data.synthetic.num_items = 400
    config.data.synthetic.num_sessions = 3000
    config.data.image_size = 8
    return prepared.load_or_prepare(config, str(tmp_path_factory.mktemp("synthetic")))


@pytest.fixture(scope="module")
def ranked(small_prepared):
    """Test-split ranks of the oracle, POP and Markov, ranked by tpad_jax.eval."""
    data = small_prepared
    prefixes, targets = data.examples("test")
    oracle = data.oracle_scores("test")
    assert oracle.shape == (len(targets), data.num_items) and oracle.dtype == np.float32
    np.testing.assert_allclose(oracle.sum(1), 1.0, atol=1e-5)
    ranks = {"oracle": metrics.rank_targets(baselines.Oracle(oracle).score, np.arange(len(targets)), targets,
                                            batch_size=128)}
    for name, model in (("pop", baselines.Pop()), ("markov", baselines.Markov())):
        model.fit(data.train, data.num_items)
        ranks[name] = metrics.rank_targets(model.score, prefixes, targets, batch_size=128)
    return ranks


def hr_mrr(ranks):
    values = metrics.metrics_from_ranks(ranks, ks=(20,))
    return values[("HR", 20)], values[("MRR", 20)]


def test_oracle_beats_pop_and_markov(ranked):
    hr_oracle, mrr_oracle = hr_mrr(ranked["oracle"])
    for name in ("pop", "markov"):
        hr, mrr = hr_mrr(ranked[name])
        assert hr_oracle > hr + 5 and mrr_oracle > mrr + 2, (name, hr_oracle, hr, mrr_oracle, mrr)


def test_oracle_ranks_cold_targets_that_pop_and_markov_miss(small_prepared, ranked):
    cold = small_prepared.cold_mask(small_prepared.examples("test")[1])
    # Cold targets are a real slice: a tenth of the examples or more, mostly reachable only by content.
    assert cold.mean() >= 0.1, cold.mean()
    hr_oracle, _ = hr_mrr(ranked["oracle"][cold])
    assert hr_oracle > 0
    for name in ("pop", "markov"):
        hr, _ = hr_mrr(ranked[name][cold])
        assert hr_oracle > hr + 15, (name, hr_oracle, hr)

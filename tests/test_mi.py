"""MI estimators: exact unit checks, a sharded-batch check, and training on correlated Gaussians."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks import mi_table
from tpad_jax.models import mi

# d = 1 cases leave the second dimension independent, so every case shares one critic shape.
CASES = ((1, 0.5), (1, 0.8), (2, 0.5), (2, 0.8))
RHOS = mi_table.case_rhos(CASES, width=2)
TRUE_MI = mi_table.gaussian_mi(CASES)
BATCH = 128


def test_closed_forms_of_the_gaussian_cases():
    # I = -d/2 log(1 - rho^2) at rho = 0.8, d = 2 is -log(0.36).
    assert TRUE_MI[3] == pytest.approx(-math.log(0.36))
    assert mi_table.club_at_exact_q(CASES)[1] == pytest.approx(0.64 / 0.36)
    x, y = mi_table.correlated_gaussians(jax.random.key(0), RHOS[3], 20000)
    np.testing.assert_allclose(np.corrcoef(x[:, 0], y[:, 0])[0, 1], 0.8, atol=0.01)


@pytest.mark.parametrize(
    "name, excess, shortfall",
    [
        # (estimator, allowed excess over the true MI, allowed shortfall below it), in nats.
        ("infonce", 0.05, 0.08),
        ("nwj", 0.05, 0.1),
        ("jsd", 0.05, 0.12),
    ],
)
def test_lower_bounds_track_gaussian_mi(name, excess, shortfall):
    estimates = mi_table.fit_estimator(name, RHOS, batch=BATCH)
    # InfoNCE can never exceed log B; all cases here stay well below log 128 = 4.85.
    assert TRUE_MI.max() < math.log(BATCH) - 3.0
    assert np.all(estimates <= TRUE_MI + excess), (name, estimates, TRUE_MI)
    assert np.all(estimates >= TRUE_MI - shortfall), (name, estimates, TRUE_MI)


def test_club_upper_bounds_gaussian_mi():
    estimate = mi_table.fit_estimator("club", RHOS, batch=BATCH)
    assert np.all(estimate >= TRUE_MI - 0.05), (estimate, TRUE_MI)
    np.testing.assert_allclose(estimate, mi_table.club_at_exact_q(CASES), rtol=0.12, atol=0.05)


def test_infonce_hand_computed_3x3():
    scores = jnp.array([[2.0, 0.0, 1.0], [0.0, 1.0, 2.0], [1.0, 1.0, 3.0]])
    cross_entropy = [
        math.log(math.exp(2) + math.exp(0) + math.exp(1)) - 2,
        math.log(math.exp(0) + math.exp(1) + math.exp(2)) - 1,
        math.log(math.exp(1) + math.exp(1) + math.exp(3)) - 3,
    ]
    expected = math.log(3) - sum(cross_entropy) / 3
    assert float(mi.infonce(scores)) == pytest.approx(expected, abs=1e-6)
    assert float(mi.infonce_accuracy(scores)) == pytest.approx(2 / 3)


def test_infonce_mask_and_extra_negatives_match_brute_force():
    rng = np.random.default_rng(0)
    za, zb = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    bank = rng.normal(size=(3, 4))
    valid = np.array([True, True, False, True, False, True])
    scores = mi.critic_scores(jnp.array(za), jnp.array(zb), temperature=0.5, negatives=jnp.array(bank))
    got = float(mi.infonce(scores, mask=jnp.array(valid)))

    def cosine(a, b):
        return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))

    candidates = [zb[j] for j in np.flatnonzero(valid)] + list(bank)
    bounds = []
    for i in np.flatnonzero(valid):
        logits = np.array([cosine(za[i], c) / 0.5 for c in candidates])
        positive = cosine(za[i], zb[i]) / 0.5
        bounds.append(math.log(len(candidates)) - (np.log(np.exp(logits).sum()) - positive))
    assert got == pytest.approx(np.mean(bounds), abs=1e-5)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
def test_infonce_sharded_batch_uses_global_negatives():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(1)
    za, zb = (jnp.array(rng.normal(size=(32, 8)), jnp.float32) for _ in range(2))

    def bound(a, b):
        return mi.infonce(mi.critic_scores(a, b, temperature=0.1))

    expected = bound(za, zb)
    with jax.set_mesh(mesh):
        sharding = NamedSharding(mesh, P("data"))
        sharded = [jax.device_put(z, sharding) for z in (za, zb)]
        got = jax.jit(bound)(*sharded)
        got_grad = jax.jit(jax.grad(bound))(*sharded)
    assert len(sharded[0].sharding.device_set) == 8
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(got_grad, jax.grad(bound)(za, zb), rtol=1e-4, atol=1e-6)
    # Per-shard InfoNCE (4 rows, log 4 cap) is a different number: the global batch really is used.
    local = np.mean([bound(za[i : i + 4], zb[i : i + 4]) for i in range(0, 32, 4)])
    assert abs(float(got) - local) > 1e-2


def _brute_force_club(mu, logvar, y, valid):
    def log_q(i, j):
        return -0.5 * np.sum((y[j] - mu[i]) ** 2 / np.exp(logvar[i]))

    rows = np.flatnonzero(valid)
    return np.mean([log_q(i, i) - np.mean([log_q(i, j) for j in rows]) for i in rows])


def test_club_and_q_loss_match_brute_force():
    rng = np.random.default_rng(2)
    mu, logvar, y = (rng.normal(size=(5, 3)) for _ in range(3))
    valid = np.array([True, False, True, True, True])
    got = mi.club(jnp.array(mu), jnp.array(logvar), jnp.array(y), mask=jnp.array(valid))
    assert float(got) == pytest.approx(_brute_force_club(mu, logvar, y, valid), abs=1e-5)

    log_pdf = jax.scipy.stats.norm.logpdf(y, mu, np.exp(0.5 * logvar)).sum(axis=1)
    expected_q_loss = -np.mean(np.asarray(log_pdf)[valid])
    got_q_loss = mi.club_q_loss(jnp.array(mu), jnp.array(logvar), jnp.array(y), mask=jnp.array(valid))
    assert float(got_q_loss) == pytest.approx(expected_q_loss, abs=1e-5)


def test_nwj_and_jsd_closed_forms():
    t_joint = jnp.array([1.0, 2.0])
    t_marginal = jnp.array([0.0, math.log(2.0)])
    assert float(mi.nwj(t_joint, t_marginal)) == pytest.approx(1.5 - 1.5 / math.e, abs=1e-6)
    objective, bound = mi.jsd(t_joint, t_marginal)
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected_objective = -(softplus(-1.0) + softplus(-2.0)) / 2 - (softplus(0.0) + softplus(math.log(2))) / 2
    assert float(objective) == pytest.approx(expected_objective, abs=1e-6)
    assert float(bound) == pytest.approx(1.5 + 1.0 - 1.5, abs=1e-6)


def test_nwj_and_jsd_over_a_masked_critic_matrix_match_brute_force():
    # Row 1 is padding; the pair (0, 2) is a false negative (-inf); column 3 is an extra negative.
    scores = jnp.array([[1.0, 0.5, -jnp.inf, 0.2], [9.0, 9.0, 9.0, 9.0], [0.3, 9.0, 2.0, -0.4]])
    mask = jnp.array([True, False, True])
    joint, joint_valid, marginal, marginal_valid = mi.joint_and_marginal(scores, mask=mask)
    assert joint_valid.tolist() == [True, False, True]
    assert marginal_valid.tolist() == [[False, False, False, True], [False] * 4, [True, False, False, True]]
    negatives = [0.2, 0.3, -0.4]  # what remains: (0, 3), (2, 0), (2, 3)
    expected_nwj = (1.0 + 2.0) / 2 - np.mean(np.exp(negatives)) / math.e
    got = mi.nwj(joint, marginal, joint_valid=joint_valid, marginal_valid=marginal_valid)
    assert float(got) == pytest.approx(expected_nwj, abs=1e-6)
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    objective, _ = mi.jsd(joint, marginal, joint_valid=joint_valid, marginal_valid=marginal_valid)
    expected = -(softplus(-1.0) + softplus(-2.0)) / 2 - np.mean([softplus(v) for v in negatives])
    assert float(objective) == pytest.approx(expected, abs=1e-6)

    def jsd_objective(t):
        t_joint, t_joint_valid, t_marginal, t_marginal_valid = mi.joint_and_marginal(
            t, mask=mask)
        return mi.jsd(t_joint, t_marginal, joint_valid=t_joint_valid, marginal_valid=t_marginal_valid)[0]

    grads = jax.grad(jsd_objective)(scores)  # the -inf pair and the padded row get no gradient, no NaN
    assert bool(jnp.all(jnp.isfinite(grads))) and float(jnp.abs(grads[1]).max()) == 0.0


def _brute_force_mmd(x, y, bandwidths, unbiased):
    def kernel(a, b):
        return sum(math.exp(-np.sum((a - b) ** 2) / (2 * s * s)) for s in bandwidths)

    def mean_kernel(a, b, same):
        pairs = [(i, j) for i in range(len(a)) for j in range(len(b)) if not (same and unbiased and i == j)]
        return np.mean([kernel(a[i], b[j]) for i, j in pairs])

    return mean_kernel(x, x, True) + mean_kernel(y, y, True) - 2 * mean_kernel(x, y, False)


@pytest.mark.parametrize("unbiased", [True, False])
def test_mmd_matches_brute_force_with_masks(unbiased):
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(5, 3)), rng.normal(loc=0.5, size=(4, 3))
    x_valid = np.array([True, True, False, True, True])
    bandwidths = (0.5, 2.0)
    got = mi.mmd(jnp.array(x), jnp.array(y), bandwidths, unbiased=unbiased, x_mask=jnp.array(x_valid))
    expected = _brute_force_mmd(x[x_valid], y, bandwidths, unbiased)
    assert float(got) == pytest.approx(expected, abs=1e-5)


def test_mmd_zero_for_identical_and_unbiased_for_same_distribution():
    x = jax.random.normal(jax.random.key(5), (64, 3))
    assert abs(float(mi.mmd(x, x, unbiased=False))) < 1e-6
    # U-statistic on x vs itself only keeps the O(1/n) diagonal difference.
    assert abs(float(mi.mmd(x, x, unbiased=True))) < 0.2

    def both(key):
        key_x, key_y = jax.random.split(key)
        a, b = jax.random.normal(key_x, (16, 3)), jax.random.normal(key_y, (16, 3))
        return mi.mmd(a, b, unbiased=True), mi.mmd(a, b, unbiased=False)

    unbiased, biased = jax.vmap(both)(jax.random.split(jax.random.key(6), 500))
    standard_error = float(unbiased.std()) / math.sqrt(500)
    assert abs(float(unbiased.mean())) < 4 * standard_error
    assert float(biased.mean()) > 10 * standard_error

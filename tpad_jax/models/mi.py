"""Mutual-information estimators (pure functions) and the small critics that feed them.

Lower bounds: `infonce`, `nwj`, `jsd` (its implied MI bound); each is a selectable alignment estimator
(`stage2.align_estimator`). Upper bound: `club` (vCLUB with a variational Gaussian q(y|x), fitted by
`club_q_loss`), the disentangling term. Distribution distance: `mmd`. All values are in nats.

Everything is plain jnp over whole batches, so under `jax.jit` with the batch sharded over a mesh axis
the negatives are the global batch: XLA inserts the collectives, no shard_map is needed.

Score-matrix convention: `scores[i, j] = f(x_i, y_j)`; the positive pair of row i is column i.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx


def critic_scores(za, zb, *, temperature=1.0, critic="cosine", negatives=None):
    """Pairwise critic scores f(a_i, b_j) / temperature, with optional extra negative columns.

    Args:
      za: [B, d] first views (rows).
      zb: [B, d] second views; row i is the positive of za[i].
      temperature: divides every score.
      critic: "cosine" (L2-normalised dot product) or "dot".
      negatives: optional [K, d] bank of extra second-view negatives shared by every row.

    Returns:
      [B, B + K] scores; the positive of row i is column i.
    """
    if critic not in ("cosine", "dot"):
        raise ValueError(f"critic must be 'cosine' or 'dot', got {critic!r}")
    candidates = zb if negatives is None else jnp.concatenate([zb, negatives], axis=0)
    if critic == "cosine":
        za = _l2_normalise(za)
        candidates = _l2_normalise(candidates)
    return za @ candidates.T / temperature


def infonce(scores, *, mask=None):
    """InfoNCE lower bound log N - CE, N = number of valid candidates per row.

    Args:
      scores: [B, B + K] from `critic_scores` (K extra negatives appended as columns).
      mask: optional bool [B] of valid rows (padded batches); invalid rows are neither anchors nor
        negatives.

    Returns:
      Scalar bound in nats (at most log N); the training loss is its negation.
    """
    num_rows, num_cols = scores.shape
    row_valid = _row_mask(mask, num_rows)
    col_valid = jnp.concatenate([row_valid, jnp.ones((num_cols - num_rows,), bool)])
    masked = jnp.where(col_valid[None, :], scores, -jnp.inf)
    log_norm = jax.nn.logsumexp(masked, axis=1)
    cross_entropy = log_norm - jnp.diagonal(scores)
    num_candidates = jnp.sum(col_valid)
    return jnp.log(num_candidates) - masked_mean(cross_entropy, row_valid)


def infonce_accuracy(scores, *, mask=None):
    """Fraction of valid rows whose positive (column i) has the strictly highest valid score."""
    num_rows, num_cols = scores.shape
    row_valid = _row_mask(mask, num_rows)
    col_valid = jnp.concatenate([row_valid, jnp.ones((num_cols - num_rows,), bool)])
    masked = jnp.where(col_valid[None, :], scores, -jnp.inf)
    positive = jnp.diagonal(scores)
    # A positive tied with a negative does not count as correct: no credit from ties.
    beaten = jnp.sum(masked >= positive[:, None], axis=1) - 1
    return masked_mean((beaten == 0).astype(jnp.float32), row_valid)


def club(mu, logvar, y, *, mask=None):
    """vCLUB upper bound (Cheng et al. 2020): E_p(x,y) log q(y|x) - E_p(x) E_p(y) log q(y|x).

    q(y|x) = N(mu(x), exp(logvar(x))) is fitted separately with `club_q_loss`; gradients of this value
    should reach the encoders of x and y, not q (stop them in the caller, as the paper does).

    Args:
      mu, logvar: [B, d] the Gaussian q(y|x_i) for each row.
      y: [B, d] samples paired with x_i.
      mask: optional bool [B] of valid rows; the marginal pairs only valid rows.

    Returns:
      Scalar upper-bound estimate in nats.
    """
    row_valid = _row_mask(mask, mu.shape[0])
    positive = _gaussian_log_density_core(mu, logvar, y)
    # mean_j (y_j - mu_i)^2 expanded so the [B, B, d] tensor is never built.
    weights = row_valid.astype(mu.dtype) / jnp.maximum(jnp.sum(row_valid), 1)
    y_mean = weights @ y
    y_sq_mean = weights @ jnp.square(y)
    mean_sq_dist = y_sq_mean[None, :] - 2.0 * mu * y_mean[None, :] + jnp.square(mu)
    negative = -0.5 * jnp.sum(mean_sq_dist * jnp.exp(-logvar), axis=-1)
    return masked_mean(positive - negative, row_valid)


def club_q_loss(mu, logvar, y, *, mask=None):
    """Negative mean log-likelihood -E log q(y|x) (with constants): the loss that fits CLUB's q."""
    row_valid = _row_mask(mask, mu.shape[0])
    log_density = _gaussian_log_density_core(mu, logvar, y) - 0.5 * jnp.sum(
        logvar + math.log(2.0 * math.pi), axis=-1
    )
    return -masked_mean(log_density, row_valid)


def joint_and_marginal(scores, *, mask=None):
    """The pairs of a critic matrix for the bounds that average over joint and marginal samples.

    Args:
      scores: [B, B + K] from `critic_scores`; -inf marks a pair that is neither (a false negative).
      mask: optional bool [B] of valid rows (padded batches); invalid rows pair with nothing.

    Returns:
      (joint [B], joint_valid [B], marginal [B, B + K], marginal_valid [B, B + K]): the positives (the
      diagonal) and the negatives (every other finite pair of valid rows and columns).
    """
    num_rows, num_cols = scores.shape
    row_valid = _row_mask(mask, num_rows)
    col_valid = jnp.concatenate([row_valid, jnp.ones((num_cols - num_rows,), bool)])
    off_diagonal = ~jnp.eye(num_rows, num_cols, dtype=bool)
    marginal_valid = row_valid[:, None] & col_valid[None, :] & off_diagonal & jnp.isfinite(scores)
    return jnp.diagonal(scores), row_valid, scores, marginal_valid


def nwj(t_joint, t_marginal, *, joint_valid=None, marginal_valid=None):
    """NWJ / f-divergence lower bound E_P[T] - e^{-1} E_Q[e^T]; it is also the training objective.

    `joint_valid` / `marginal_valid` (bool, shaped like the values) leave entries out of the means.
    """
    return (masked_mean(t_joint, _valid(joint_valid, t_joint))
            - jnp.exp(_log_mean_exp(t_marginal, marginal_valid) - 1.0))


def jsd(t_joint, t_marginal, *, joint_valid=None, marginal_valid=None):
    """Jensen-Shannon critic objective (Hjelm et al. 2019) and the MI lower bound it implies.

    The objective E_P[-softplus(-T)] - E_Q[softplus(T)] equals 2 JSD - log 4 at its optimum, where
    T = log p(x,y) / p(x)p(y). Its MI value is read, as in Poole et al. 2019, from the NWJ bound of the
    shifted critic T + 1: E_P[T] + 1 - E_Q[e^T], a valid lower bound for any T. Masks as in `nwj`.

    Returns:
      (objective to maximise, MI lower bound in nats).
    """
    joint_valid, marginal_valid = _valid(joint_valid, t_joint), _valid(marginal_valid, t_marginal)
    safe_marginal = jnp.where(marginal_valid, t_marginal, 0.0)  # -inf pairs: no NaN through softplus
    objective = (masked_mean(-jax.nn.softplus(-t_joint), joint_valid)
                 - masked_mean(jax.nn.softplus(safe_marginal), marginal_valid))
    bound = nwj(t_joint + 1.0, t_marginal + 1.0, joint_valid=joint_valid, marginal_valid=marginal_valid)
    return objective, bound


def mmd(x, y, bandwidths=(0.5, 1.0, 2.0, 4.0), *, unbiased=True, x_mask=None, y_mask=None):
    """Squared MMD with a sum of RBF kernels exp(-|a-b|^2 / (2 s^2)), s in `bandwidths`.

    Args:
      x: [n, d] and y: [m, d] samples of the two distributions.
      bandwidths: kernel widths s.
      unbiased: True drops the i == j terms of the within-sample sums (U-statistic: zero mean when
        x and y share a distribution, can be negative); False keeps them (V-statistic: >= 0, exactly
        0 when x == y).
      x_mask, y_mask: optional bool [n] / [m] of valid rows.

    Returns:
      Scalar MMD^2 estimate.
    """
    x_valid = _row_mask(x_mask, x.shape[0]).astype(x.dtype)
    y_valid = _row_mask(y_mask, y.shape[0]).astype(y.dtype)

    def mean_kernel(a, b, a_valid, b_valid, drop_diagonal):
        weights = a_valid[:, None] * b_valid[None, :]
        if drop_diagonal:
            weights = weights * (1.0 - jnp.eye(a.shape[0], dtype=a.dtype))
        return jnp.sum(_rbf_kernel(a, b, bandwidths) * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    return (
        mean_kernel(x, x, x_valid, x_valid, unbiased)
        + mean_kernel(y, y, y_valid, y_valid, unbiased)
        - 2.0 * mean_kernel(x, y, x_valid, y_valid, False)
    )


class GaussianCritic(nnx.Module):
    """The variational q(y|x) = N(mu(x), exp(logvar(x))) of CLUB: two small MLP heads."""

    def __init__(self, x_dim, y_dim, hidden_dim, *, rngs):
        self.mu_hidden = nnx.Linear(x_dim, hidden_dim, rngs=rngs)
        self.mu_out = nnx.Linear(hidden_dim, y_dim, rngs=rngs)
        self.logvar_hidden = nnx.Linear(x_dim, hidden_dim, rngs=rngs)
        self.logvar_out = nnx.Linear(hidden_dim, y_dim, rngs=rngs)

    def __call__(self, x):
        """Returns (mu, logvar), each [B, y_dim]."""
        mu = self.mu_out(jax.nn.relu(self.mu_hidden(x)))
        # tanh keeps the variance in [e^-1, e] as in the reference CLUB code: no collapse to zero.
        logvar = jnp.tanh(self.logvar_out(jax.nn.relu(self.logvar_hidden(x))))
        return mu, logvar


def _gaussian_log_density_core(mu, logvar, y):
    """log N(y; mu, e^logvar) without the -0.5 (logvar + log 2 pi) terms, which cancel in CLUB."""
    return -0.5 * jnp.sum(jnp.square(y - mu) * jnp.exp(-logvar), axis=-1)


def _rbf_kernel(a, b, bandwidths):
    sq_dist = (
        jnp.sum(jnp.square(a), axis=1)[:, None]
        + jnp.sum(jnp.square(b), axis=1)[None, :]
        - 2.0 * a @ b.T
    )
    sq_dist = jnp.maximum(sq_dist, 0.0)
    return sum(jnp.exp(-sq_dist / (2.0 * s * s)) for s in bandwidths)


def _log_mean_exp(values, valid=None):
    valid = _valid(valid, values)
    masked = jnp.where(valid, values, -jnp.inf)
    return jax.nn.logsumexp(masked) - jnp.log(jnp.maximum(jnp.sum(valid), 1))


def _valid(valid, values):
    return jnp.ones(jnp.shape(values), bool) if valid is None else valid.astype(bool)


def _l2_normalise(z):
    return z * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(z), axis=-1, keepdims=True), 1e-12))


def _row_mask(mask, num_rows):
    return jnp.ones((num_rows,), bool) if mask is None else mask.astype(bool)


def masked_mean(values, valid):
    """Mean of `values` over the rows where `valid` is True (0 when none is)."""
    return jnp.sum(jnp.where(valid, values, 0.0)) / jnp.maximum(jnp.sum(valid), 1)

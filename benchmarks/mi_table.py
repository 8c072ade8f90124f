"""True vs estimated MI of correlated Gaussians for every estimator in `tpad_jax.models.mi`.

Usage:
  python benchmarks/mi_table.py [--steps 800] [--batch 128]

x ~ N(0, I_D), y = rho x + sqrt(1 - rho^2) noise per dimension; a case with d < D correlated
dimensions leaves the rest independent, so every case shares one critic shape and each estimator is one
jitted, vmapped training run. True MI = -d/2 log(1 - rho^2). Lower bounds (InfoNCE, NWJ, JSD: the
choices of `stage2.align_estimator`) should land below it, InfoNCE also below log B; CLUB above it, near its value at the exact q,
d rho^2 / (1 - rho^2). `tests/test_mi.py` runs the same `fit_estimator`.
"""

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tpad_jax.models import mi

LOWER_BOUNDS = ("infonce", "nwj", "jsd")
ESTIMATORS = LOWER_BOUNDS + ("club",)


def correlated_gaussians(key, rho, batch):
    """Samples (x, y) [batch, D] with per-dimension correlation `rho` [D]."""
    key_x, key_noise = jax.random.split(key)
    x = jax.random.normal(key_x, (batch, rho.shape[0]))
    noise = jax.random.normal(key_noise, (batch, rho.shape[0]))
    return x, rho * x + jnp.sqrt(1.0 - rho**2) * noise


def case_rhos(cases, width):
    """[C, width] per-dimension correlations for (d, rho) cases; dimensions past d are independent."""
    return jnp.array([[rho] * d + [0.0] * (width - d) for d, rho in cases])


def gaussian_mi(cases):
    """Closed-form MI -d/2 log(1 - rho^2) per (d, rho) case."""
    return np.array([-d / 2 * math.log(1 - rho**2) for d, rho in cases])


def club_at_exact_q(cases):
    """vCLUB with the exact q(y|x) = N(rho x, 1 - rho^2): d rho^2 / (1 - rho^2) per case."""
    return np.array([d * rho**2 / (1 - rho**2) for d, rho in cases])


def _objective(name):
    """`objective(model, x, y) -> (value to maximise, estimate)` per estimator."""

    def objective(model, x, y):
        if name == "club":
            mu, logvar = model(x)
            return -mi.club_q_loss(mu, logvar, y), mi.club(mu, logvar, y)
        scores = model(x, y)
        joint, joint_valid, marginal, marginal_valid = mi.joint_and_marginal(scores)
        if name == "infonce":
            bound = mi.infonce(scores)
            return bound, bound
        if name == "nwj":
            bound = mi.nwj(joint, marginal, joint_valid=joint_valid, marginal_valid=marginal_valid)
            return bound, bound
        objective_value, bound = mi.jsd(joint, marginal, joint_valid=joint_valid, marginal_valid=marginal_valid)
        return objective_value, bound

    return objective


class SeparableCritic(nnx.Module):
    """f(x, y) = g(x) . h(y) for every pair of a batch, g and h two-hidden-layer ReLU MLPs.

    The Gaussian benchmark's critic; TPAD's alignment critic is the cosine of its heads instead.
    """

    def __init__(self, x_dim, y_dim, hidden_dim, *, embed_dim=16, rngs):
        def mlp(in_dim):
            return nnx.Sequential(nnx.Linear(in_dim, hidden_dim, rngs=rngs), jax.nn.relu,
                                  nnx.Linear(hidden_dim, hidden_dim, rngs=rngs), jax.nn.relu,
                                  nnx.Linear(hidden_dim, embed_dim, rngs=rngs))

        self.x_net, self.y_net = mlp(x_dim), mlp(y_dim)

    def __call__(self, x, y):
        """Returns scores [B, B] with scores[i, j] = f(x_i, y_j)."""
        return self.x_net(x) @ self.y_net(y).T


def _build(name, width, hidden_dim):
    if name == "club":
        return lambda key: mi.GaussianCritic(width, width, hidden_dim, rngs=nnx.Rngs(key))
    return lambda key: SeparableCritic(width, width, hidden_dim, rngs=nnx.Rngs(key))


def fit_estimator(name, rhos, *, steps=800, batch=128, learning_rate=3e-3, report_steps=150, hidden_dim=32):
    """Trains one critic per case (vmapped, one jit) and returns the mean held-out estimate per case.

    Each step's estimate uses the parameters from before that step's update on a fresh batch, so it
    is a held-out value; the mean is over the last `report_steps` steps.

    Args:
      name: one of ESTIMATORS.
      rhos: [C, D] per-case, per-dimension correlations.

    Returns:
      [C] estimates.
    """
    build = _build(name, rhos.shape[1], hidden_dim)
    objective = _objective(name)
    graphdef, _ = nnx.split(build(jax.random.key(0)))
    optimizer = optax.adam(learning_rate)

    def run_case(key, rho):
        init_key, data_key = jax.random.split(key)
        params = nnx.state(build(init_key))

        def step(carry, step_key):
            params, opt_state = carry
            x, y = correlated_gaussians(step_key, rho, batch)

            def loss(p):
                value, estimate = objective(nnx.merge(graphdef, p), x, y)
                return -value, estimate

            grads, estimate = jax.grad(loss, has_aux=True)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), estimate

        carry = (params, optimizer.init(params))
        _, estimates = jax.lax.scan(step, carry, jax.random.split(data_key, steps))
        return estimates

    keys = jax.random.split(jax.random.key(42), rhos.shape[0])
    estimates = jax.jit(jax.vmap(run_case))(keys, rhos)
    return jax.tree.map(lambda e: np.asarray(e[:, -report_steps:].mean(axis=1)), estimates)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()

    cases = [(d, rho) for d in (1, 2, 4) for rho in (0.2, 0.5, 0.8, 0.9)]
    rhos = case_rhos(cases, width=4)
    columns = {name: fit_estimator(name, rhos, steps=args.steps, batch=args.batch) for name in LOWER_BOUNDS}
    columns["club"] = fit_estimator("club", rhos, steps=args.steps, batch=args.batch)

    header = [
        "d", "rho", "true MI", "InfoNCE", "NWJ", "JSD", "CLUB", "CLUB at exact q",
    ]
    print(f"{args.steps} Adam steps, batch {args.batch} (InfoNCE cap log B = {math.log(args.batch):.3f}); "
          "estimates in nats, mean of the last 150 held-out steps.\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---:|" * len(header))
    rows = zip(
        cases, gaussian_mi(cases), *(columns[k] for k in LOWER_BOUNDS + ("club",)),
        club_at_exact_q(cases),
    )
    for (d, rho), *values in rows:
        print(f"| {d} | {rho} | " + " | ".join(f"{v:.3f}" for v in values) + " |")


if __name__ == "__main__":
    main()

"""Runs the toy training loop in WORKDIR for STEPS steps (resuming if WORKDIR has checkpoints).

Usage: python tests/resume_worker.py WORKDIR STEPS DELAY_S OUT_NPZ
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import numpy as np  # noqa: E402

import toy_training as toy  # noqa: E402
from tpad_jax.parallel import mesh as mesh_lib  # noqa: E402
from tpad_jax.train import loop  # noqa: E402

BATCH = 16
MESH_SHAPE = (2, 2, 2)


def run(workdir: str, steps: int, delay_s: float, eval_fn=None):
    """The toy run shared by this worker and the in-process reference of tests/test_loop.py."""
    mesh = mesh_lib.make_mesh(toy.mesh_config(MESH_SHAPE))
    return loop.run_loop(
        workdir=workdir, train_config=toy.train_config(), mesh=mesh,
        rules=toy.RULES, make_model=toy.make_model, tx=toy.make_tx(steps), wrt=toy.TRAINABLE,
        loss_fn=toy.loss_fn, data_iterator=iter(toy.dataset(BATCH, delay_s=delay_s)), num_steps=steps,
        seed=0, eval_fn=eval_fn)


if __name__ == "__main__":
    workdir, steps, delay_s, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    np.savez(out, **toy.trained_params(run(workdir, steps, delay_s)))

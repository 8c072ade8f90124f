"""One of two JAX processes on 127.0.0.1: 3 data-parallel toy steps, a checkpoint, then a restore.

Usage: python tests/multihost_worker.py PROCESS_ID PORT WORKDIR OUT_NPZ
Each process has 2 CPU devices and reads its half of every global batch.
"""

import sys

import jax
import ml_collections
import numpy as np

import toy_training as toy
from tpad_jax.parallel import distributed
from tpad_jax.parallel import mesh as mesh_lib
from tpad_jax.train import loop

NUM_PROCESSES = 2
LOCAL_BATCH = 8
STEPS = 3


def run(process_id: int, workdir: str):
    mesh = mesh_lib.make_mesh(toy.mesh_config((-1, 1, 1)))
    return loop.run_loop(
        workdir=workdir, train_config=toy.train_config(), mesh=mesh, rules=toy.RULES,
        make_model=toy.make_model, tx=toy.make_tx(), wrt=toy.TRAINABLE, loss_fn=toy.loss_fn,
        data_iterator=iter(toy.dataset(LOCAL_BATCH, process_index=process_id, process_count=NUM_PROCESSES)),
        num_steps=STEPS, seed=0)


def main(process_id: int, port: int, workdir: str, out: str):
    # Importable by the test without side effects: the device count is set here, before the first
    # JAX computation (the launching test strips XLA_FLAGS from this process's environment).
    jax.config.update("jax_num_cpu_devices", 2)
    dist = ml_collections.ConfigDict({"coordinator": f"127.0.0.1:{port}", "num_processes": NUM_PROCESSES,
                                      "process_id": process_id})
    assert distributed.maybe_initialize(dist)
    assert jax.device_count() == 2 * NUM_PROCESSES and jax.local_device_count() == 2
    trained = toy.trained_params(run(process_id, workdir))
    restored = toy.trained_params(run(process_id, workdir))  # the checkpoint at STEPS: restore only
    if distributed.is_main_process():
        np.savez(out, **{f"trained/{k}": v for k, v in trained.items()},
                 **{f"restored/{k}": v for k, v in restored.items()})
    jax.distributed.shutdown()


if __name__ == "__main__":
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])

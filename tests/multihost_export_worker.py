"""One of two JAX processes on 127.0.0.1 exporting the tiny TPAD model of tests/test_tpad.py together.

Usage: python tests/multihost_export_worker.py PROCESS_ID PORT OUT_NPY
Each process has one CPU device; the model is replicated over the 2-device mesh, each process embeds its
half of every chunk of items, and process 0 saves the gathered array.
"""

import sys

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import toy_training as toy
from test_tpad import tiny_model
from tpad_jax import export
from tpad_jax.parallel import distributed
from tpad_jax.parallel import mesh as mesh_lib


def main(process_id: int, port: int, out: str):
    jax.config.update("jax_num_cpu_devices", 1)  # before the first JAX computation
    dist = ml_collections.ConfigDict({"coordinator": f"127.0.0.1:{port}", "num_processes": 2,
                                      "process_id": process_id})
    assert distributed.maybe_initialize(dist) and jax.device_count() == 2
    model = tiny_model()  # the same seed on both processes: the same weights and tables
    mesh = mesh_lib.make_mesh(toy.mesh_config((1, 2, 1)))
    graphdef, state = nnx.split(model)
    local = jax.tree.map(np.asarray, state)
    state = jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, NamedSharding(mesh, P()),
                                                                lambda index: x[index]), local)
    embeddings = export.item_embeddings(nnx.merge(graphdef, state), batch_size=4)
    if distributed.is_main_process():
        np.save(out, embeddings)
    jax.distributed.shutdown()


if __name__ == "__main__":
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])

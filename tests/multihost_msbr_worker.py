"""One of two JAX processes on 127.0.0.1 computing a downstream row's loss on whole-session batches.

Usage: python tests/multihost_msbr_worker.py PROCESS_ID PORT OUT_NPY
Each process has 2 CPU devices and reads its half of every global batch (`BucketedBatches` with its
process index, listed over its 2 device shards), as `train_msbr` does; process 0 saves the loss of each
of the first `NUM_BATCHES` global batches to OUT_NPY.
"""

import sys

import jax
import ml_collections
import numpy as np
from flax import nnx

from tpad_jax.downstream import tables
from tpad_jax.models import session_encoders
from tpad_jax.parallel import distributed
from tpad_jax.parallel import mesh as mesh_lib
from tpad_jax.parallel import rules as rules_lib

NUM_PROCESSES = 2
NUM_ITEMS, WIDTH, BATCH, NUM_BATCHES = 40, 6, 16, 6
ENCODER = session_encoders.EncoderConfig(encoder="transformer", hidden_dim=16, num_layers=1, num_heads=2,
                                         dropout=0.0, max_length=WIDTH + 1)


def sessions():
    rng = np.random.default_rng(7)
    return [rng.integers(1, NUM_ITEMS, size=rng.integers(2, 12)).astype(np.int32) for _ in range(60)]


def batches(process_index: int, process_count: int, shards: int) -> tables.BucketedBatches:
    table = tables.SessionTable.every_session(sessions(), WIDTH)
    return tables.BucketedBatches(table, (3, WIDTH), BATCH, 0, 1, process_index, process_count, shards)


def make_model():
    return session_encoders.SessionEncoder(ENCODER, NUM_ITEMS, rngs=nnx.Rngs(0))


@nnx.jit
def listed_loss(model, batch):
    """The loss as `train_msbr` computes it: at the listed positions only."""
    vectors = tables.counted_vectors(model.position_vectors(batch["items"], batch["mask"]), batch["positions"])
    return session_encoders.chunked_softmax_cross_entropy(
        vectors, model.item_table(), batch["target"].reshape(-1), 8192, mask=batch["valid"].reshape(-1))


def main(process_id: int, port: int, out: str):
    jax.config.update("jax_num_cpu_devices", 2)  # before the first JAX computation
    dist = ml_collections.ConfigDict({"coordinator": f"127.0.0.1:{port}", "num_processes": NUM_PROCESSES,
                                      "process_id": process_id})
    assert distributed.maybe_initialize(dist) and jax.device_count() == 2 * NUM_PROCESSES
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"shape": (-1, 1, 1), "axes": ("data", "fsdp", "tensor")}))
    rules = rules_lib.get_rules("default")
    shards = mesh_lib.local_batch_shards(mesh)
    assert shards == 2, shards
    source = batches(process_id, NUM_PROCESSES, shards)
    with mesh_lib.activate(mesh, rules):
        model = mesh_lib.sharded_init(make_model, mesh, rules)
        losses = [float(listed_loss(model, mesh_lib.global_batch(source[i], mesh))) for i in range(NUM_BATCHES)]
    if distributed.is_main_process():
        np.save(out, np.array(losses))
    jax.distributed.shutdown()


if __name__ == "__main__":
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])

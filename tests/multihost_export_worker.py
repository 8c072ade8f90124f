"""One of two JAX processes on 127.0.0.1 exporting the tiny TPAD model of tests/test_tpad.py together.

Usage: python tests/multihost_export_worker.py PROCESS_ID PORT OUT_NPY
Each process has one CPU device. The model lives on the 2-device mesh as a run's does: weights
replicated, item tables split by rows over the two processes and filled as a run fills them: each process
runs the frozen ViT over the pictures of the rows it holds only (`mesh.held_rows`, asserted to be a part) and
places its prompt and feature rows (`table_state`). Each process then embeds its half of every chunk of
items, and process 0 saves the gathered array to OUT_NPY.
"""

import dataclasses
import sys

import jax
import ml_collections
import numpy as np
from flax import nnx

import toy_training as toy
from configs import tpad_base
from test_tpad import NUM_ITEMS, tiny_items, tiny_model
from tpad_jax import export
from tpad_jax.models import tpad as tpad_lib
from tpad_jax.parallel import distributed
from tpad_jax.parallel import mesh as mesh_lib
from tpad_jax.parallel import rules as rules_lib
from tpad_jax.train import inputs as inputs_lib


def main(process_id: int, port: int, out: str):
    jax.config.update("jax_num_cpu_devices", 1)  # before the first JAX computation
    dist = ml_collections.ConfigDict({"coordinator": f"127.0.0.1:{port}", "num_processes": 2,
                                      "process_id": process_id})
    assert distributed.maybe_initialize(dist) and jax.device_count() == 2
    model = tiny_model()  # the same seed on both processes: the same weights
    mesh = mesh_lib.make_mesh(toy.mesh_config((1, 2, 1)))
    rules = rules_lib.get_rules("default")
    config = tpad_base.get_config("tiny")
    config.mesh.shape, config.mesh.rules = (1, 2, 1), "default"
    cfg = dataclasses.replace(model.cfg, table_rows=inputs_lib.table_rows(config, NUM_ITEMS))
    split = mesh_lib.sharded_init(lambda: tpad_lib.TPAD(cfg, rngs=nnx.Rngs(0)), mesh, rules)
    weights = dict(nnx.to_flat_state(nnx.state(model)))
    for path, variable in nnx.to_flat_state(nnx.state(split)):  # tiny_model's weights (LoRA perturbed)
        if path[0] != "tables":
            variable.set_value(jax.device_put(np.asarray(weights[path].get_value()),
                                              variable.get_value().sharding))
    prompts, pixels = tiny_items()
    rows = mesh_lib.held_rows(split.tables["vision"][...], NUM_ITEMS)
    assert 0 < len(rows) < NUM_ITEMS, rows  # a part of the catalogue's pictures, not all of them
    padded = np.concatenate([rows, np.zeros(-len(rows) % 4, rows.dtype)])  # fixed-size batches of 4
    valid = np.arange(len(padded)) < len(rows)
    batches = [{"rows": padded[i:i + 4], "pixels": pixels[padded[i:i + 4]], "valid": valid[i:i + 4]}
               for i in range(0, len(padded), 4)]
    vision = tpad_lib.vision_features_of_batches(split.towers, batches, rows, 4)
    with mesh_lib.activate(mesh, rules):
        nnx.update(split, tpad_lib.table_state(split, prompts, np.ones(NUM_ITEMS, bool), vision, rows))
    embeddings = export.item_embeddings(split, batch_size=4)
    if distributed.is_main_process():
        np.save(out, embeddings)
    jax.distributed.shutdown()


if __name__ == "__main__":
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])

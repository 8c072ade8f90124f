"""The export on a device mesh: each device embeds its share of the items; the array equals one device's.

One process with the 8 virtual CPU devices here, and two processes over 127.0.0.1
(tests/multihost_export_worker.py), each against the same model exported on a single device.
"""

import dataclasses
import pathlib

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import local_processes
import toy_training as toy
from test_tpad import tiny_model
from configs import tpad_base
from tpad_jax import export
from tpad_jax.models import tpad as tpad_lib
from tpad_jax.parallel import mesh as mesh_lib
from tpad_jax.parallel import rules as rules_lib
from tpad_jax.train import inputs as inputs_lib

WORKER = pathlib.Path(__file__).with_name("multihost_export_worker.py")


def on_mesh(model, mesh):
    """`model` with every array replicated over `mesh` (a trained stage's state lives on its mesh)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, NamedSharding(mesh, P())))


def test_export_on_eight_devices_splits_the_items_and_equals_one_device():
    model = tiny_model()
    expected = export.item_embeddings(model, batch_size=4)  # unsharded: one device embeds all 10 items
    mesh = mesh_lib.make_mesh(toy.mesh_config((2, 4, 1)))
    sharded = on_mesh(model, mesh)
    got = export.item_embeddings(sharded, batch_size=4)  # 8 rows per chunk: one per device
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

    # The work divides: XLA's per-device cost of the sharded export is a fraction of the whole.
    def flops(state, row_sharding):
        compiled = export._embed_all.lower(graphdef, state, 10, 8, row_sharding).compile()
        return export_cost(compiled)

    graphdef, state = nnx.split(sharded)
    one_device = nnx.split(model)[1]
    assert flops(state, mesh_lib.data_sharding(mesh)) < flops(one_device, None) / 4


def export_cost(compiled) -> float:
    cost = compiled.cost_analysis()
    return float(sum(c.get("flops", 0.0) for c in (cost if isinstance(cost, (list, tuple)) else [cost])))


def test_two_processes_fill_their_own_table_rows_and_export_the_single_process_array(tmp_path):
    out = tmp_path / "export.npy"
    local_processes.run_workers(WORKER, 2, out)
    expected = export.item_embeddings(tiny_model(), batch_size=4)
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-5, atol=1e-6)


def test_item_tables_are_split_by_rows_padded_and_exported_whole():
    model = tiny_model()  # 10 items, tables unsplit
    expected = export.item_embeddings(model, batch_size=4)
    mesh, rules = mesh_lib.make_mesh(toy.mesh_config((2, 4, 1))), rules_lib.get_rules("default")
    cfg = dataclasses.replace(model.cfg, table_rows=inputs_lib.table_rows(_mesh_config((2, 4, 1)), 10))
    assert cfg.rows == 16  # 10 items over 8 row shards: padded to 2 rows a device
    sharded = mesh_lib.sharded_init(lambda: tpad_lib.TPAD(cfg, rngs=nnx.Rngs(0)), mesh, rules)
    source = {path: np.asarray(variable.get_value()) for path, variable in nnx.to_flat_state(nnx.state(model))}
    for path, variable in nnx.to_flat_state(nnx.state(sharded)):
        value = source[path]
        if path[0] == "tables":  # the catalogue's rows, then zero padding
            value = np.pad(value, [(0, cfg.rows - len(value))] + [(0, 0)] * (value.ndim - 1))
        variable.set_value(jax.device_put(value, variable.get_value().sharding))
    tokens = sharded.tables["tokens"].get_value()
    assert tokens.shape[0] == 16 and {s.data.shape[0] for s in tokens.addressable_shards} == {2}
    got = export.item_embeddings(sharded, batch_size=4)
    assert got.shape == expected.shape  # the padding rows are not exported
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def _mesh_config(shape):
    config = tpad_base.get_config("tiny")
    config.mesh.shape = shape
    config.mesh.rules = "default"
    return config

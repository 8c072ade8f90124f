"""Mesh construction, batch sharding and sharded initialisation."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

import toy_training as toy
from tpad_jax.parallel import mesh as mesh_lib


@pytest.mark.parametrize("shape, resolved", [((-1, 1, 1), (8, 1, 1)), ((2, -1, 2), (2, 2, 2)),
                                             ((1, 1, 8), (1, 1, 8))])
def test_resolve_mesh_shape_fills_remaining_devices(shape, resolved):
    assert mesh_lib.resolve_mesh_shape(shape, 8) == resolved


@pytest.mark.parametrize("shape, message", [((3, -1, 1), "does not divide the 8"),
                                            ((2, 2, 1), "uses 4 devices but 8"),
                                            ((-1, -1, 1), "at most one axis")])
def test_resolve_mesh_shape_rejects_bad_shapes(shape, message):
    with pytest.raises(ValueError, match=message):
        mesh_lib.resolve_mesh_shape(shape, 8)


def test_make_mesh_uses_auto_axes():
    mesh = mesh_lib.make_mesh(toy.mesh_config((2, -1, 1)))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert len(set(mesh.devices.flat)) == jax.device_count()


def test_global_batch_splits_leading_dim_over_data_axes():
    mesh = mesh_lib.make_mesh(toy.mesh_config((2, 2, 2)))
    local = {"x": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "mask": np.arange(8) % 2 == 0}
    batch = mesh_lib.global_batch(local, mesh)
    assert batch["x"].sharding.spec == P(("data", "fsdp"))
    # 4 batch shards of 2 rows, each held by the 2 devices of the tensor axis.
    assert {shard.data.shape for shard in batch["x"].addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(batch["x"]), local["x"])
    np.testing.assert_array_equal(np.asarray(batch["mask"]), local["mask"])


def test_sharded_init_places_variables_by_logical_axes_and_matches_local_init():
    mesh = mesh_lib.make_mesh(toy.mesh_config((2, 2, 2)))
    model = mesh_lib.sharded_init(toy.make_model, mesh, toy.RULES)
    expected_specs = {"body/kernel": P("fsdp", "tensor"), "body/bias": P("tensor"),
                      "body/lora/lora_a": P("fsdp", None), "body/lora/lora_b": P(None, "tensor"),
                      "head/kernel": P("tensor", "fsdp")}
    flat_state = nnx.to_flat_state(nnx.state(model, nnx.Param))
    flat = {"/".join(map(str, path)): var[...] for path, var in flat_state}
    for name, spec in expected_specs.items():
        assert flat[name].sharding.spec == spec, name
        assert flat[name].sharding.mesh == mesh
    with mesh_lib.activate(toy.single_device_mesh(), toy.RULES):
        local = toy.make_model()
    for path, var in nnx.to_flat_state(nnx.state(local, nnx.Param)):
        # Same values up to float32 rounding (the jitted init fuses the scaling differently).
        np.testing.assert_allclose(np.asarray(flat["/".join(map(str, path))]), np.asarray(var[...]),
                                   rtol=1e-6, atol=1e-7)


def test_abstract_state_carries_concrete_shardings():
    mesh = mesh_lib.make_mesh(toy.mesh_config((1, 4, 2)))
    _, abstract = mesh_lib.abstract_state(toy.make_model, mesh, toy.RULES)
    kernel = abstract["body"]["kernel"].get_value()
    assert isinstance(kernel, jax.ShapeDtypeStruct)
    assert kernel.shape == (toy.IN_DIM, toy.HIDDEN_DIM)
    assert kernel.sharding.spec == P("fsdp", "tensor")
    assert kernel.sharding.mesh == mesh  # a concrete Mesh, not an AbstractMesh: Orbax can restore onto it

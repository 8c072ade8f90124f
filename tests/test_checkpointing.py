"""Orbax checkpoints: model + optimizer + data iterator round trip, resharding on restore, retention."""

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

import toy_training as toy
from tpad_jax.parallel import mesh as mesh_lib
from tpad_jax.train import checkpointing, loop


def _make_train_state():
    return loop.TrainState(toy.make_model(), toy.make_tx(), toy.TRAINABLE)


def test_round_trip_onto_another_mesh_resumes_data_iterator(tmp_path):
    save_mesh = mesh_lib.make_mesh(toy.mesh_config((2, 4, 1)))
    state = nnx.state(mesh_lib.sharded_init(_make_train_state, save_mesh, toy.RULES))
    iterator = iter(toy.dataset(4))
    for _ in range(3):
        next(iterator)
    manager = checkpointing.make_manager(tmp_path, max_to_keep=2)
    checkpointing.save(manager, 3, state, iterator)
    expected_batch = next(iterator)  # advancing after save must not move the saved position
    manager.wait_until_finished()

    restore_mesh = mesh_lib.make_mesh(toy.mesh_config((1, 2, 4)))
    graphdef, abstract = mesh_lib.abstract_state(_make_train_state, restore_mesh, toy.RULES)
    fresh_iterator = iter(toy.dataset(4))
    restored = checkpointing.restore(checkpointing.make_manager(tmp_path, max_to_keep=2), 3, abstract,
                                     fresh_iterator)

    resumed_batch = next(fresh_iterator)
    for name in ("x", "y"):
        np.testing.assert_array_equal(resumed_batch[name], expected_batch[name])
    saved_leaves, restored_leaves = jax.tree.leaves(state), jax.tree.leaves(restored)
    assert len(saved_leaves) == len(restored_leaves)
    for saved, got in zip(saved_leaves, restored_leaves):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(saved))
    kernel = nnx.merge(graphdef, restored).model.body.kernel[...]
    assert kernel.sharding.mesh == restore_mesh and kernel.sharding.spec == P("fsdp", "tensor")
    # The Adam moments follow their parameter's logical axes onto the new mesh too.
    mu = restored["optimizer"]["opt_state"][1].inner_states["heads"].inner_state[0].mu["head"]["kernel"]
    assert mu[...].sharding.spec == P("tensor", "fsdp")


def test_manager_keeps_the_newest_checkpoints(tmp_path):
    manager = checkpointing.make_manager(tmp_path, max_to_keep=2)
    for step in (1, 2, 3):
        checkpointing.save(manager, step, {"w": np.full((2,), step, np.float32)})
    manager.wait_until_finished()
    assert manager.all_steps() == [2, 3]
    target = {"w": jax.ShapeDtypeStruct((2,), np.float32, sharding=mesh_lib.replicated(
        mesh_lib.make_mesh(toy.mesh_config((-1, 1, 1)))))}
    np.testing.assert_array_equal(np.asarray(checkpointing.restore(manager, 3, target)["w"]), [3.0, 3.0])

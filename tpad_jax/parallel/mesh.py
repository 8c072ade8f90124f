"""Device mesh, batch sharding and sharded model initialisation without a host copy."""

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

# Mesh axes that split the batch dimension; the others (tensor, ...) replicate it.
BATCH_AXES = ("data", "fsdp")

Rules = Mapping[str, Any] | Sequence[tuple[str, Any]]


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces a single -1 in `shape` by the size that fills `num_devices`."""
    if sum(size == -1 for size in shape) > 1:
        raise ValueError(f"mesh.shape {tuple(shape)}: at most one axis may be -1")
    fixed = math.prod(size for size in shape if size != -1)
    if fixed <= 0 or num_devices % fixed:
        raise ValueError(
            f"mesh.shape {tuple(shape)}: the product of the fixed axes ({fixed}) does not divide the "
            f"{num_devices} available devices")
    resolved = tuple(num_devices // fixed if size == -1 else size for size in shape)
    if math.prod(resolved) != num_devices:
        raise ValueError(
            f"mesh.shape {tuple(shape)} uses {math.prod(resolved)} devices but {num_devices} are "
            "available; use -1 on one axis to fill them")
    return resolved


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the mesh of `mesh_config.shape` over `mesh_config.axes` with Auto axis types.

    Args:
      mesh_config: has `shape` (ints, one may be -1) and `axes` (names), e.g. `config.mesh`.
      devices: the devices to use; all of them by default.
    """
    devices = list(jax.devices() if devices is None else devices)
    axes = tuple(mesh_config.axes)
    if len(axes) != len(mesh_config.shape):
        raise ValueError(f"mesh.shape {tuple(mesh_config.shape)} and mesh.axes {axes} differ in length")
    shape = resolve_mesh_shape(mesh_config.shape, len(devices))
    return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def local_data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-axis mesh of this process's `devices` (default: all of them) alone: for work each process
    does on its own share (the frozen ViT's pass), which no collective should tie to other processes."""
    return Mesh(np.array(jax.local_devices() if devices is None else list(devices)), ("local",))


def local_devices_of(array):
    """This process's devices among those `array` lives on (a mesh's, or its one device): the ViT's pass
    splits its batches over a run's local devices, and stays on one device for a model on one."""
    sharding = getattr(array, "sharding", None)
    if sharding is None:
        return jax.local_devices()[:1]
    return sorted((d for d in sharding.device_set if d.process_index == jax.process_index()), key=lambda d: d.id)


def host_values(tree):
    """Every array of `tree` whole, as numpy on this process (gathered where other processes hold parts)."""
    def whole(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x)

    return jax.tree.map(whole, tree)


def held_rows(array, num_rows: int) -> np.ndarray:
    """The rows below `num_rows` of a table `array` that this process's devices hold, sorted (all of them
    for an array that is not split over a mesh's processes)."""
    sharding = getattr(array, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return np.arange(num_rows)
    held = np.zeros(num_rows, bool)
    for index in sharding.addressable_devices_indices_map(array.shape).values():
        held[index[0]] = True
    return np.flatnonzero(held)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes that split the leading (batch) dimension."""
    return tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names)


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch leaf: leading dim split over ("data", "fsdp"), the rest replicated."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def local_batch_shards(mesh: Mesh) -> int:
    """The blocks this process's devices split its slice of a batch into (`data_sharding`): one per
    distinct part of the leading axis they hold."""
    total = math.prod(mesh.shape[axis] for axis in batch_axes(mesh))
    held = data_sharding(mesh).addressable_devices_indices_map((total,)).values()
    return len({index[0].start for index in held})


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of a value every device holds whole (RNG keys, metrics)."""
    return NamedSharding(mesh, P())


def global_batch(local_tree, mesh: Mesh):
    """Turns this process's numpy batch (its slice of the global batch) into global jax.Arrays."""
    sharding = data_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                        local_tree)


def _rule_pairs(rules: Rules) -> tuple[tuple[str, Any], ...]:
    return tuple(rules.items()) if isinstance(rules, Mapping) else tuple(rules)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules):
    """Makes `mesh` and the logical axis `rules` current, for tracing code that names logical axes."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(_rule_pairs(rules)):
        yield


def sharded_init(make_model_fn: Callable[[], Any], mesh: Mesh, rules: Rules):
    """Creates the model with every array born on its target sharding (no host copy).

    Args:
      make_model_fn: builds the nnx object (model, or model and optimizer) from scratch.
      mesh: the device mesh.
      rules: logical axis name -> mesh axis (or None / tuple of axes).
    Returns:
      The nnx object, its variables sharded as their logical axes say.
    """
    with activate(mesh, rules):
        graphdef, abstract = nnx.split(nnx.eval_shape(make_model_fn))
        shardings = nnx.get_named_sharding(abstract, mesh)
        state = jax.jit(lambda: nnx.state(make_model_fn()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def abstract_state(make_fn: Callable[[], Any], mesh: Mesh, rules: Rules) -> tuple[nnx.GraphDef, nnx.State]:
    """Graphdef and ShapeDtypeStruct state with concrete-mesh shardings: a restore target for Orbax."""
    with nnx.logical_axis_rules(_rule_pairs(rules)):
        return nnx.get_abstract_model(make_fn, mesh)

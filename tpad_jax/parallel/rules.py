"""Logical axis rules: which mesh axes each logical parameter / activation axis is split over.

Parameters carry logical names (`embed`, `mlp`, `heads`, `kv`, `vocab`, `vis_embed`, `vis_mlp`, `patch`,
`lora_rank`, `layers`, `norm`) in their `out_sharding` metadata, the per-item tables `items` (their
row axis, which grows with the catalogue); activations are constrained with the
names `batch`, `length`, `embed`. A rule set maps every logical name to a mesh axis, a tuple of mesh axes
or None (replicated). Use a set with `nnx.logical_axis_rules(get_rules(name))` around model creation and
the jitted step, inside `jax.set_mesh(mesh)`.
"""

import jax
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.sharding import PartitionSpec

LOGICAL_AXES = (
    "batch", "length", "embed", "mlp", "heads", "kv", "vocab",
    "vis_embed", "vis_mlp", "patch", "lora_rank", "layers", "norm", "items",
)

RULE_SETS = {
    # FSDP over `fsdp` for the large weight axes, tensor parallelism over `tensor`, data over both
    # `data` and `fsdp` for activations (an FSDP shard also holds its own slice of the batch).
    "default": (
        ("batch", ("data", "fsdp")),
        ("length", None),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv", "tensor"),
        ("vocab", "tensor"),
        ("vis_embed", "fsdp"),
        ("vis_mlp", "tensor"),
        ("patch", None),
        ("lora_rank", None),
        ("layers", None),
        ("norm", None),
        # Item tables split by rows over the batch axes: per-device item data falls as 1 / devices.
        ("items", ("data", "fsdp")),
    ),
    # Pure data parallelism: weights replicated, batch split over every mesh axis.
    "data_parallel": (
        ("batch", ("data", "fsdp", "tensor")),
        ("items", ("data", "fsdp", "tensor")),
        *((name, None) for name in LOGICAL_AXES if name not in ("batch", "items")),
    ),
    # Everything replicated (tiny tests, single device).
    "replicated": tuple((name, None) for name in LOGICAL_AXES),
}


def get_rules(name):
    """Returns the rule set `name` (the value of `config.mesh.rules`) as a tuple of (logical, mesh) pairs."""
    if name not in RULE_SETS:
        raise ValueError(f"mesh.rules: unknown rule set {name!r}; known: {sorted(RULE_SETS)}")
    return RULE_SETS[name]


def _mesh_active():
    return not jax.sharding.get_abstract_mesh().empty


def partitioned(initializer, names):
    """Wraps a parameter initializer with logical axis names (one per dimension, None = replicated).

    The value is sharded at creation only inside a mesh; outside one the names stay as metadata for
    `nnx.get_partition_spec` (flax refuses eager sharding without a mesh).
    """
    return nnx.with_partitioning(initializer, tuple(names), eager_sharding=_mesh_active())


def param_metadata(names):
    """Variable metadata (for e.g. `nnx.LoRA(a_metadata=...)`) carrying logical axis names."""
    return {"out_sharding": tuple(names), "eager_sharding": _mesh_active()}


def logical_to_spec(names, rules):
    """Resolves logical names to a PartitionSpec; a mesh axis already used by an earlier dimension is dropped.

    Parameters and activations share names (`embed` splits weights over `fsdp`, while `batch` already
    uses `fsdp` for activations), so the first dimension that claims a mesh axis keeps it.
    """
    table = dict(rules)
    used, spec = set(), []
    for name in names:
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        free = tuple(a for a in axes if a not in used)
        used.update(free)
        spec.append(free[0] if len(free) == 1 else (free or None))
    return PartitionSpec(*spec)


def rows_multiple(names, rules, mesh_sizes) -> int:
    """How many shards the first axis of a variable with logical `names` is split into: its row count
    must be a multiple of this."""
    axes = logical_to_spec(names, rules)[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return int(np.prod([mesh_sizes[axis] for axis in axes])) if axes else 1


def constrain(x, names):
    """Constrains activation `x` to the sharding of its logical axis names (no-op without mesh or rules)."""
    rules = spmd.get_logical_axis_rules()
    if not _mesh_active() or not rules:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules))

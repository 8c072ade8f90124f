"""The best parameters of a downstream row: an .npz of its nnx.Param values keyed by path."""

import os

import jax
import numpy as np
from flax import nnx

from tpad_jax.data import raw
from tpad_jax.train import optim


def save_params(path: str, model) -> None:
    """Writes the model's nnx.Param values to an .npz keyed by "/"-joined path (byte-deterministic)."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    arrays = {optim.path_string(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(pure)}
    raw.write_npz(path + ".tmp", arrays)
    os.replace(path + ".tmp", path)


def load_params(path: str, model) -> None:
    """Sets the model's nnx.Param values from `save_params`' file; every path and shape must match."""
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    expected = {optim.path_string(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(pure)}
    problems = [f"missing {k}" for k in expected if k not in arrays]
    problems += [f"unexpected {k}" for k in arrays if k not in expected]
    problems += [f"{k}: shape {arrays[k].shape} != {shape}" for k, shape in expected.items()
                 if k in arrays and arrays[k].shape != shape]
    if problems:
        raise ValueError(f"{path}: parameters do not fit the model: {'; '.join(problems)}")
    nnx.replace_by_pure_dict(
        state, jax.tree_util.tree_map_with_path(lambda p, _: arrays[optim.path_string(p)], pure))
    nnx.update(model, state)

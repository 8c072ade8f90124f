"""A toy model, data pipeline and loss for the parallel/ and train/ tests and their worker scripts."""

import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from tpad_jax.parallel import mesh as mesh_lib
from tpad_jax.train import optim

IN_DIM, HIDDEN_DIM, OUT_DIM = 8, 16, 4
RULES = {"batch": ("data", "fsdp"), "embed": "fsdp", "mlp": "tensor"}
AXES = ("data", "fsdp", "tensor")


class ToyModel(nnx.Module):
    """MLP whose first layer carries LoRA; every parameter names its logical axes."""

    def __init__(self, *, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.body = nnx.LoRALinear(
            IN_DIM, HIDDEN_DIM, lora_rank=2, rngs=rngs,
            kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("mlp",)),
            # Non-zero B so that both LoRA factors get gradients from the first step.
            b_initializer=nnx.initializers.normal(0.1),
            a_metadata={"out_sharding": ("embed", None)}, b_metadata={"out_sharding": (None, "mlp")})
        self.head = nnx.Linear(HIDDEN_DIM, OUT_DIM, rngs=rngs,
                               kernel_init=nnx.with_partitioning(init, ("mlp", "embed")))

    def __call__(self, x):
        return self.head(nnx.relu(self.body(x)))


def make_model(seed: int = 0) -> ToyModel:
    return ToyModel(rngs=nnx.Rngs(seed))


def single_device_mesh():
    return mesh_lib.make_mesh(mesh_config((1, 1, 1)), devices=jax.devices()[:1])


def loss_fn(model, batch, rng):
    """MSE on inputs with RNG noise (so that the step RNG matters), plus an aux MAE metric."""
    noisy = batch["x"] + 0.01 * jax.random.normal(rng, batch["x"].shape)
    error = model(noisy) - batch["y"]
    return jnp.mean(error**2), {"mae": jnp.mean(jnp.abs(error))}


def make_tx(total_steps: int = 20):
    groups = {
        "heads": optim.GroupSchedule("head", peak_lr=3e-2, warmup_steps=2, total_steps=total_steps),
        "lora": optim.GroupSchedule(".*", peak_lr=1e-2, warmup_steps=2, total_steps=total_steps),
    }
    return optim.make_optimizer(groups, grad_clip=1.0)


TRAINABLE = nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, optim.path_matches("head")))


def examples(num: int = 64, seed: int = 0) -> np.ndarray:
    """Rows of [x (IN_DIM) | y (OUT_DIM)] with y a fixed nonlinear function of x."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num, IN_DIM)).astype(np.float32)
    y = np.tanh(x[:, :OUT_DIM] * 2.0 - x[:, OUT_DIM:])
    return np.concatenate([x, y], axis=1).astype(np.float32)


def split_row(row: np.ndarray) -> dict:
    """{"x", "y"} of one row or of a batch of rows."""
    return {"x": row[..., :IN_DIM], "y": row[..., IN_DIM:]}


def dataset(batch_size: int, *, process_index: int = 0, process_count: int = 1,
            delay_s: float = 0.0, poison_from: int | None = None):
    """Shuffled, repeated grain pipeline of this process's slice; a checkpointable iterator source.

    Args:
      batch_size: rows per (process-local) batch.
      process_index, process_count: which slice of the records this process reads.
      delay_s: sleep per record, to slow a run down enough to kill it between checkpoints.
      poison_from: batches from this (0-based) index on carry infinite inputs.
    """

    def slow(row):
        time.sleep(delay_s)
        return row

    ds = grain.MapDataset.source(examples()).seed(0).shuffle().repeat()
    ds = ds[process_index::process_count].map(slow).map(split_row).batch(batch_size, drop_remainder=True)
    if poison_from is not None:
        ds = ds.map_with_index(
            lambda index, b: {**b, "x": b["x"] * np.float32(np.inf)} if index >= poison_from else b)
    return ds.to_iter_dataset()


def train_config(**overrides) -> ml_collections.ConfigDict:
    base = dict(log_every=1, eval_every=4, checkpoint_every=3, max_to_keep=2)
    return ml_collections.ConfigDict({**base, **overrides})


def mesh_config(shape) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"shape": tuple(shape), "axes": AXES})


def trained_params(result) -> dict:
    """Host copy of the trained model's parameters as a flat {path: array} dict."""
    flat = nnx.to_flat_state(nnx.state(result.state.model, nnx.Param))
    # process_allgather: on several hosts no process addresses every shard of a global array.
    return {optim.path_string(path): np.asarray(multihost_utils.process_allgather(var[...], tiled=True))
            for path, var in flat}

"""Multi-host: cluster detection, and two JAX processes on 127.0.0.1 training and checkpointing together."""

import pathlib

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

import local_processes
import multihost_worker as worker
import toy_training as toy
from tpad_jax.parallel import distributed
from tpad_jax.parallel import mesh as mesh_lib
from tpad_jax.train import loop
from tpad_jax.train.metrics_log import read_metrics

WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "slurm"),
    ({"TPU_WORKER_HOSTNAMES": "t0"}, None),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1"}, "cloud_tpu"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "open_mpi"),
])
def test_detect_cluster(env, expected):
    assert distributed.detect_cluster(env) == expected


def test_maybe_initialize_is_a_noop_on_one_host():
    dist = ml_collections.ConfigDict({"coordinator": None, "num_processes": None, "process_id": None})
    assert not distributed.maybe_initialize(dist, env={})
    assert distributed.is_main_process() and jax.process_count() == 1


def _reference_run():
    """Losses and parameters of the same 3 steps in one process, on the concatenated global batches."""
    mesh = toy.single_device_mesh()
    make = lambda: loop.TrainState(toy.make_model(), toy.make_tx(), toy.TRAINABLE)  # noqa: E731
    graphdef, abstract = mesh_lib.abstract_state(make, mesh, toy.RULES)
    state = nnx.state(mesh_lib.sharded_init(make, mesh, toy.RULES))
    halves = [iter(toy.dataset(worker.LOCAL_BATCH, process_index=p, process_count=worker.NUM_PROCESSES))
              for p in range(worker.NUM_PROCESSES)]
    rng = jax.random.key_data(jax.random.key(0))
    losses = []
    with mesh_lib.activate(mesh, toy.RULES):
        step = loop.jit_train_step(loop.make_train_step(graphdef, toy.loss_fn, toy.TRAINABLE), abstract, mesh)
        for _ in range(worker.STEPS):
            parts = [next(half) for half in halves]
            batch = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
            state, metrics = step(state, mesh_lib.global_batch(batch, mesh), rng)
            losses.append(float(metrics["loss"]))
    result = loop.LoopResult(nnx.merge(graphdef, state), worker.STEPS, {}, train_step_compiles=1)
    return losses, toy.trained_params(result)


def test_two_processes_train_like_one_and_share_a_checkpoint(tmp_path):
    local_processes.run_workers(WORKER, worker.NUM_PROCESSES, tmp_path / "run", tmp_path / "params.npz",
                                timeout=180)

    losses, params = _reference_run()
    logged = [r["loss"] for r in read_metrics(tmp_path / "run")]
    loss_diff = float(np.max(np.abs(np.array(logged) - losses)))
    got = np.load(tmp_path / "params.npz")
    param_diff = max(float(np.max(np.abs(got[f"trained/{k}"] - v))) for k, v in params.items())
    print(f"2 processes vs 1: max |loss diff| over {len(losses)} steps = {loss_diff:.3g}, "
          f"max |param diff| = {param_diff:.3g}")
    assert len(logged) == worker.STEPS and loss_diff < 1e-6 and param_diff < 1e-6
    # Both processes wrote one checkpoint (each its part of the data state) and restored it.
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "3" / "data").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    for name in params:
        np.testing.assert_array_equal(got[f"restored/{name}"], got[f"trained/{name}"])


MSBR_WORKER = pathlib.Path(__file__).with_name("multihost_msbr_worker.py")


def test_two_processes_score_the_downstream_loss_of_whole_sessions_like_one(tmp_path):
    """2 processes x 2 devices list each batch's counted positions per device shard; the loss they
    compute equals the masked loss over every position of the same global batches in one process."""
    import multihost_msbr_worker as msbr_worker
    from tpad_jax.models import session_encoders

    local_processes.run_workers(MSBR_WORKER, msbr_worker.NUM_PROCESSES, tmp_path / "losses.npy", timeout=180)
    got = np.load(tmp_path / "losses.npy")

    # Reference: one process, one device, the whole [b, width] grid of each global batch, masked.
    source = msbr_worker.batches(0, 1, 1)
    table = source.table
    model = msbr_worker.make_model()
    expected = []
    for index in range(msbr_worker.NUM_BATCHES):
        width, rows = source.plan(0)[index]
        valid = rows >= 0
        rows = np.where(valid, rows, 0)
        items, mask = table.items[rows, :width], table.mask[rows, :width]
        counted = table.target_mask[rows, :width] & valid[:, None]
        vectors = model.position_vectors(items, mask).reshape(-1, msbr_worker.ENCODER.hidden_dim)
        expected.append(float(session_encoders.chunked_softmax_cross_entropy(
            vectors, model.item_table(), table.targets[rows, :width].reshape(-1), 8192,
            mask=counted.reshape(-1))))
    assert len(set(source.plan(0)[i][0] for i in range(msbr_worker.NUM_BATCHES))) == 2  # both widths
    np.testing.assert_allclose(got, expected, rtol=1e-5)

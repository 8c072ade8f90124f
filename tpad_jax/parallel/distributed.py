"""Multi-host start-up: `jax.distributed.initialize()` when (and only when) there is a cluster."""

import os
from collections.abc import Mapping

import jax


def _count(env: Mapping[str, str], name: str) -> int:
    value = env.get(name, "")
    return int(value) if value.isdigit() else 0


def detect_cluster(env: Mapping[str, str] = os.environ) -> str | None:
    """Names the multi-process cluster that JAX can auto-configure from `env`, or None on one host."""
    # Only clusters of more than one process count: a single-task SLURM job or a one-host TPU VM
    # needs no coordinator.
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "cloud_tpu"
    if "SLURM_JOB_ID" in env and _count(env, "SLURM_NTASKS") > 1:
        return "slurm"
    if _count(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return "open_mpi"
    return None


def maybe_initialize(dist_config, env: Mapping[str, str] = os.environ) -> bool:
    """Initialises jax.distributed for a detected cluster or an explicit coordinator; no-op otherwise.

    Args:
      dist_config: has `coordinator` ("host:port"), `num_processes`, `process_id` (each None to
        auto-detect), e.g. `config.dist`.
      env: the environment to detect a cluster in.
    Returns:
      True when this call initialised jax.distributed.
    """
    explicit = {
        "coordinator_address": dist_config.coordinator,
        "num_processes": dist_config.num_processes,
        "process_id": dist_config.process_id,
    }
    given = {key: value for key, value in explicit.items() if value is not None}
    if not given and detect_cluster(env) is None:
        return False
    if jax.distributed.is_initialized():
        return False
    jax.distributed.initialize(**given)
    return True


def is_main_process() -> bool:
    """True on the process that writes logs, metrics files and progress bars."""
    return jax.process_index() == 0

"""Orbax checkpoints of a stage: {state: model + optimizer + RNG as one item, data: grain iterator}.

Every process calls every function here; Orbax coordinates the writers. Saves are asynchronous: call
`manager.wait_until_finished()` before the process exits or before reading the directory.
"""

import pathlib

import grain
import jax
import orbax.checkpoint as ocp

STATE = "state"
DATA = "data"


def make_manager(directory: str | pathlib.Path, max_to_keep: int,
                 best_metric: str | None = None) -> ocp.CheckpointManager:
    """One manager per stage directory; keeps the newest `max_to_keep` checkpoints or, with
    `best_metric`, the `max_to_keep` whose saved metrics hold the highest `best_metric` (Orbax's
    `best_fn`; a tie keeps the later step)."""
    best = {} if best_metric is None else dict(best_fn=lambda metrics: metrics[best_metric], best_mode="max")
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=True, **best)
    # Handlers named up front, so that a fresh manager can read a checkpoint's metadata before restoring.
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options,
                                 item_handlers={STATE: ocp.StandardCheckpointHandler(),
                                                DATA: grain.checkpoint.CheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator=None, metrics=None) -> None:
    """Starts saving `state` (a pytree of jax.Arrays) and the data iterator's position at `step`;
    `metrics` ({name: float}) are what a `best_metric` manager ranks by."""
    items = {STATE: ocp.args.StandardSave(state)}
    if data_iterator is not None:
        items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)


def leaf_count(manager: ocp.CheckpointManager, step: int, key: str) -> int:
    """How many arrays the `key` entry of the state saved at `step` holds (read from its metadata)."""
    return len(jax.tree.leaves(manager.item_metadata(step)[STATE].tree[key]))


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iterator=None):
    """Restores the state onto the shardings of `abstract_state` and rewinds `data_iterator` in place.

    Args:
      manager: the stage's manager.
      step: the checkpoint to read (e.g. `manager.latest_step()`).
      abstract_state: pytree of jax.ShapeDtypeStruct with concrete NamedShardings
        (`parallel.mesh.abstract_state`).
      data_iterator: the grain iterator to set to the saved position, or None.
    Returns:
      The restored state pytree.
    """
    items = {STATE: ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
        items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    return manager.restore(step, args=ocp.args.Composite(**items))[STATE]

"""Orbax checkpoints of a stage: {state: model + optimizer + RNG as one item, data: grain iterator}.

Every process calls every function here; Orbax coordinates the writers. Saves are asynchronous: call
`manager.wait_until_finished()` before the process exits or before reading the directory.
"""

import pathlib

import grain
import orbax.checkpoint as ocp

STATE = "state"
DATA = "data"


def make_manager(directory: str | pathlib.Path, max_to_keep: int) -> ocp.CheckpointManager:
    """One manager per stage directory; keeps the newest `max_to_keep` checkpoints."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options,
                                 item_names=(STATE, DATA))


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator=None) -> None:
    """Starts saving `state` (a pytree of jax.Arrays) and the data iterator's position at `step`."""
    items = {STATE: ocp.args.StandardSave(state)}
    if data_iterator is not None:
        items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    manager.save(step, args=ocp.args.Composite(**items))


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

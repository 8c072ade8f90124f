"""The prepared data of a workdir for commands that must not change it (recommend, evaluate).

`prepared.load_or_prepare` prepares DIR/data/prepared/ again whenever the data settings differ, which
would pull the data from under every stage, export and downstream row of a finished run. `load` reads
the prepared files as they are, and refuses in one line when they are missing, were made with other
data settings, or changed since they were prepared.
"""

import json
import os

from tpad_jax import layout
from tpad_jax.cli import UserError
from tpad_jax.data import prepared


def has_prepared(workdir: str) -> bool:
    """Whether DIR/data/prepared/ holds a complete preparation (its fingerprint.txt is written last)."""
    return os.path.exists(os.path.join(layout.prepared_dir(workdir), "fingerprint.txt"))


def load(config, workdir: str) -> prepared.PreparedData:
    """PreparedData of DIR/data/prepared/ when it was made with `config`'s data settings; writes nothing.

    Raises:
      UserError when there is no prepared data, or it was made with other data settings (the message
      names the settings that differ), or its files changed since.
    """
    directory = layout.prepared_dir(workdir)
    if not has_prepared(workdir):
        raise UserError(f"{directory}: no prepared data; launch/train.py (or launch/prepare_data.py) "
                        "prepares it")
    with open(os.path.join(directory, "catalogue.json"), encoding="utf-8") as f:
        stored = _flat(json.load(f)["data_config"])
    wanted = _flat(json.loads(json.dumps(prepared.data_signature(config))))  # as catalogue.json stores it
    changed = [f"{key} {stored.get(key, '(absent)')} -> {wanted.get(key, '(absent)')}"
               for key in sorted(stored.keys() | wanted.keys()) if stored.get(key) != wanted.get(key)]
    if changed:
        raise UserError(f"{directory}: prepared with other data settings ({'; '.join(changed)}); this "
                        "command does not change the prepared data: pass the run's settings, or rerun "
                        "launch/train.py with these")
    with open(os.path.join(directory, "fingerprint.txt"), encoding="utf-8") as f:
        recorded = f.read().strip()
    if recorded != prepared.fingerprint(directory):
        raise UserError(f"{directory}: the prepared files changed after they were prepared (fingerprint "
                        "mismatch); launch/prepare_data.py prepares them again")
    return prepared.PreparedData(directory, prepared.raw_dir_for(config, workdir), workdir)


def _flat(signature: dict, prefix: str = "data.") -> dict:
    """{"data.synthetic.seed": 0, ...} of a nested data signature."""
    flat = {}
    for key, value in signature.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat

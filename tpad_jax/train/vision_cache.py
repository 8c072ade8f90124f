"""The frozen ViT's features of the catalogue's pictures: computed once per workdir, kept on disk in shards.

The ViT is frozen, so its features of an item never change within a run; they fill the model's vision
table at every fresh start and at every restore (checkpoints leave the tables out: `loop.checkpointed`).
Computing them is a pass over every picture (7 min at 1M items on 8 CPU devices), so it runs once and
later starts read it back:

    DIR/data/vision_features/<key>/record.json            what shaped them (data fingerprint, config)
    DIR/data/vision_features/<key>/<first>-<count>.rows.npy      the item rows of one shard (written last)
    DIR/data/vision_features/<key>/<first>-<count>.features.npy  their features [count, tokens, Dv]

<key> hashes the record, so other inputs (another seed's random ViT, another checkpoint, other data)
never read these. Each process writes the rows its devices hold; a reader takes its rows from whichever
shards hold them, so a run restarted on another mesh reads them too. A shard without its rows file is
unfinished and ignored.
"""

import hashlib
import json
import os
from collections.abc import Callable

import numpy as np

from tpad_jax import layout
from tpad_jax import workdir as workdir_lib
from tpad_jax.parallel import distributed

DIRECTORY = "vision_features"


def cache_dir(workdir: str, record: dict) -> str:
    """The directory of the features made under `record` (`provenance.make_record`)."""
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(workdir, layout.DATA, DIRECTORY, key)


def read(directory: str, rows: np.ndarray) -> np.ndarray | None:
    """The features of the item `rows` from the finished shards in `directory`; None unless they hold
    every one of `rows`."""
    if not os.path.isdir(directory):
        return None
    features, found = None, np.zeros(len(rows), bool)
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".rows.npy"):
            continue
        shard_rows = np.load(os.path.join(directory, name))
        shard = np.load(os.path.join(directory, name[:-len(".rows.npy")] + ".features.npy"), mmap_mode="r")
        at = np.searchsorted(shard_rows, rows)
        held = (at < len(shard_rows)) & (shard_rows[np.minimum(at, len(shard_rows) - 1)] == rows)
        if not held.any():
            continue
        if features is None:
            features = np.zeros((len(rows), *shard.shape[1:]), shard.dtype)
        features[held] = shard[at[held]]
        found |= held
    return features if features is not None and found.all() else None


def write(directory: str, rows: np.ndarray, features: np.ndarray, record: dict) -> None:
    """Saves the `features` of the item `rows` as one shard; its rows file, written last, finishes it."""
    os.makedirs(directory, exist_ok=True)
    if distributed.is_main_process():  # for a reader of the directory: the key alone decides reuse
        with workdir_lib.atomic_open(os.path.join(directory, "record.json")) as f:
            json.dump(record, f, indent=1, sort_keys=True)
    stem = os.path.join(directory, f"{int(rows[0]):09d}-{len(rows)}")
    for suffix, array in ((".features.npy", features), (".rows.npy", np.asarray(rows, np.int64))):
        with workdir_lib.atomic_open(stem + suffix, "wb") as f:
            np.save(f, array)


def load_or_compute(workdir: str, record: dict, rows: np.ndarray,
                    compute: Callable[[], np.ndarray]) -> np.ndarray:
    """The features of the sorted item `rows`: read back when a finished shard holds each, else
    `compute()`d and saved."""
    directory = cache_dir(workdir, record)
    features = read(directory, rows)
    if features is None:
        features = compute()
        write(directory, rows, features, record)
    return features

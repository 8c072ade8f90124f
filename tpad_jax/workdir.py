"""Workdir hygiene: one run at a time, artifacts replaced whole, stale directories moved aside.

`lock(workdir)` holds an exclusive `flock` on DIR/.lock for as long as its block runs; a second run in
the same workdir is refused with a `UserError`. The kernel drops the lock when its holder exits, however
it exits, so a killed run never blocks the next one. `atomic_open(path)` writes to a temporary file that
replaces `path` only once it is complete: a reader sees the old file or the new one, never a part.
`move_aside(workdir, name)` moves DIR/<name> to DIR/stale/<name>.<k> (the first free k).
"""

import contextlib
import fcntl
import json
import os

from tpad_jax import layout
from tpad_jax.cli import UserError

LOCK_FILE = ".lock"

_held = {}  # real path of a locked workdir -> [file object, depth]: one process may nest its own locks


@contextlib.contextmanager
def lock(workdir: str):
    """Holds DIR/.lock for the block; raises UserError when another process holds it.

    Re-entrant within a process (a run that evaluates locks its workdir twice), never across processes.
    """
    os.makedirs(workdir, exist_ok=True)
    key = os.path.realpath(workdir)
    if key in _held:
        _held[key][1] += 1
    else:
        f = open(os.path.join(workdir, LOCK_FILE), "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise UserError(f"{workdir}: another run is using this workdir ({holder}); wait for it to end "
                            "or choose another --workdir") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        _held[key] = [f, 1]
    try:
        yield
    finally:
        _held[key][1] -= 1
        if not _held[key][1]:
            _held.pop(key)[0].close()  # closing the file releases the lock


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs):
    """`open(path, mode)` whose file replaces `path` when the block ends without an exception."""
    temporary = f"{path}.tmp"
    try:
        with open(temporary, mode, **kwargs) as f:
            yield f
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def read_json(path: str):
    """The JSON value in `path`, or None when the file does not exist (yet)."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def move_aside(workdir: str, name: str) -> str:
    """Moves DIR/<name> to DIR/stale/<name>.<k> (the first k not taken); returns the new path."""
    k = 1
    while os.path.exists(target := os.path.join(layout.stale_dir(workdir), f"{name}.{k}")):
        k += 1
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(os.path.join(workdir, name), target)
    return target

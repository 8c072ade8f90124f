"""Training metrics: DIR/metrics.jsonl (one JSON object per line) and TensorBoard events in DIR/tb/."""

import json
import pathlib
import time
from collections.abc import Mapping

import numpy as np
import tensorboardX

from tpad_jax.data import raw
from tpad_jax.workdir import atomic_open

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"


class MetricsWriter:
    """Appends scalar metrics to the workdir's metrics.jsonl and TensorBoard; inert when disabled.

    A run that resumes from the checkpoint of step `resume_step` redoes the steps after it: their records
    from the attempt that was cut short are dropped from metrics.jsonl, and TensorBoard is told to purge
    its events from step `resume_step + 1` on, so curves never go back in time.
    """

    def __init__(self, workdir: str | pathlib.Path, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        workdir = pathlib.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        drop_records_after(workdir, resume_step)
        self._jsonl = open(workdir / METRICS_FILE, "a", encoding="utf-8")
        self._tb = tensorboardX.SummaryWriter(str(workdir / TENSORBOARD_DIR), purge_step=resume_step + 1)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Records `metrics` (scalars) at `step` with the current wall-clock time."""
        if not self.enabled:
            return
        scalars = {name: float(np.asarray(value)) for name, value in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n")
        self._jsonl.flush()  # a killed run keeps every line written before the kill
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, int(step))
        self._tb.flush()

    def close(self) -> None:
        """Flushes and closes both outputs."""
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def drop_records_after(workdir: str | pathlib.Path, step: int) -> None:
    """Rewrites the workdir's metrics.jsonl (atomically) without the records of steps after `step`.

    A line cut short by a kill (not JSON) goes too: only whole records of kept steps stay. Kept records
    are written back with `json.dumps`, which gives `MetricsWriter`'s lines back byte for byte.
    """
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.exists():
        return
    skipped = raw.SkipReport()
    records = [record for _, record in raw.json_lines(path, "skip", skipped)]
    kept = [record for record in records if (logged := _step_of(record)) is not None and logged <= step]
    if len(kept) != len(records) or skipped.counts:
        with atomic_open(str(path), encoding="utf-8") as f:
            f.writelines(json.dumps(record) + "\n" for record in kept)


def _step_of(record: dict) -> int | None:
    try:
        return int(record["step"])
    except (ValueError, KeyError, TypeError):
        return None


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
    """The records of the workdir's metrics.jsonl, in file order (a torn last line is left out)."""
    path = pathlib.Path(workdir) / METRICS_FILE
    return [record for _, record in raw.json_lines(path, "tolerate_torn_end")]

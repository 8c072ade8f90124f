"""Training metrics: DIR/metrics.jsonl (one JSON object per line) and TensorBoard events in DIR/tb/."""

import json
import pathlib
import time
from collections.abc import Mapping

import numpy as np
import tensorboardX

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

    A line cut short by a kill (not JSON) goes too: only whole records of kept steps stay.
    """
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = [line for line in lines if (logged := _step_of(line)) is not None and logged <= step]
    if len(kept) != len(lines):
        with atomic_open(str(path), encoding="utf-8") as f:
            f.writelines(line if line.endswith("\n") else line + "\n" for line in kept)


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
    """The records of the workdir's metrics.jsonl, in file order."""
    path = pathlib.Path(workdir) / METRICS_FILE
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not a JSON object: {error}") from error
    return records

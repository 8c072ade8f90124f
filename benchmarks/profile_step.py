"""Where a tower train step's time goes on the CPU: a `jax.profiler` trace, summarised per kind of op.

    python benchmarks/profile_step.py [--preset anchor|base|tiny] [--steps 5] [--top 15] \
        [--trace_dir DIR]   # run alone: timings need a quiet machine

Builds `bench_towers`' compiled LoRA step (one tower, batch 16 x 128 tokens), warms it up, traces
`--steps` steps and reads the trace back (`jax.profiler.ProfileData`). Printed, per step:
  - the wall time, and how busy each XLA worker thread was (the sum of the ops it ran);
  - that busy time split into matmul fusions (XNNPACK/YNNPACK `xnn_`/`ynn_` fusions and Eigen dots)
    and everything else (elementwise and reduction fusions, copies);
  - the `--top` ops by time.
The trace stays in `--trace_dir` for TensorBoard's profile plugin or Perfetto.
"""

import argparse
import collections
import glob
import os
import tempfile
import time

import jax
from jax.profiler import ProfileData

import bench_towers
from common import emit

# Trace events that wrap other events (the executor, thread-pool waits, Python frames), not ops.
WRAPPERS = ("ThunkExecutor", "SlinkyThreadPool", "$", "np.asarray", "Pjit")


def op_kind(name: str) -> str:
    if name.startswith(("ynn_", "xnn_")) or "dot" in name or "gemm" in name:
        return "matmul"
    return "other"


def op_times(trace_dir: str) -> dict:
    """{(thread, op name): total ns} of the ops on the XLA worker threads of the trace in `trace_dir`."""
    path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
    totals = collections.Counter()
    for plane in ProfileData.from_file(path).planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):
                continue
            for event in line.events:
                if not event.name.startswith(WRAPPERS):
                    totals[line.name, event.name] += event.duration_ns
    return totals


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="anchor", choices=sorted(bench_towers.PRESETS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--trace_dir", default=os.path.join(tempfile.gettempdir(), "tpad_profile_step"))
    args = parser.parse_args()

    cfg = bench_towers.tower_config(args.preset)
    steps = bench_towers.compile_steps(cfg, bench_towers.make_batch(cfg, 16, 64))
    for _ in range(3):
        float(steps.step())
    with jax.profiler.trace(args.trace_dir):
        start = time.perf_counter()
        for _ in range(args.steps):
            float(steps.step())
        wall_ms = (time.perf_counter() - start) / args.steps * 1e3

    totals = op_times(args.trace_dir)
    per_thread, per_kind, per_op = collections.Counter(), collections.Counter(), collections.Counter()
    for (thread, name), ns in totals.items():
        per_thread[thread] += ns / args.steps / 1e6
        per_kind[op_kind(name)] += ns / args.steps / 1e6
        per_op[name] += ns / args.steps / 1e6
    busy = sum(per_thread.values())
    emit(bench="profile_step", preset=args.preset, step_ms=round(wall_ms, 1), threads=len(per_thread),
         busy_fraction=round(busy / (wall_ms * max(len(per_thread), 1)), 3),
         matmul_fraction_of_busy=round(per_kind["matmul"] / busy, 3),
         other_fraction_of_busy=round(per_kind["other"] / busy, 3), trace_dir=args.trace_dir)
    for name, ms in per_op.most_common(args.top):
        print(f"{ms:8.2f} ms/step  {op_kind(name):6s}  {name}")


if __name__ == "__main__":
    main()

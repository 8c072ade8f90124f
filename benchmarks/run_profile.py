"""Runs the launcher in this process and sums what JAX reports it spent: compiling, caching, checkpointing.

    python benchmarks/run_profile.py --config configs/tpad_base.py --workdir DIR [any launch/train.py flag]

Takes exactly `launch/train.py`'s flags (it runs that script as `__main__`). At exit it prints the wall
time, the peak RSS, and for each duration event JAX emitted (`jax.monitoring`) its total seconds and
count, largest first; `/jax/core/compile/backend_compile_duration` is XLA's compile time. The default
run's speed table in RESULTS.md ("Default run speed") reads its compile seconds from here.
"""

import atexit
import collections
import pathlib
import resource
import runpy
import sys
import time

import jax.monitoring

LAUNCHER = pathlib.Path(__file__).resolve().parent.parent / "launch" / "train.py"

totals, counts = collections.Counter(), collections.Counter()


def _listen(event: str, seconds: float, **kwargs) -> None:
    totals[event] += seconds
    counts[event] += 1


def main():
    jax.monitoring.register_event_duration_secs_listener(_listen)
    start = time.perf_counter()

    @atexit.register
    def report():  # at exit: the launcher ends through absl, which exits the process
        print(f"PROFILE wall {time.perf_counter() - start:.1f} s; peak RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB", flush=True)
        for event, seconds in totals.most_common():
            print(f"PROFILE {event}: {seconds:.1f} s over {counts[event]}", flush=True)

    sys.argv = [str(LAUNCHER)] + sys.argv[1:]
    runpy.run_path(str(LAUNCHER), run_name="__main__")


if __name__ == "__main__":
    main()

"""Sustained matmul throughput of this machine with JAX: the denominator of model FLOP utilisation.

    python benchmarks/peak.py [--sizes 1024,2048,4096] [--reps 7] [--no-record]

Times a jitted `jnp.dot` of two random n x n matrices (2 n^3 flops) per size and dtype: median of
`--reps` calls after warm-up. fp32 is what the models here run in; bf16 is measured for information.
Other benchmarks compute MFU in-process with

    from peak import measure_peak      # benchmarks/ is the script's directory
    utilisation = achieved_gflops / measure_peak()
"""

import argparse

import jax
import jax.numpy as jnp

from common import append_results, emit, machine, median_time

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


def matmul_gflops(n: int, dtype=jnp.float32, reps: int = 5) -> tuple[float, float]:
    """(median seconds, GFLOP/s) of one jitted n x n @ n x n matmul in `dtype`."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), dtype)
    b = jax.random.normal(key_b, (n, n), dtype)
    dot = jax.jit(jnp.dot)
    seconds, _, _ = median_time(lambda: dot(a, b), steps=reps, warmup=2, sync=jax.block_until_ready)
    return seconds, 2 * n**3 / seconds / 1e9


def measure_peak(sizes=(1024, 2048), reps: int = 5) -> float:
    """Best sustained fp32 matmul GFLOP/s over `sizes` (about 2 s on 2 cores with the defaults).

    The best size, not the mean: MFU should be measured against what the hardware can actually do.
    """
    return max(matmul_gflops(n, jnp.float32, reps)[1] for n in sizes)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1024,2048,4096", help="comma-separated matrix sizes n")
    parser.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, of {sorted(DTYPES)}")
    parser.add_argument("--reps", type=int, default=7, help="timed calls per size after 2 warm-up calls")
    parser.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()

    rows = []
    for dtype_name in args.dtypes.split(","):
        for n in [int(s) for s in args.sizes.split(",")]:
            seconds, gflops = matmul_gflops(n, DTYPES[dtype_name], args.reps)
            rows.append(emit(benchmark="peak_matmul", backend=jax.default_backend(), dtype=dtype_name, n=n,
                             median_ms=1e3 * seconds, gflops=gflops, reps=args.reps))
    if not args.no_record:
        for row in rows:
            row["machine"] = machine()
        columns = ["backend", "dtype", "n", "median_ms", "gflops", "reps", "machine"]
        append_results(
            "Peak matmul throughput", columns, rows,
            note="Jitted `jnp.dot` of two n x n matrices, 2 n^3 flops, median of `reps` calls after 2 "
                 "warm-up calls (`benchmarks/peak.py`). The best fp32 row is the peak that "
                 "`peak.measure_peak()` gives other benchmarks for model FLOP utilisation.")


if __name__ == "__main__":
    main()

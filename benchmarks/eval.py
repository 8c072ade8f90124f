"""Full-ranking evaluation throughput (sessions/s) and peak memory at 10k, 100k and 1M items.

    python benchmarks/eval.py [--items 10000,100000,1000000] [--batch 256] [--item-chunk 4096] [--no-record]

Synthetic inputs: session vectors [S, 64] and an item table [N, 64] (standard normal, fp32), random
targets; every method ranks each target among all N items by dot-product score, `--batch` sessions at
a time:
  numpy        scores = s @ items.T, then np.argsort(-scores) per row and the target's position in
               it: the naive reference a user writes.
  jax_full     the project's path until now (export.retrieval_ranks): a score_fn returning [batch, N]
               scores, ranked by `metrics.rank_targets`.
  jax_chunked  `metrics.rank_by_dot` per batch: [batch, batch + item_chunk] scores at a time.
Each (method, N) is timed in a fresh subprocess (median of 3 calls after a first call that compiles)
whose peak RSS (VmHWM), minus that of a child that only imports and allocates the same inputs, is the
method's peak memory: earlier sizes cannot pollute it. S shrinks with N so that each call stays near a second.
`mfu` is the scoring matmul's 2 S N d flops per second over `peak.measure_peak()`.
"""

import argparse
import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import emit, median_time, record_rows
from peak import measure_peak
from tpad_jax.eval import metrics

DIM = 64
HEAD = 8  # sessions every method ranks, compared against the numpy reference
# Item scores per timed call: numpy's per-row argsort is ~20x slower than the chunked JAX path.
WORK = {"numpy": 2**24, "jax_full": 2**28, "jax_chunked": 2**28}


def make_inputs(num_items: int, num_sessions: int):
    """(sessions [S, d], items [N, d], targets [S]); the first sessions are the same for every S."""
    items = np.random.default_rng(0).standard_normal((num_items, DIM), dtype=np.float32)
    sessions = np.random.default_rng(1).standard_normal((num_sessions, DIM), dtype=np.float32)
    targets = np.random.default_rng(2).integers(0, num_items, num_sessions).astype(np.int32)
    return sessions, items, targets


def numpy_ranks(sessions, items, targets, batch_size: int, item_chunk: int) -> np.ndarray:
    """The naive reference: full scores, a full argsort per row, the target's position in it."""
    del item_chunk
    ranks = []
    for start in range(0, len(targets), batch_size):
        scores = sessions[start:start + batch_size] @ items.T
        for row, target in zip(scores, targets[start:start + batch_size]):
            ranks.append(np.flatnonzero(np.argsort(-row) == target)[0])
    return np.array(ranks, np.int32)


def jax_full_ranks(sessions, items, targets, batch_size: int, item_chunk: int) -> np.ndarray:
    """`metrics.rank_targets` over [batch, N] scores, as `export.retrieval_ranks` does it."""
    del item_chunk
    table = jnp.asarray(items)
    return metrics.rank_targets(lambda rows: jnp.asarray(sessions[rows]) @ table.T,
                                np.arange(len(targets)), targets, batch_size)


def jax_chunked_ranks(sessions, items, targets, batch_size: int, item_chunk: int) -> np.ndarray:
    """`metrics.rank_by_dot` batch by batch, as `msbr.rank_examples` ranks: memory bounded by
    batch x (batch + item_chunk) scores."""
    table = jax.device_put(items)
    return np.concatenate([
        np.asarray(metrics.rank_by_dot(sessions[start:start + batch_size], table,
                                       targets[start:start + batch_size], item_chunk))
        for start in range(0, len(targets), batch_size)])


METHODS = {"numpy": numpy_ranks, "jax_full": jax_full_ranks, "jax_chunked": jax_chunked_ranks}


def child(method: str, num_items: int, num_sessions: int, batch_size: int, item_chunk: int) -> dict:
    """One configuration in this process: median seconds, peak RSS and the first ranks.

    `method == "baseline"` only imports and allocates the inputs (the RSS every method starts from).
    """
    jax.devices()  # the runtime's own memory belongs to the baseline, not to a method
    sessions, items, targets = make_inputs(num_items, num_sessions)
    if method == "baseline":
        return {"maxrss_mb": peak_rss_mb()}
    rank = METHODS[method]
    seconds, first_s, _ = median_time(lambda: rank(sessions, items, targets, batch_size, item_chunk), steps=3,
                                      warmup=1)
    maxrss_mb = peak_rss_mb()
    head = rank(sessions[:HEAD], items, targets[:HEAD], batch_size, item_chunk)
    return {"seconds": seconds, "first_s": first_s, "maxrss_mb": maxrss_mb, "head": head.tolist()}


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM) in MiB.

    Not `getrusage(RUSAGE_SELF).ru_maxrss`: Linux carries the parent's high-water mark across fork and
    exec into it, so every child would report at least the parent's peak (the JAX parent's ~340 MiB
    hid whole methods).
    """
    with open("/proc/self/status", encoding="ascii") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def run_child(method: str, num_items: int, num_sessions: int, args) -> dict:
    """`child(...)` in a fresh interpreter, so its peak RSS is its own."""
    command = [sys.executable, __file__, "--child", method, "--items", str(num_items), "--sessions",
               str(num_sessions), "--batch", str(args.batch), "--item-chunk", str(args.item_chunk)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def session_count(method: str, num_items: int, batch_size: int) -> int:
    """Sessions per timed call: WORK item scores, whole batches when there is more than one."""
    sessions = max(HEAD, WORK[method] // num_items)
    return sessions - sessions % batch_size if sessions > batch_size else sessions


def measure(num_items: int, args, peak_gflops: float) -> list[dict]:
    """One emitted record per method at `num_items` items."""
    sessions = {method: session_count(method, num_items, args.batch) for method in METHODS}
    baseline_mb = run_child("baseline", num_items, max(sessions.values()), args)["maxrss_mb"]
    results = {method: run_child(method, num_items, sessions[method], args) for method in METHODS}
    numpy_rate = sessions["numpy"] / results["numpy"]["seconds"]
    records = []
    for method, result in results.items():
        rate = sessions[method] / result["seconds"]
        rank_diff = np.abs(np.subtract(result["head"], results["numpy"]["head"]))
        records.append(emit(
            benchmark="eval_full_ranking", backend=jax.default_backend(), method=method, items=num_items,
            sessions=sessions[method], batch=args.batch,
            item_chunk=args.item_chunk if method == "jax_chunked" else "",
            median_s=result["seconds"], first_call_s=result["first_s"],
            sessions_per_s=rate, speedup_vs_numpy=rate / numpy_rate,
            peak_extra_mb=result["maxrss_mb"] - baseline_mb, baseline_mb=baseline_mb,
            mfu=2 * rate * num_items * DIM / 1e9 / peak_gflops, max_rank_diff_vs_numpy=int(rank_diff.max())))
    return records


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", default="10000,100000,1000000", help="comma-separated catalogue sizes")
    parser.add_argument("--batch", type=int, default=256, help="sessions ranked per call")
    parser.add_argument("--item-chunk", type=int, default=4096, help="items scored per step (jax_chunked)")
    parser.add_argument("--sessions", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=("baseline",) + tuple(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, int(args.items), args.sessions, args.batch, args.item_chunk)))
        return

    start = time.perf_counter()
    peak_gflops = measure_peak()
    records = [r for n in args.items.split(",") for r in measure(int(n), args, peak_gflops)]
    seconds = time.perf_counter() - start
    print(f"# {seconds:.0f} s; fp32 matmul peak {peak_gflops:.0f} GFLOP/s", file=sys.stderr)
    if not args.no_record:
        record_rows(
            "Full-ranking evaluation",
            ["backend", "items", "method", "sessions", "batch", "item_chunk", "sessions_per_s",
             "speedup_vs_numpy", "peak_extra_mb", "mfu", "max_rank_diff_vs_numpy", "machine"], records,
            note="Rank each target among all N items by dot-product score, d = 64, fp32, synthetic inputs "
                 "(`benchmarks/eval.py`). `numpy`: s @ items.T then a full argsort per row; `jax_full`: "
                 "`metrics.rank_targets` over [batch, N] scores; `jax_chunked`: "
                 "`metrics.rank_by_dot` over [batch, batch + item_chunk] scores at a time. "
                 "sessions/s: median of 3 calls after a warm-up; peak_extra_mb: peak RSS (VmHWM) of a fresh "
                 "process minus that of one that only imports and allocates the inputs; mfu: scoring flops "
                 "(2 S N d) per second over the fp32 matmul peak of `benchmarks/peak.py`; "
                 "max_rank_diff_vs_numpy over the first 8 sessions.")


if __name__ == "__main__":
    main()

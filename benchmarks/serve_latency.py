"""Start-up time and per-session latency of the recommender (`tpad_jax.recommender.Recommender`).

    python benchmarks/serve_latency.py [--workdir RUN] [--model tpad] [--sessions 500] [--no-record]

`--workdir` names a finished run (read only); without it a tiny run with the `tpad` row is trained once
into <tempdir>/tpad_bench_serve_tiny (`runner.run` of `configs/tpad_base.py:tiny`, `eval.models=
("tpad",)`). Measured:

  process start -> first answer  `launch/recommend.py --sessions -` started, one session written to its
                                 standard input, until its first output line (interpreter, imports,
                                 loading, compiling, one answer)
  from_workdir                   `Recommender.from_workdir` in this process (JAX imported, nothing
                                 compiled yet): loading and the one compile
  per session                    `recommend(..., k=20)` after a warm-up call, over `--sessions` test
                                 prefixes of the run: one session per call, and 64 per call (per-session
                                 time = call time / 64), each with the scorer compiled for 64 sessions,
                                 and one session per call compiled for 1

Prints a Markdown table and appends its rows, with the 1-minute load average (other jobs on the machine
make every number slower), to RESULTS.md.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from common import ROOT, default_workdir, emit_row, record_rows
from tpad_jax import layout
from tpad_jax import recommender as recommender_lib
from tpad_jax.data import readonly

COLUMNS = ["run", "items", "measurement", "compiled batch", "sessions/call", "s", "median ms", "p95 ms",
           "ms/session", "load avg", "machine"]
NOTE = ("`python benchmarks/serve_latency.py [--workdir RUN]`: start-up in s (a new `launch/recommend.py "
        "--sessions -` process until its first answer; `Recommender.from_workdir` alone) and "
        "`recommend(k=20)` latency per call over the run's test prefixes after a warm-up call (ms/session = "
        "median / sessions per call). `load avg`: the machine's 1-minute load average when measured (2 "
        "cores; above 2, other jobs were running).")
BENCH_BATCH = 64


def tiny_run(workdir: str) -> str:
    """A finished tiny run with the `tpad` row in `workdir`, trained in a child process on first use."""
    if not os.path.exists(layout.best_params_file(workdir, "tpad")):
        code = ("import importlib.util, sys\n"
                f"spec = importlib.util.spec_from_file_location('c', {os.path.join(ROOT, 'configs', 'tpad_base.py')!r})\n"
                "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
                "config = module.get_config('tiny'); config.eval.models = ('tpad',)\n"
                "from tpad_jax import runner\n"
                f"runner.run(config, {workdir!r})\n")
        subprocess.run([sys.executable, "-c", code], check=True)
    return workdir


def first_answer_s(workdir: str, model: str, session: list) -> float:
    """Seconds from starting `launch/recommend.py --sessions -` to its first output line."""
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "launch" / "recommend.py"), f"--workdir={workdir}", f"--model={model}",
         "--sessions=-", "--top_k=20"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    process.stdin.write(json.dumps({"session_id": "first", "items": session}) + "\n")
    process.stdin.flush()
    line = process.stdout.readline()
    elapsed = time.perf_counter() - start
    process.stdin.close()
    process.wait()
    if not line.startswith("{") or process.returncode != 0:
        raise RuntimeError(f"launch/recommend.py answered {line!r} (exit {process.returncode})")
    return elapsed


def call_times_ms(recommender, sessions: list, per_call: int) -> np.ndarray:
    """Milliseconds of each `recommend(k=20)` call over `sessions`, `per_call` at a time, after a warm-up."""
    recommender.recommend(sessions[:per_call], k=20)
    times = []
    for start in range(0, len(sessions) - per_call + 1, per_call):
        clock = time.perf_counter()
        recommender.recommend(sessions[start:start + per_call], k=20)
        times.append(time.perf_counter() - clock)
    return 1e3 * np.asarray(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="a finished run (default: a tiny one, trained once)")
    parser.add_argument("--model", default=recommender_lib.DEFAULT_MODEL, help="the downstream row served")
    parser.add_argument("--sessions", type=int, default=500, help="test prefixes timed one per call")
    parser.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    workdir = args.workdir or tiny_run(default_workdir("serve_tiny"))
    run = os.path.basename(os.path.normpath(workdir))

    clock = time.perf_counter()
    recommender = recommender_lib.Recommender.from_workdir(workdir, args.model, batch_size=BENCH_BATCH)
    load_s = time.perf_counter() - clock
    data = readonly.load(recommender.config, workdir)
    prefixes, _ = data.examples("test")
    rng = np.random.default_rng(0)
    # Sessions for 64 per call: as many calls as the single-session measurement has sessions / 8.
    picks = rng.choice(len(prefixes), size=max(args.sessions, BENCH_BATCH * max(args.sessions // 8, 1)))
    sessions = [[data.item_ids[row] for row in prefixes[i]] for i in picks]
    first_s = first_answer_s(workdir, args.model, sessions[0])

    base = {"run": run, "items": recommender.num_items, "load avg": round(os.getloadavg()[0], 2)}
    rows = [dict(base, measurement="process start -> first answer", s=first_s),
            dict(base, measurement="from_workdir", s=load_s, **{"compiled batch": BENCH_BATCH})]
    single = recommender_lib.Recommender.from_workdir(workdir, args.model, batch_size=1)
    for compiled, per_call, served in ((BENCH_BATCH, 1, recommender), (BENCH_BATCH, BENCH_BATCH, recommender),
                                       (1, 1, single)):
        count = args.sessions if per_call == 1 else len(sessions)
        times = call_times_ms(served, sessions[:count], per_call)
        median = float(np.median(times))
        rows.append(dict(base, measurement="recommend per call", **{
            "compiled batch": compiled, "sessions/call": per_call, "median ms": median,
            "p95 ms": float(np.percentile(times, 95)), "ms/session": median / per_call}))
    rows = [emit_row("serve_latency", row) for row in rows]
    columns = [c for c in COLUMNS if c != "machine"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
    if not args.no_record:
        record_rows("Recommender start-up and latency (`benchmarks/serve_latency.py`)", COLUMNS, rows, note=NOTE)


def _cell(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()

"""Ranking a split by length bucket against ranking every prefix at the full width (issue 19 §7).

    python benchmarks/rank_buckets.py --workdir RUN [--config configs/tpad_base.py] [--preset base]
        [--steps 6] [--no-record]

RUN is a finished run (read only). For each of its trained neural rows, `scoring.rank_examples` ranks the
validation and test examples twice: with `msbr.length_buckets` (what validation and testing do) and with
no buckets (every prefix padded to the full width, as before). The ranks must be identical; the median
seconds of each, measured alternately over `--steps` calls, and their ratio are printed as a Markdown table
and appended to RESULTS.md with the 1-minute load average (other jobs slow both sides alike).
"""

import argparse
import os
import time

import numpy as np

from common import ROOT, emit_row, print_and_record
from train_step import load_config
from tpad_jax import layout, rows
from tpad_jax.data import readonly
from tpad_jax.downstream import scoring, serving, tables

COLUMNS = ["run", "row", "split", "examples", "full width s", "buckets s", "ratio", "same ranks", "load avg",
           "machine"]
SECTION = "Ranking by length bucket"
NOTE = ("`python benchmarks/rank_buckets.py --config configs/tpad_base.py --workdir RUN`: median seconds of "
        "`scoring.rank_examples` over a split with every prefix at the full width and with "
        "`msbr.length_buckets`, measured alternately, on a finished run's selected models.")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tpad_base.py"))
    parser.add_argument("--preset", default=None, help="the config file's argument (e.g. full)")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    config = load_config(args.config, args.preset)
    data = readonly.load(config, args.workdir)
    width, batch, buckets = tables.prefix_width(config), config.msbr.eval_batch_size, config.msbr.length_buckets
    results = []
    for name in rows.names(rows.neural()):
        if not os.path.exists(layout.best_params_file(args.workdir, name)):
            continue
        model = serving.load_selected(name, config, args.workdir, data)
        for split in ("valid", "test"):
            prefixes, targets = data.examples(split)
            ranks, seconds = {}, {(): [], buckets: []}
            for step in range(args.steps + 1):  # alternately; the first call of each compiles
                for chosen in seconds:
                    clock = time.perf_counter()
                    ranks[chosen] = scoring.rank_examples(model, prefixes, targets, width, batch, chosen)
                    if step:
                        seconds[chosen].append(time.perf_counter() - clock)
            full_s, bucket_s = (float(np.median(seconds[chosen])) for chosen in ((), buckets))
            full, bucketed = ranks[()], ranks[buckets]
            results.append(emit_row("rank_buckets", {
                "run": os.path.basename(os.path.normpath(args.workdir)), "row": name, "split": split,
                "examples": len(targets), "full width s": round(full_s, 3), "buckets s": round(bucket_s, 3),
                "ratio": round(full_s / bucket_s, 2), "same ranks": bool(np.array_equal(full, bucketed)),
                "load avg": round(os.getloadavg()[0], 2)}))
    print_and_record(SECTION, COLUMNS, results, NOTE, record=not args.no_record)


if __name__ == "__main__":
    main()

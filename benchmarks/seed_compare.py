"""One row of other whole-pipeline seed runs against a seed table: paired over the same test sessions.

    python benchmarks/seed_compare.py --base DIR --extra jsd:DIR_JSD [--row tpad] [--seeds 0,1,2] [--all_rows]

DIR and DIR_JSD are `launch/seeds.py --pipeline_seeds=...` workdirs of one catalogue and split (e.g.
DIR_JSD run with `--config.stage2.align_estimator=jsd`). Row `--row` of each `--extra` run joins the
base runs' rows as `<row>-<label>` and becomes the reference of the table: mean +- std over the seeds
and a paired bootstrap against every other row (`tpad_jax.eval.significance`), printed as Markdown.
`--all_rows`: every row of each `--extra` run joins as `<row>-<label>`, not only `--row` (e.g. the rows that
`benchmarks/cold_fusion.py --ranks_out` re-ranked with another fusion rule).
"""

import argparse
import os

import numpy as np

from tpad_jax import layout
from tpad_jax.eval import report, significance


def ranks_of(workdir: str, seed: int):
    return report.read_ranks(os.path.join(layout.results_dir(layout.pipeline_seed_dir(workdir, seed)),
                                          report.RANKS_FILE))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="a launch/seeds.py workdir (DIR/seed<s>/)")
    parser.add_argument("--extra", action="append", required=True, metavar="LABEL:DIR")
    parser.add_argument("--row", default="tpad")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--all_rows", action="store_true", help="every row of each --extra run joins the table")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    runs, cold = [], None
    for seed in seeds:
        ranks, cold = ranks_of(args.base, seed)
        for spec in args.extra:
            label, directory = spec.split(":", 1)
            extra, extra_cold = ranks_of(directory, seed)
            joined = list(extra) if args.all_rows else [args.row]
            if not np.array_equal(extra_cold, cold) or any(len(extra[name]) != len(cold) for name in joined):
                raise SystemExit(f"{directory}: seed {seed} ranked other test examples than {args.base}")
            for name in joined:
                ranks[f"{name}-{label}"] = extra[name]
        runs.append(ranks)
    reference = f"{args.row}-{args.extra[0].split(':', 1)[0]}"
    print(significance.markdown(significance.seed_table(runs, cold, reference=reference), seeds, reference))


if __name__ == "__main__":
    main()

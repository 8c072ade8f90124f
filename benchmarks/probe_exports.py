"""The retrieval probe of every export in a finished run, on validation and test (issue 15).

    python benchmarks/probe_exports.py --workdir RUN [--config configs/tpad_base.py] [--set KEY=VALUE ...]

RUN is read only; `--set` passes the run's own settings (e.g. `--set
data.raw_dir=../shared/data/amazon2014_beauty`). For each export RUN/export* (towers, MiniLM, attributes; `export.read_exports`),
items are ranked by the cosine of their vectors to the last click's (`export.retrieval_ranks`), and
HR@20 / MRR@20 / cold-target HR@20 are printed per split. The run's own probe (results/probe.json) has the
test split only; choices between stage-2 settings are made on the validation columns here.
"""

import argparse

from common import ROOT, apply_overrides
from train_step import load_config
from tpad_jax import export
from tpad_jax.data import readonly
from tpad_jax.eval import metrics


def probe_line(embeddings, data, split: str) -> str:
    ranks = export.retrieval_ranks(embeddings, data, split)
    _, targets = data.examples(split)
    every = metrics.metrics_from_ranks(ranks, (20,))
    cold = metrics.metrics_from_ranks(ranks[data.cold_mask(targets)], (20,))
    return f"{every[('HR', 20)]:.2f} / {every[('MRR', 20)]:.2f} / {cold[('HR', 20)]:.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tpad_base.py"))
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="the run's config overrides")
    args = parser.parse_args()
    config = apply_overrides(load_config(args.config, None), args.set)
    data = readonly.load(config, args.workdir)
    print("| export | valid HR@20 / MRR@20 / cold HR@20 | test HR@20 / MRR@20 / cold HR@20 |")
    print("|---|---|---|")
    for name, (embeddings, item_ids) in export.read_exports(args.workdir).items():
        if list(item_ids) != list(data.item_ids):
            print(f"| {name} | rows do not match the prepared catalogue: re-export | |")
            continue
        print(f"| {name} | {probe_line(embeddings, data, 'valid')} | {probe_line(embeddings, data, 'test')} |",
              flush=True)

if __name__ == "__main__":
    main()

"""One results table from runs on the same data split (e.g. the tiny-tower and SmolLM2 presets).

Usage:
  python launch/compare.py --runs=tiny:runs/ml100k_base,smollm2:runs/ml100k_smollm2 --out runs/ml100k_compare

A model that an earlier run reported with other values is renamed `<model>-<label>` (`tpad-smollm2`);
runs evaluated on different splits are refused. Writes OUT/results.csv, results.md, the bar charts and
runs.json, and prints results.md.
"""

import os

from absl import flags

from tpad_jax import cli
from tpad_jax.eval import compare, report


def main():
    rows = compare.write_comparison(compare.parse_runs(flags.FLAGS.runs), flags.FLAGS.out)
    print(report.markdown_tables(rows))
    print(f"written to {os.path.abspath(flags.FLAGS.out)}")


if __name__ == "__main__":
    flags.DEFINE_string("runs", None, "Comma list of label:workdir, at least two.")
    flags.DEFINE_string("out", None, "Directory for the merged report.")
    flags.mark_flags_as_required(["runs", "out"])
    cli.run(main)

"""Seed spread of downstream rows of a finished run (see tpad_jax/eval/seeds.py).

Usage:
  python launch/seeds.py --config configs/tpad_base.py --workdir runs/base \
      --models=tpad,transformer+raw,transformer --seeds=1,2

Writes DIR/results/seeds.md and seeds.csv and prints the table.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tpad_jax.data import prepared  # noqa: E402
from tpad_jax.eval import seeds  # noqa: E402


def main(argv):
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    names = [n.strip() for n in flags.FLAGS.models.split(",") if n.strip()]
    extra = [int(s) for s in flags.FLAGS.seeds.split(",") if s.strip()]
    data = prepared.load_or_prepare(config, workdir)
    spread = seeds.seed_spread(names, config, workdir, data, extra)
    print(seeds.write_spread(spread, [config.seed, *extra], os.path.join(workdir, "results")))


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Path to a config file (file.py:arg).", lock_config=True)
    flags.DEFINE_string("workdir", None, "A run directory whose downstream rows were trained.")
    flags.DEFINE_string("models", "tpad,transformer+raw,transformer", "Comma list of neural rows.")
    flags.DEFINE_string("seeds", "1,2", "Comma list of extra downstream seeds.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)

"""Ranks the test split with baselines and trained models; writes DIR/results/ (csv, md, png).

Usage:
  python launch/evaluate.py --config configs/tpad_base.py --workdir runs/base --models=baselines
  python launch/evaluate.py --config configs/tpad_base.py:tiny --workdir runs/tiny --models=pop,sknn,tpad

`--models`: a comma list of names; `baselines` expands to oracle,pop,s-pop,markov,sknn and `all` to
config.eval.models. Rows of models already in DIR/results/results.csv and not evaluated now are kept.
"""

from absl import flags
from ml_collections import config_flags

from tpad_jax import cli, workdir as workdir_lib
from tpad_jax.evaluate import run


def main():
    with workdir_lib.lock(flags.FLAGS.workdir):
        run(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.models)


if __name__ == "__main__":
    # Flags are defined here, not at import, so tests can import this module next to other launchers.
    config_flags.DEFINE_config_file("config", None, "Path to a config file (file.py:arg).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory (see docs/architecture.md section 1).")
    flags.DEFINE_string("models", "all", "Comma list of models; `baselines` and `all` are groups.")
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)

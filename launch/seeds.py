"""Seed spreads: whole-pipeline seeds with significance tests, or downstream seeds of a finished run.

Usage:
  # The whole pipeline (towers and downstream) once per seed in DIR/seed<s>/, then every row's mean +- std
  # and a paired bootstrap of tpad against it (tpad_jax/eval/significance.py). Each seed resumes.
  python launch/seeds.py --config configs/tpad_base.py --workdir runs/seeds --pipeline_seeds=0,1,2
  # ... and each seed's neural rows (or --models) trained again with 2 more downstream seeds (s + 1000,
  # s + 2000): the nested table adds a test over pipeline seeds (results/pipeline_downstream_seeds.md).
  python launch/seeds.py --config configs/tpad_base.py --workdir runs/seeds --pipeline_seeds=0,1,2 \
      --downstream_seeds=2 --models=tpad,transformer+stage1
  # Other downstream seeds on one run's exports (tpad_jax/seeds.py).
  python launch/seeds.py --config configs/tpad_base.py --workdir runs/base \
      --models=tpad,transformer+raw,transformer --seeds=1,2   # --models: default every neural row

Writes DIR/results/pipeline_seeds.md and .csv, or DIR/results/seeds.md and .csv, and prints the table.
"""

from absl import flags
from ml_collections import config_flags

from tpad_jax import cli, layout, runner, seeds, workdir as workdir_lib
from tpad_jax.data import readonly


def main():
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    names = [n.strip() for n in (flags.FLAGS.models or "").split(",") if n.strip()] or seeds.neural_rows(config)
    if flags.FLAGS.pipeline_seeds:
        pipeline_seeds = [int(s) for s in flags.FLAGS.pipeline_seeds.split(",") if s.strip()]
        print(runner.run_seeds(config, workdir, pipeline_seeds, flags.FLAGS.downstream_seeds, names))
        return
    extra = [int(s) for s in flags.FLAGS.seeds.split(",") if s.strip()]
    with workdir_lib.lock(workdir):
        data = readonly.load(config, workdir)  # a finished run's data: never prepared again here
        spread = seeds.seed_spread(names, config, workdir, data, extra)
    print(seeds.write_spread(spread, [config.seed, *extra], layout.results_dir(workdir)))


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Path to a config file (file.py:arg).", lock_config=True)
    flags.DEFINE_string("workdir", None, "A run directory whose downstream rows were trained.")
    flags.DEFINE_string("models", None, "Comma list of the neural rows other downstream seeds train "
                        "(default: every neural row of eval.models).")
    flags.DEFINE_integer("downstream_seeds", 0, "With --pipeline_seeds: more downstream seeds per pipeline seed.")
    flags.DEFINE_string("seeds", "1,2", "Comma list of extra downstream seeds.")
    flags.DEFINE_string("pipeline_seeds", None, "Comma list of whole-pipeline seeds (runs in DIR/seed<s>/).")
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)

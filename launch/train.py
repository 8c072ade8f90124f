"""Run TPAD end to end, or one stage of it, in a workdir.

  python launch/train.py --config configs/tpad_base.py --workdir runs/base            # everything
  python launch/train.py --config configs/tpad_base.py --workdir runs/base --stage=2  # one stage

Stages: prepare, 1 (knowledge acquisition), 2 (transition distillation), export, msbr (downstream
models + baselines + report), all. Each stage reads what earlier ones wrote in the workdir; running the
same command again resumes from the last checkpoint.
"""

from absl import flags
from ml_collections import config_flags

from tpad_jax import cli

config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:preset]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for data, checkpoints, exports and results.")
flags.DEFINE_enum("stage", "all", ["all", "prepare", "1", "2", "export", "msbr"], "Which stage to run.")
flags.mark_flags_as_required(["config", "workdir"])


def main():
    from tpad_jax import runner

    runner.run(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.stage)


if __name__ == "__main__":
    cli.run(main)

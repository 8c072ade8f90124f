"""Test set-up: 8 virtual CPU devices and parsed absl flags, before anything imports JAX."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # grain workers read absl flags


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(config, workdir) of one finished tiny run (stages, the `tpad` export and row, `pop`), trained
    once per session for every test that reads a finished run; a test that changes it works on a copy."""
    from configs import tpad_base  # noqa: PLC0415  (imports JAX: after the set-up above)
    from tpad_jax import runner  # noqa: PLC0415

    config = tpad_base.get_config("tiny")
    config.eval.models = ("pop", "tpad")
    workdir = str(tmp_path_factory.mktemp("tiny_run") / "run")
    runner.run(config, workdir)
    return config, workdir

"""Test set-up: 8 virtual CPU devices, before anything imports JAX. absl flags stay unparsed, as under
any entry point without absl.app: the code must work so (grain's workers read them)."""

import fcntl
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(config, workdir) of one finished tiny run (stages, the `tpad` export and row, `pop`), trained
    once for every test that reads a finished run; tests only read it, and one that changes a run works
    on a copy. Under pytest-xdist the test processes share one run: the first to get here trains it in
    their common temp dir while the others wait on a file lock."""
    from configs import tpad_base  # noqa: PLC0415  (imports JAX: after the set-up above)
    from tpad_jax import runner  # noqa: PLC0415

    config = tpad_base.get_config("tiny")
    config.eval.models = ("pop", "tpad")
    base = tmp_path_factory.getbasetemp()
    # xdist gives each process its own base temp dir inside the session's; without it, the session's own.
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    workdir, done = shared / "tiny_run" / "run", shared / "tiny_run" / "finished"
    done.parent.mkdir(exist_ok=True)
    with open(shared / "tiny_run" / "train.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            runner.run(config, str(workdir))
            done.touch()
    return config, str(workdir)

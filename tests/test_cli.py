"""The launchers' XLA settings (tpad_jax/cli.py): the CPU instruction-set cap and the compilation cache."""

import os
import platform
import subprocess
import sys

import pytest

from tpad_jax import cli


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 only")
def test_cpu_isa_is_capped_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv(cli.NATIVE_ISA_ENV, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    cli.pin_cpu_isa()
    assert cli.os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2 --xla_cpu_max_isa=AVX2"
    cli.pin_cpu_isa()  # idempotent
    assert cli.os.environ["XLA_FLAGS"].count("xla_cpu_max_isa") == 1
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=SSE4_2")
    cli.pin_cpu_isa()
    assert cli.os.environ["XLA_FLAGS"] == "--xla_cpu_max_isa=SSE4_2"
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv(cli.NATIVE_ISA_ENV, "1")
    cli.pin_cpu_isa()
    assert cli.os.environ["XLA_FLAGS"] == ""


_COMPILE_AND_COUNT_HITS = """
import jax, jax.numpy as jnp, jax.monitoring
from tpad_jax import cli
hits = []
jax.monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
cli.use_compilation_cache()
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # this program compiles in milliseconds
value = jax.jit(lambda x: jnp.cumsum(jnp.sin(x) @ jnp.cos(x).T, axis=0))(jnp.arange(64.0).reshape(8, 8))
print(len(hits), float(value.sum()))
"""


def _compile_in_new_process(home, **env):
    environment = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    environment.update(HOME=str(home), **env)
    done = subprocess.run([sys.executable, "-c", _COMPILE_AND_COUNT_HITS], env=environment, check=True,
                          capture_output=True, text=True)
    hits, value = done.stdout.split()
    return int(hits), value


def test_launchers_keep_compiled_programs_for_the_next_run(tmp_path):
    cache = tmp_path / ".cache" / "tpad_jax" / "xla"
    first = _compile_in_new_process(tmp_path)
    assert first[0] == 0 and any(cache.iterdir())
    second = _compile_in_new_process(tmp_path)
    assert second[0] >= 1 and second[1] == first[1]  # read back; the same program gives the same value
    # JAX's own variable wins; empty turns the cache off.
    elsewhere = tmp_path / "elsewhere"
    assert _compile_in_new_process(tmp_path, JAX_COMPILATION_CACHE_DIR=str(elsewhere))[0] == 0
    assert any(elsewhere.iterdir())
    bare = tmp_path / "bare"
    assert _compile_in_new_process(bare, JAX_COMPILATION_CACHE_DIR="")[0] == 0
    assert not (bare / ".cache").exists()

"""The launchers' XLA CPU instruction-set cap (tpad_jax/cli.py)."""

import platform

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

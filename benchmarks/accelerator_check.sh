#!/usr/bin/env bash
# The accelerator check, ready to run on a GPU or TPU host (see benchmarks/accelerator_check.py):
#   bash benchmarks/accelerator_check.sh            # from the repository root, in the project's venv
# Installs the accelerator build of the pinned jax when JAX sees no accelerator yet (CUDA 12 wheels on
# an NVIDIA host, libtpu on a TPU VM; a host without internet needs them in PIP_FIND_LINKS), then runs
# the check under an 8-minute limit. Without an accelerator it runs the CPU dry run instead.
set -euo pipefail
cd "$(dirname "$0")/.."
JAX_VERSION=$(sed -n 's/^jax==\([0-9.]*\).*/\1/p' requirements.txt)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  EXTRA="cuda12"
elif [ -e /dev/accel0 ] || [ -e /dev/vfio/0 ] || [ -n "${TPU_NAME:-}" ]; then
  EXTRA="tpu"
else
  EXTRA=""
fi
backend() { python3 -c "import jax; print(jax.default_backend())" 2>/dev/null || echo none; }
if [ -n "$EXTRA" ] && [ "$(backend)" = cpu ]; then
  echo "installing jax[$EXTRA]==$JAX_VERSION" >&2
  python3 -m pip install -q "jax[$EXTRA]==$JAX_VERSION"
fi
ARGS=("$@")
if [ "$(backend)" = cpu ]; then
  echo "no accelerator visible to JAX: CPU dry run" >&2
  ARGS+=(--dry_run)
fi
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" timeout 480 python3 benchmarks/accelerator_check.py "${ARGS[@]}"

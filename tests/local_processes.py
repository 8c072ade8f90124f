"""Runs a worker script as several JAX processes on 127.0.0.1 (the multi-host tests)."""

import os
import pathlib
import socket
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(worker: pathlib.Path, num_processes: int, *args: str, timeout: float = 240) -> None:
    """`python worker PROCESS_ID PORT *args` for every process id; asserts each exits 0 (else shows its
    output). The workers set their own device count: this process's XLA_FLAGS are not passed on."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    # Workers import test modules, which read configs/ from the repository root.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    processes = [subprocess.Popen([sys.executable, str(worker), str(process_id), str(port), *map(str, args)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
                 for process_id in range(num_processes)]
    try:
        outputs = [process.communicate(timeout=timeout)[0].decode() for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]

"""Start ``world`` ranks of ``dist_worker.py`` on 127.0.0.1, wait with a deadline, kill what is left."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

WORKER = Path(__file__).with_name("dist_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, world: int, out: Path, *, timeout: float) -> list[tuple[int | None, str]]:
    """``(exit code or None if it had to be killed, stderr tail)`` per rank; every process is reaped."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1",
        }
        err = open(out / f"stderr-{scenario}-{rank}.txt", "wb")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen([sys.executable, str(WORKER), scenario, str(out)], env=env, stderr=err), err))
    deadline = time.monotonic() + timeout
    results: list[tuple[int | None, str]] = []
    try:
        for proc, _ in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    finally:
        for proc, err in procs:
            code = proc.poll()
            if code is None:
                proc.kill()
                proc.wait()
            err.close()
            tail = Path(err.name).read_text(errors="replace")[-3000:]
            results.append((code, tail))
    return results

"""Start ``world`` ranks of a worker script on 127.0.0.1, wait with a deadline, kill what is left.

A worker is run as ``python WORKER SCENARIO OUT [ARGS...]`` and joins the gloo group with
:func:`init_rank`; it writes its results as JSON under ``OUT`` for the test to check.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path

WORKER = Path(__file__).with_name("dist_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    scenario: str,
    world: int,
    out: Path,
    *,
    timeout: float,
    worker: Path = WORKER,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    group: bool = True,
) -> list[tuple[int | None, str]]:
    """``(exit code or None if it had to be killed, stderr tail)`` per rank; every process is reaped.

    ``group=False`` starts the processes without the rank variables (no process group).
    """
    port = free_port()
    procs = []
    for rank in range(world):
        penv = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1"}
        if group:
            penv.update(
                RANK=str(rank),
                WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                GLOO_SOCKET_IFNAME="lo",
            )
        err = open(out / f"stderr-{scenario}-{rank}.txt", "wb")  # noqa: SIM115 - closed below
        cmd = [sys.executable, str(worker), scenario, str(out), *args]
        procs.append((subprocess.Popen(cmd, env=penv, stderr=err), err))
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


def init_rank(timeout: float = 60) -> int:
    """In a worker: join the gloo group :func:`launch` set up; returns this process's rank."""
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}",
        rank=rank,
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timedelta(seconds=timeout),
    )
    return rank

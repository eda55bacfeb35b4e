"""Subprocess program for tests/test_atomic.py: save the same path over and over, to be SIGKILLed.

Usage::

    python save_loop.py PATH NUMEL

The process imports torch once, commits version 0 at PATH, prints ``ready SECONDS`` (the time
one save took) and then serves commands on stdin, one a line:

* ``fork K`` -- fork a child that saves versions ``K*1_000_000 + 1, + 2, ...`` to PATH until it is
  killed; replies ``pid PID``. The test SIGKILLs that pid at a random moment.
* ``reap PID`` -- wait for the child; replies ``signal N`` or ``exit N``.

Forking from this process keeps each kill cheap (no torch import per child) while the saves still
run in a separate process that dies in the middle of whatever it was doing.
"""

from __future__ import annotations

import sys
import time

import torch
from forkserver import serve

import torchkeep as tk


def tree(version: int, numel: int) -> dict:
    """The tree for ``version``: every part is derived from the number, so a load can be checked."""
    base = torch.arange(numel, dtype=torch.int32)
    return {
        "version": version,
        "data": base + version,  # ~4 bytes per element
        "tail": torch.full((3, 5), float(version), dtype=torch.float64),
        "meta": {"label": f"v{version}", "pair": (version, -version)},
    }


def check(loaded: dict, numel: int) -> int:
    """Raise AssertionError unless ``loaded`` is exactly ``tree(v)`` for its own version v; returns v."""
    v = loaded["version"]
    assert isinstance(v, int), type(v)
    want = tree(v, numel)
    assert loaded["meta"] == want["meta"], loaded["meta"]
    assert torch.equal(loaded["tail"], want["tail"]), "tail differs"
    assert loaded["data"].dtype == torch.int32 and torch.equal(loaded["data"], want["data"]), "data differs"
    return v


def child(path: str, numel: int, first: int) -> None:
    version = first
    deadline = time.monotonic() + 60  # never outlive a broken test for long
    while time.monotonic() < deadline:
        tk.save(tree(version, numel), path)
        version += 1


def main() -> None:
    path, numel = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)  # no OpenMP team in this process: forked children stay safe
    t = time.perf_counter()
    tk.save(tree(0, numel), path)
    print(f"ready {time.perf_counter() - t:.6f}", flush=True)
    serve(lambda arg: child(path, numel, int(arg or 0) * 1_000_000 + 1))


if __name__ == "__main__":
    main()

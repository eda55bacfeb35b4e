"""Subprocess program for tests/test_incremental.py: an incremental CheckpointManager saving in a loop,
to be SIGKILLed.

Usage::

    python incremental_save_loop.py RUN_DIR NUMEL

Serves ``fork`` / ``reap PID`` on stdin (see forkserver.py). Each child opens the run
(``incremental=True, keep_last=3``), restores the newest checkpoint and saves the steps after it:
a frozen base that never changes (linked after the first save) and a head that encodes the step.
"""

from __future__ import annotations

import sys
import time

import torch
from forkserver import serve

import torchkeep as tk


class Model(torch.nn.Module):
    """A frozen ``base`` (fixed values) and a ``head`` derived from the step, checked exactly on restore."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.base = torch.nn.Parameter(torch.arange(numel, dtype=torch.float32) * 0.5, requires_grad=False)
        self.head = torch.nn.Parameter(torch.zeros(numel // 8))

    def set_step(self, step: int) -> None:
        with torch.no_grad():
            self.head.copy_(torch.arange(self.head.numel(), dtype=torch.float32) + step)

    def step_of(self) -> int:
        step = int(self.head[0].item())
        want = torch.arange(self.head.numel(), dtype=torch.float32) + step
        assert torch.equal(self.head.detach(), want), "head is not a complete saved state"
        base = torch.arange(self.base.numel(), dtype=torch.float32) * 0.5
        assert torch.equal(self.base.detach(), base), "base is not the saved base"
        return step


def child(run: str, numel: int) -> None:
    model = Model(numel)
    with tk.CheckpointManager(run, keep_last=3, incremental=True) as mgr:
        info = mgr.restore({"model": model})
        step = 0 if info is None else info.step + 1
        deadline = time.monotonic() + 30  # never outlive a broken test for long
        while time.monotonic() < deadline:
            model.set_step(step)
            mgr.save({"model": model}, step=step)
            step += 1


def main() -> None:
    run, numel = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)  # no OpenMP team in this process: forked children stay safe
    for name in ("CheckpointManager", "save", "restore", "load"):
        getattr(tk, name)
    import torchkeep.manager.incremental
    import torchkeep.manager.manager  # noqa: F401

    print("ready", flush=True)
    serve(lambda _arg: child(run, numel))


if __name__ == "__main__":
    main()

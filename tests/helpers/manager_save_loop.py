"""Subprocess program for tests/test_manager.py and tests/test_incremental.py: a CheckpointManager
saving in a loop, to be SIGKILLed.

Usage::

    python manager_save_loop.py RUN_DIR NUMEL [incremental]

Imports torch once, prints ``ready``, then serves commands on stdin, one a line:

* ``fork`` -- fork a child that opens a manager on RUN_DIR (keep_last=3), restores the newest
  checkpoint and saves steps after it until it is killed; replies ``pid PID``.
* ``reap PID`` -- wait for the child; replies ``signal N`` or ``exit N``.

With ``incremental`` the manager saves incremental checkpoints of :class:`FrozenBaseModel`: a
frozen base that never changes (linked after the first save) and a head that encodes the step.
"""

from __future__ import annotations

import sys
import time

import torch
from forkserver import serve

import torchkeep as tk


def _write_step(p: torch.Tensor, step: int) -> None:
    """Fill ``p`` with ``arange + step``: every element encodes the step."""
    with torch.no_grad():
        p.copy_(torch.arange(p.numel(), dtype=torch.float32) + step)


def _read_step(p: torch.Tensor, what: str) -> int:
    """The step ``p`` encodes; raises AssertionError if its elements do not all agree (a torn state)."""
    step = int(p[0].item())
    want = torch.arange(p.numel(), dtype=torch.float32) + step
    assert torch.equal(p.detach(), want), f"{what} is not a complete saved state"
    return step


class Model(torch.nn.Module):
    """Holds a parameter derived from the step, so a restore can be checked exactly."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(numel), requires_grad=False)

    def set_step(self, step: int) -> None:
        _write_step(self.w, step)

    def step_of(self) -> int:
        """The step the parameter encodes; raises AssertionError if it is not a consistent one."""
        return _read_step(self.w, "parameter")


class FrozenBaseModel(torch.nn.Module):
    """A frozen ``base`` (fixed values) and a ``head`` derived from the step, checked exactly on restore."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.base = torch.nn.Parameter(torch.arange(numel, dtype=torch.float32) * 0.5, requires_grad=False)
        self.head = torch.nn.Parameter(torch.zeros(numel // 8))

    def set_step(self, step: int) -> None:
        _write_step(self.head, step)

    def step_of(self) -> int:
        step = _read_step(self.head, "head")
        base = torch.arange(self.base.numel(), dtype=torch.float32) * 0.5
        assert torch.equal(self.base.detach(), base), "base is not the saved base"
        return step


def child(run: str, numel: int, incremental: bool) -> None:
    model = FrozenBaseModel(numel) if incremental else Model(numel)
    with tk.CheckpointManager(run, keep_last=3, incremental=incremental) as mgr:
        info = mgr.restore({"model": model})
        step = 0 if info is None else info.step + 1
        deadline = time.monotonic() + 30  # never outlive a broken test for long
        while time.monotonic() < deadline:
            model.set_step(step)
            mgr.save({"model": model}, step=step, metrics=None if incremental else {"loss": 1.0 / (step + 1)})
            step += 1


def main() -> None:
    run, numel, incremental = sys.argv[1], int(sys.argv[2]), sys.argv[3:] == ["incremental"]
    torch.set_num_threads(1)  # no OpenMP team in this process: forked children stay safe
    # torchkeep imports its verbs on first use: pay for them here, once, so that a forked child
    # starts saving at once instead of importing (the kills would all land during its imports)
    for name in ("CheckpointManager", "save", "restore", "load"):
        getattr(tk, name)
    import torchkeep.manager.incremental
    import torchkeep.storage.remote
    import torchkeep.writer  # noqa: F401

    print("ready", flush=True)
    serve(lambda _arg: child(run, numel, incremental))


if __name__ == "__main__":
    main()

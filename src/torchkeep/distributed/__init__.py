"""Sharded checkpoints for multi-process training, on ``torch.distributed.checkpoint`` (DCP).

:func:`save` and :func:`restore` are called on every rank. Each rank writes only its own
shards, in parallel; a checkpoint saved on N ranks restores on M; the directory becomes
visible only when complete, with a manifest of per-file checksums that :func:`restore`
verifies before DCP reads anything. Without a process group they work as a single rank.

The engine is imported on first use, so ``import torchkeep`` stays light.

Example:
    >>> import torch, tempfile, os, torchkeep.distributed as tkd
    >>> model = torch.nn.Linear(2, 2)
    >>> p = tkd.save({"model": model, "step": 10}, os.path.join(tempfile.mkdtemp(), "ck"))
    >>> tkd.restore(p, {"model": torch.nn.Linear(2, 2)})["step"]
    10
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["AsyncSave", "RankStateWarning", "is_torchkeep_dcp", "load_tree", "restore", "save", "wait"]

_LAZY = {
    "AsyncSave": "common",
    "RankStateWarning": "common",
    "is_torchkeep_dcp": "remote",
    "save": "checkpoint",
    "wait": "common",
    "restore": "resume",
    "load_tree": "resume",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"torchkeep.distributed.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'torchkeep.distributed' has no attribute {name!r}")

"""A run directory of checkpoints: naming, retention, best/latest, crash-safe saves and restores.

``CheckpointManager`` is imported on first use: ``torchkeep ls`` reads run manifests
(:mod:`torchkeep.manager.manifest`, :mod:`~torchkeep.manager.retention`) without torch.

Example:
    >>> import tempfile, torch, torchkeep as tk
    >>> with tk.CheckpointManager(tempfile.mkdtemp(), keep_last=1) as mgr:
    ...     mgr.save({"w": torch.ones(2)}, step=5).file
    'ckpt_000005.safetensors'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torchkeep.manager.manifest import CheckpointInfo
from torchkeep.manager.retention import AnyOf, BestN, EveryN, KeepAll, LatestN, Within

if TYPE_CHECKING:
    from torchkeep.manager.manager import CheckpointManager, CheckpointSkippedWarning

__all__ = [
    "AnyOf",
    "BestN",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointSkippedWarning",
    "EveryN",
    "KeepAll",
    "LatestN",
    "Within",
]


def __getattr__(name: str) -> Any:
    if name in ("CheckpointManager", "CheckpointSkippedWarning"):
        from torchkeep.manager import manager

        return getattr(manager, name)
    raise AttributeError(f"module 'torchkeep.manager' has no attribute {name!r}")

"""A run directory of checkpoints: naming, retention, best/latest, crash-safe saves and restores.

Example:
    >>> import tempfile, torch, torchkeep as tk
    >>> with tk.CheckpointManager(tempfile.mkdtemp(), keep_last=1) as mgr:
    ...     mgr.save({"w": torch.ones(2)}, step=5).file
    'ckpt_000005.safetensors'
"""

from torchkeep.manager.manager import CheckpointManager, CheckpointSkippedWarning
from torchkeep.manager.manifest import CheckpointInfo
from torchkeep.manager.retention import AnyOf, BestN, EveryN, KeepAll, LatestN, Within

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

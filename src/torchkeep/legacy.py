"""Legacy ``torch.save`` files: detected by content, read only through ``weights_only=True``."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from torchkeep.errors import CorruptCheckpointError, UnsafeCheckpointError

__all__ = ["is_legacy", "load_legacy"]

_ZIP_MAGIC = b"PK\x03\x04"


def is_legacy(head: bytes) -> bool:
    """True when the first bytes are a ``torch.save`` zip archive or a raw pickle (torch < 1.6)."""
    return head.startswith(_ZIP_MAGIC) or head[:1] == b"\x80"


def load_legacy(path: str | os.PathLike[str], *, map_location: Any = "cpu", trust_pickle: bool = False) -> Any:
    """Load a ``torch.save`` file.

    ``weights_only=True`` is always passed explicitly, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
    in the environment cannot turn it off. A refused safe load is never retried unsafely:
    only ``trust_pickle=True`` from the caller runs the full unpickler.

    Raises:
        UnsafeCheckpointError: the pickle needs more than tensors and plain containers.
        CorruptCheckpointError: the archive is damaged.
    """
    path = Path(path)
    try:
        if trust_pickle:
            return torch.load(path, map_location=map_location, weights_only=False)
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if trust_pickle:
            raise CorruptCheckpointError(path, f"the pickle could not be read ({_first_line(e)})") from None
        raise UnsafeCheckpointError(path, _first_line(e)) from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise CorruptCheckpointError(path, f"torch.load could not read it ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("WeightsUnpickler error:", "Unsupported global")):
            return line
    return text.splitlines()[0] if text else type(e).__name__

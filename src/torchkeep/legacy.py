"""Legacy ``torch.save`` files: detected by content, read only through ``weights_only=True``."""

from __future__ import annotations

import copy
import os
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from torchkeep.errors import CorruptCheckpointError, DeviceUnavailableError, UnsafeCheckpointError
from torchkeep.format.header import MAX_HEADER_SIZE

__all__ = ["is_legacy", "load_legacy"]

_ZIP_MAGIC = b"PK\x03\x04"


def is_legacy(head: bytes) -> bool:
    """True when the first 8 bytes are a ``torch.save`` zip archive or a raw pickle (torch < 1.6).

    A safetensors file also may start with ``0x80``: its first 8 bytes are the header length,
    and 1 in 256 lengths has ``0x80`` as low byte. So a raw pickle (``0x80``, protocol 2-5) only
    counts when those 8 bytes, read as a header length, exceed any header a reader accepts;
    a pickle's next opcodes make that number huge (torch's own magic number gives ~5e18).
    """
    if head.startswith(_ZIP_MAGIC):
        return True
    return (
        len(head) >= 8
        and head[0] == 0x80
        and 2 <= head[1] <= 5
        and int.from_bytes(head[:8], "little") > MAX_HEADER_SIZE
    )


def load_legacy(path: str | os.PathLike[str], *, map_location: Any = "cpu", trust_pickle: bool = False) -> Any:
    """Load a ``torch.save`` file.

    ``weights_only=True`` is always passed explicitly, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
    in the environment cannot turn it off. A refused safe load is never retried unsafely:
    only ``trust_pickle=True`` from the caller runs the full unpickler.

    Raises:
        UnsafeCheckpointError: the pickle needs more than tensors and plain containers.
        CorruptCheckpointError: the archive is damaged.
        DeviceUnavailableError: a storage was saved on a device this machine lacks and
            ``map_location`` keeps it there (e.g. ``None`` for a CUDA file without CUDA).
    """
    path = Path(path)
    requested = map_location
    fn = map_location if _is_tensor_fn(map_location) else None
    saved: dict[int, str] = {}
    if fn is not None:
        # torch calls map_location(storage, location); ours is fn(tensor, saved_device): load on
        # CPU, remember each storage's saved location, and apply fn to the tensors afterwards
        def keep_on_cpu(storage: Any, location: str) -> Any:
            saved[storage.data_ptr()] = location
            return storage

        map_location = keep_on_cpu
    try:
        # a file object, not the path: torch.load routes any path ending in ".safetensors" to
        # safetensors, but detection here is by content (a torch.save zip may have any name)
        with open(path, "rb") as fh:
            if trust_pickle:
                tree = torch.load(fh, map_location=map_location, weights_only=False)
            else:
                tree = torch.load(fh, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if trust_pickle:
            raise CorruptCheckpointError(path, f"the pickle could not be read ({_first_line(e)})") from None
        raise UnsafeCheckpointError(path, _first_line(e)) from None
    except (RuntimeError, EOFError, ValueError) as e:
        device = _missing_device(e)
        if device is not None:
            raise DeviceUnavailableError(path, device, requested, _first_line(e)) from None
        raise CorruptCheckpointError(path, f"torch.load could not read it ({_first_line(e)})") from None
    if fn is not None:
        tree = _apply(tree, lambda t: fn(t, saved.get(t.untyped_storage().data_ptr(), "cpu")))
    return tree


def _is_tensor_fn(map_location: Any) -> bool:
    return callable(map_location) and not isinstance(map_location, (str, torch.device, Mapping))


def _apply(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` on every tensor of nested dicts / lists / tuples (each tensor object once)."""
    done: dict[int, torch.Tensor] = {}

    def walk(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            if id(o) not in done:
                done[id(o)] = fn(o)
            return done[id(o)]
        if isinstance(o, dict):
            out = copy.copy(o)  # keeps the type and attributes such as a state dict's _metadata
            for k, v in o.items():
                out[k] = walk(v)
            return out
        if isinstance(o, list):
            return [walk(v) for v in o]
        if isinstance(o, tuple) and not hasattr(o, "_fields"):
            return tuple(walk(v) for v in o)
        return o

    return walk(obj)


_DEVICE_ERROR = re.compile(r"Attempting to deserialize object on (?:a )?(\w+) device(?: (\d+))?", re.IGNORECASE)


def _missing_device(e: BaseException) -> str | None:
    """The device named by torch's 'cannot deserialize on this device' error, if that is what ``e`` is."""
    m = _DEVICE_ERROR.search(str(e))
    if m is None:
        return None
    kind = m.group(1).lower()
    return f"{kind}:{m.group(2)}" if m.group(2) else kind


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        for marker in ("WeightsUnpickler error:", "Unsupported global"):
            at = line.find(marker)
            if at < 0:
                continue
            line = line[at:]
            # torch sometimes puts the reason on the next line ("WeightsUnpickler error: \n\nUnsupported operand 149")
            if line.endswith(":") and i + 1 < len(lines):
                return f"{line} {lines[i + 1]}"
            return line
    return lines[0] if lines else type(e).__name__

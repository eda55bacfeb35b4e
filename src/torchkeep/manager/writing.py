"""The manager's two ways to write a checkpoint: one file, or an incremental shard set (:mod:`.incremental`).

Both check the free space first, turn a full disk met while writing into
:class:`~torchkeep.errors.InsufficientSpaceError`, and read the new checkpoint back
(:mod:`.readback`) before the manager indexes it; a checkpoint that does not read back is removed.

Example:
    >>> import tempfile, torch
    >>> from torchkeep.storage import open_run
    >>> from torchkeep.tree import flatten
    >>> run = open_run(tempfile.mkdtemp())
    >>> info = CheckpointInfo("a.safetensors", run.path_of("a.safetensors"), 0)
    >>> write_file(run, flatten({"w": torch.ones(2)}), info, durable=False)[0] > 0
    True
"""

from __future__ import annotations

import contextlib
import errno
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torchkeep import writer
from torchkeep.errors import CorruptCheckpointError, InsufficientSpaceError
from torchkeep.manager import incremental, manifest, readback
from torchkeep.manager.manifest import CheckpointInfo
from torchkeep.storage.local import SPACE_ERRNOS
from torchkeep.storage.runs import RunStore
from torchkeep.tree import Flat

__all__ = ["check_space", "space_errors", "write_file", "write_shards"]

_HEADER_SLACK = 4096  # provenance metadata, JSON framing and 8-byte alignment
_PER_TENSOR = 256  # header bytes per tensor: name, dtype, shape, offsets, checksum


def check_space(store: RunStore, needed: int) -> None:
    """Raise :class:`~torchkeep.errors.InsufficientSpaceError` when ``needed`` bytes do not fit."""
    available = store.free_bytes()
    if 0 <= available < needed:
        raise InsufficientSpaceError(getattr(store, "directory", store.location), needed, available)


@contextlib.contextmanager
def space_errors(store: RunStore, needed: int | Callable[[], int]) -> Iterator[None]:
    """ENOSPC, EDQUOT or EFBIG while writing, raised as :class:`~torchkeep.errors.InsufficientSpaceError`
    (``needed``: the bytes the write needed, or a function that says it once known)."""
    try:
        yield
    except OSError as e:
        if e.errno in SPACE_ERRNOS:
            detail = f"{errno.errorcode.get(e.errno, e.errno)}: {e.strerror}"
            where = getattr(store, "directory", store.location)
            n = needed() if callable(needed) else needed
            raise InsufficientSpaceError(where, n, store.free_bytes(), err=e.errno, detail=detail) from e
        raise


def write_file(store: RunStore, flat: Flat, info: CheckpointInfo, *, durable: bool) -> tuple[int, bytes]:
    """``flat`` as the one file ``info.file``, read back; returns ``(size, header bytes)``."""
    needed = sum(t.numel() * t.element_size() for t in flat.tensors.values())
    needed += _HEADER_SLACK + _PER_TENSOR * len(flat.tensors) + len(json.dumps(flat.skeleton, default=str))
    check_space(store, needed)
    tensors, meta = writer.prepared(flat, {manifest.META_KEY: manifest.record_of(info)})
    with space_errors(store, needed):
        size, head = store.put(info.file, writer.Body(tensors, meta), durable=durable)
    try:  # what load would refuse never replaces the last checkpoint that loads
        readback.check(store, info.file, size, head)
    except CorruptCheckpointError:
        with contextlib.suppress(Exception):
            store.delete(info.file)
        raise
    return size, head


def write_shards(
    store: RunStore, flat: Flat, info: CheckpointInfo, entries: list[CheckpointInfo], *, durable: bool, frozen: Any
) -> tuple[int, bytes]:
    """``flat`` as the incremental checkpoint directory ``info.file``, linking what the newest incremental
    checkpoint of ``entries`` already holds; returns ``(logical size, index bytes)``."""
    root = Path(store.path_of(info.file)).parent
    prev = incremental.previous_set(root, entries)
    hint = set(frozen) if prev is None and frozen is not None else None
    needed = [0]

    def fits(n: int) -> None:
        needed[0] = n
        check_space(store, n)

    with space_errors(store, lambda: needed[0]):
        return incremental.write(root, flat, info, prev, durable=durable, frozen=hint, check_space=fits)

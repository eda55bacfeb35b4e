"""Open a safetensors/torchkeep file: its header, metadata and checksums, without torch.

:class:`HeaderFile` is what ``inspect``, ``verify``, ``ls`` and the kind detector need;
:class:`torchkeep.reader.Checkpoint` adds tensor reads on top of it.

Example:
    >>> import torch, torchkeep as tk, tempfile, os
    >>> p = tk.save({"w": torch.ones(4)}, os.path.join(tempfile.mkdtemp(), "c.safetensors"))
    >>> with HeaderFile(p) as hf:
    ...     hf.keys(), hf.is_torchkeep, hf.verify_all()
    (['w'], True, 16)
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from torchkeep.errors import (
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    KeyMismatchError,
    UnsupportedSourceError,
)
from torchkeep.format.header import HashState, Header, TensorSpec, parse_header
from torchkeep.format.meta import TREE_KEY, USER_KEY
from torchkeep.storage.files import open_regular
from torchkeep.storage.paths import as_path

__all__ = ["HeaderFile"]

_WINDOW = 64 << 20  # bytes mapped at once while verifying (one progress step)


class _Window:
    """A sliding read-only memory map over a file: hashes ``[pos, end)`` from the pages, no copy."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path
        self.map: mmap.mmap | None = None
        self.base = self.stop = 0

    def hash(self, h: Any, pos: int, end: int) -> int:
        """Feed ``h`` from ``pos`` up to ``end`` or the window's end; returns the bytes fed."""
        if not (self.base <= pos < self.stop):
            self.close()
            size = os.fstat(self.fd).st_size  # mapping past the end would fault on access, not fail
            if end > size:
                raise CorruptCheckpointError(self.path, f"the file ended at byte {size:,}, before {end:,} (truncated)")
            self.base = pos - pos % mmap.ALLOCATIONGRANULARITY
            self.stop = min(size, self.base + _WINDOW)
            self.map = mmap.mmap(self.fd, self.stop - self.base, access=mmap.ACCESS_READ, offset=self.base)
        assert self.map is not None  # set just above
        n = min(end, self.stop) - pos
        with memoryview(self.map) as view, view[pos - self.base : pos - self.base + n] as part:
            h.update(part)
        return n

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None
        self.base = self.stop = 0


class HeaderFile:
    """A read-only handle on one safetensors file: header, metadata, skeleton, checksum verification.

    Raises:
        CheckpointNotFoundError: no such file.
        UnsupportedSourceError: the path is a directory (open it with :func:`torchkeep.sources.open_source`).
        CorruptCheckpointError: not a readable safetensors header.
    """

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = True) -> None:
        self.path = as_path(path)
        self.verify = verify
        try:
            # a FIFO, socket or device is refused (typed) before it is read: a FIFO's open would block
            self._fd = -1 if os.path.isdir(self.path) else open_regular(self.path)
        except FileNotFoundError:
            raise CheckpointNotFoundError(self.path) from None
        except IsADirectoryError:
            raise UnsupportedSourceError(
                self.path,
                "directory",
                "a single-file read",
                "pass the directory to tk.load / tk.inspect, which open it whole",
            ) from None
        try:
            if os.path.isdir(self.path):  # O_RDONLY opens directories on Linux
                raise UnsupportedSourceError(
                    self.path,
                    "directory",
                    "a single-file read",
                    "pass the directory to tk.load / tk.inspect, which open it whole",
                )
            size = os.fstat(self._fd).st_size
            self.header: Header = parse_header(lambda off, n: os.pread(self._fd, n, off), size, str(self.path))
        except BaseException:
            self.close()
            raise

    # -- metadata ---------------------------------------------------------------------------
    @property
    def is_torchkeep(self) -> bool:
        """True for files written by torchkeep (False for plain safetensors files)."""
        return self.header.is_torchkeep

    @property
    def metadata(self) -> dict[str, Any]:
        """User metadata passed to ``save(..., metadata=...)`` ({} when none)."""
        raw = self.header.metadata.get(USER_KEY)
        return self._json(raw, USER_KEY) if raw else {}

    @property
    def has_tree(self) -> bool:
        """True when the file records a state tree (torchkeep files; not plain safetensors)."""
        return TREE_KEY in self.header.metadata

    @property
    def skeleton(self) -> Any:
        """The typed JSON skeleton of the state tree (``None`` for plain safetensors files)."""
        raw = self.header.metadata.get(TREE_KEY)
        return self._json(raw, TREE_KEY) if raw is not None else None

    def _json(self, raw: str, key: str) -> Any:
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            raise CorruptCheckpointError(self.path, f"metadata {key} is not valid JSON") from None

    def keys(self) -> list[str]:
        """Stored tensor names (tree paths joined with ``/``), in file order."""
        return list(self.header.tensors)

    def spec(self, key: str) -> TensorSpec:
        try:
            return self.header.tensors[key]
        except KeyError:
            raise KeyMismatchError(str(self.path), missing=[key], fix="pick a name from ck.keys()") from None

    def verify_all(self, progress: Callable[[int], None] | None = None) -> int:
        """Check every checksum without keeping the data; returns bytes checked.

        The data section is hashed through read-only memory maps of ``_WINDOW`` bytes, one after
        the other: no copy into fresh memory (a read would cost more than the hashing).
        ``progress(nbytes)`` is called after each chunk (for progress bars).
        """
        if self.header.checksums is None:
            return 0
        checked = 0
        window = _Window(self._fd, self.path)
        try:
            for s in sorted(self.header.tensors.values(), key=lambda s: s.start):
                h = HashState()
                pos = self.header.size + s.start
                end = self.header.size + s.end
                while pos < end:
                    n = window.hash(h, pos, end)
                    pos += n
                    if progress is not None:
                        progress(n)
                checked += s.nbytes
                if h.hexdigest() != self.header.checksums[s.name]:
                    raise ChecksumMismatchError(self.path, s.name, self.header.checksums[s.name], h.hexdigest())
        finally:
            window.close()
        return checked

    # -- lifecycle --------------------------------------------------------------------------
    def fileno(self) -> int:
        """The open file descriptor (valid until :meth:`close`)."""
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> HeaderFile:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, tensors={len(self.header.tensors)})"

"""Open a safetensors/torchkeep file, read tensors into fresh memory, and verify them.

:func:`torchkeep.open` returns a :class:`Checkpoint`; :func:`torchkeep.load` uses one
to read everything. Reading is ``preadv`` straight into each tensor's memory (no
staging copy), and checksums are computed in a second thread while the next batch
is read, so ``verify=True`` costs little.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from torchkeep.errors import CheckpointNotFoundError, ChecksumMismatchError, CorruptCheckpointError, KeyMismatchError
from torchkeep.format.dtypes import ST_TO_DTYPE
from torchkeep.format.header import HashState, Header, TensorSpec, parse_header
from torchkeep.hashing import Digests
from torchkeep.storage.local import buffer_of, read_into
from torchkeep.tree import SkeletonError, unflatten

__all__ = ["Checkpoint", "open_checkpoint"]

TREE_KEY = "torchkeep.tree"
USER_KEY = "torchkeep.user"
_BATCH = 64 << 20  # bytes read per preadv batch before its checksums are handed to the hash thread


_THREADS = 2
_PIECE = 32 << 20  # bytes per read job


def _jobs(specs: list[TensorSpec], bufs: list[memoryview], base: int) -> list[tuple[int, list[memoryview]]]:
    """``(file offset, buffers)`` read jobs of about ``_PIECE`` bytes over adjacent file ranges."""
    jobs: list[tuple[int, list[memoryview]]] = []
    cur: list[memoryview] = []
    cur_off = end = -1
    size = 0
    for s, b in zip(specs, bufs, strict=True):
        for i in range(0, b.nbytes, _PIECE):
            piece = b[i : i + _PIECE] if b.nbytes > _PIECE else b
            off = base + s.start + i
            if cur and (off != end or size + piece.nbytes > _PIECE):
                jobs.append((cur_off, cur))
                cur, size = [], 0
            if not cur:
                cur_off = off
            cur.append(piece)
            size += piece.nbytes
            end = off + piece.nbytes
    if cur:
        jobs.append((cur_off, cur))
    return jobs


def check_digests(
    path: Path,
    specs: list[TensorSpec],
    bufs: list[memoryview],
    sums: dict[str, str],
    pool: ThreadPoolExecutor,
    threads: int = _THREADS,
) -> None:
    """Raise :class:`ChecksumMismatchError` for the first tensor (in file order) whose bytes do not match."""
    for s, h in zip(specs, Digests(bufs, pool, threads=threads).result(), strict=True):
        if h != sums[s.name]:
            raise ChecksumMismatchError(path, s.name, sums[s.name], h)


class Checkpoint:
    """A read-only handle on a checkpoint file; reads only the tensors asked for.

    Example:
        >>> import torch, torchkeep as tk, tempfile, os
        >>> p = tk.save({"w": torch.ones(3), "b": torch.zeros(1)}, os.path.join(tempfile.mkdtemp(), "c.safetensors"))
        >>> with tk.open(p) as ck:
        ...     sorted(ck.keys()), ck.get("w").sum().item()
        (['b', 'w'], 3.0)
    """

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = True) -> None:
        self.path = Path(path)
        self.verify = verify
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise CheckpointNotFoundError(self.path) from None
        except IsADirectoryError:
            raise CorruptCheckpointError(self.path, "it is a directory, not a file") from None
        try:
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

    # -- tensors ----------------------------------------------------------------------------
    def get(self, key: str) -> torch.Tensor:
        """One tensor, read (and verified) on its own."""
        return self.read([key])[key]

    def read(self, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Read the named tensors (all when ``None``) into fresh CPU memory, verifying checksums.

        Reads run in two threads, so the page faults of the fresh memory are taken on both
        cores; checksums are computed afterwards in two threads, before anything is returned.
        """
        specs = (
            sorted((self.spec(k) for k in keys), key=lambda s: s.start)
            if keys is not None
            else list(self.header.tensors.values())
        )
        out = {s.name: torch.empty(s.shape, dtype=ST_TO_DTYPE[s.dtype]) for s in specs}
        bufs = [buffer_of(out[s.name]) for s in specs]
        jobs = _jobs(specs, bufs, self.header.size)
        with ThreadPoolExecutor(_THREADS) as pool:
            try:
                for _ in pool.map(lambda job: read_into(self._fd, job[0], job[1]), jobs):
                    pass
            except EOFError:
                raise CorruptCheckpointError(self.path, "the file ended before its last tensor (truncated)") from None
            sums = self.header.checksums
            if self.verify and sums is not None:
                check_digests(self.path, specs, bufs, sums, pool)
        return out

    def verify_all(self, progress: Any = None) -> int:
        """Check every checksum without keeping the data; returns bytes checked.

        ``progress(nbytes)`` is called after each chunk (for progress bars).
        """
        if self.header.checksums is None:
            return 0
        checked = 0
        for s in self.header.tensors.values():
            h = HashState()
            pos = s.start
            while pos < s.end:
                n = min(_BATCH, s.end - pos)
                chunk = os.pread(self._fd, n, self.header.size + pos)
                if not chunk:
                    raise CorruptCheckpointError(self.path, f"the file ended inside tensor {s.name!r} (truncated)")
                h.update(chunk)
                pos += len(chunk)
                if progress is not None:
                    progress(len(chunk))
            checked += s.nbytes
            if h.hexdigest() != self.header.checksums[s.name]:
                raise ChecksumMismatchError(self.path, s.name, self.header.checksums[s.name], h.hexdigest())
        return checked

    def tree(self, *, place: Any = None) -> Any:
        """The whole state tree (Stateful leaves as their state dicts)."""
        tensors = self.read()
        skeleton = self.skeleton
        if not self.has_tree:  # a plain safetensors file: a flat dict
            return tensors if place is None else {k: place(t, None) for k, t in tensors.items()}
        try:
            return unflatten(skeleton, tensors.__getitem__, place)
        except SkeletonError as e:
            raise CorruptCheckpointError(self.path, str(e)) from None

    # -- lifecycle --------------------------------------------------------------------------
    def fileno(self) -> int:
        """The open file descriptor (valid until :meth:`close`)."""
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, tensors={len(self.header.tensors)})"


def open_checkpoint(path: str | os.PathLike[str], *, verify: bool = True) -> Checkpoint:
    """Open a checkpoint for lazy reading: ``keys()``, ``get(key)``, ``metadata``, ``skeleton``.

    Example:
        >>> import torch, torchkeep as tk, tempfile, os
        >>> p = tk.save({"w": torch.ones(2)}, os.path.join(tempfile.mkdtemp(), "c.safetensors"))
        >>> with tk.open(p) as ck:
        ...     ck.get("w").tolist()
        [1.0, 1.0]
    """
    return Checkpoint(path, verify=verify)

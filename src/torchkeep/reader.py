"""Open a safetensors/torchkeep file, read tensors into fresh memory, and verify them.

:func:`torchkeep.open` returns a :class:`Checkpoint`; :func:`torchkeep.load` uses one
to read everything. Reading is ``preadv`` straight into each tensor's memory (no
staging copy), and checksums are computed in a second thread while the next batch
is read, so ``verify=True`` costs little.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from torchkeep.dtypes import ST_TO_DTYPE, buffer_of
from torchkeep.errors import ChecksumMismatchError, CorruptCheckpointError
from torchkeep.format.header import TensorSpec
from torchkeep.hashing import Digests
from torchkeep.headers import HeaderFile
from torchkeep.storage.local import read_into
from torchkeep.tree import SkeletonError, unflatten

__all__ = ["Checkpoint", "open_checkpoint"]


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


class Checkpoint(HeaderFile):
    """A read-only handle on a checkpoint file (a :class:`HeaderFile`); reads only the tensors asked for.

    Example:
        >>> import torch, torchkeep as tk, tempfile, os
        >>> p = tk.save({"w": torch.ones(3), "b": torch.zeros(1)}, os.path.join(tempfile.mkdtemp(), "c.safetensors"))
        >>> with tk.open(p) as ck:
        ...     sorted(ck.keys()), ck.get("w").sum().item()
        (['b', 'w'], 3.0)
    """

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

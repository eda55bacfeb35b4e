"""Checksums of many buffers, with threads only where they pay.

xxh3 drops the GIL, so large buffers hash in pool threads beside other work. Small
buffers are hashed inline: thousands of short calls in two threads would hand the GIL
back and forth after every call and run slower than one thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from torchkeep.format.header import digest

__all__ = ["Digests"]

LARGE = 1 << 20  # bytes from which a buffer is hashed in a pool thread


class Digests:
    """Start hashing ``bufs``: large buffers now in ``pool``, small ones in :meth:`result`.

    Args:
        bufs: the buffers, in the order their digests are wanted.
        pool: executor for the large buffers.
        threads: how many pool tasks to split the large buffers into (by bytes).

    Example:
        >>> from concurrent.futures import ThreadPoolExecutor
        >>> with ThreadPoolExecutor(1) as pool:
        ...     Digests([memoryview(b"abc")], pool).result() == [digest(b"abc")]
        True
    """

    def __init__(self, bufs: Sequence[memoryview], pool: ThreadPoolExecutor, threads: int = 1) -> None:
        self.bufs = bufs
        large = [i for i, b in enumerate(bufs) if b.nbytes >= LARGE]
        total = sum(bufs[i].nbytes for i in large) or 1
        groups: list[list[int]] = [[] for _ in range(threads)]
        acc = 0
        for i in large:
            groups[min(threads - 1, acc * threads // total)].append(i)
            acc += bufs[i].nbytes
        self._futures: list[tuple[list[int], Future[list[str]]]] = [
            (g, pool.submit(self._hash, g)) for g in groups if g
        ]

    def _hash(self, indices: list[int]) -> list[str]:
        return [digest(self.bufs[i]) for i in indices]

    def result(self) -> list[str]:
        """Every digest, in the order of ``bufs``."""
        out = [digest(b) if b.nbytes < LARGE else "" for b in self.bufs]
        for indices, fut in self._futures:
            for i, h in zip(indices, fut.result(), strict=True):
                out[i] = h
        return out

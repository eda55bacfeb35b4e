"""Checksums of many buffers, with threads only where they pay.

xxh3 drops the GIL, so large buffers hash in pool threads beside other work. Small
buffers are hashed inline: thousands of short calls in two threads would hand the GIL
back and forth after every call and run slower than one thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from torchkeep.format.header import digest

__all__ = ["Digests", "digests_of"]

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
        groups: list[list[int]] = [[] for _ in range(threads)]
        loads = [0] * threads
        # largest first, each to the least loaded task: a 300 MB and a 700 MB tensor hash in two
        # threads, not one (a buffer is never split: its digest is one stream)
        for i in sorted(large, key=lambda i: -bufs[i].nbytes):
            g = loads.index(min(loads))
            groups[g].append(i)
            loads[g] += bufs[i].nbytes
        for g in groups:
            g.sort()  # file order within a task
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


def digests_of(bufs: Sequence[memoryview], threads: int = 1) -> list[str]:
    """The checksums of ``bufs``, now, in their order; large buffers over ``threads`` pool threads.

    Example:
        >>> digests_of([memoryview(b"abc"), memoryview(b"")]) == [digest(b"abc"), digest(b"")]
        True
    """
    with ThreadPoolExecutor(threads) as pool:
        return Digests(bufs, pool, threads=threads).result()

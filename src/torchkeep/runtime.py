"""Process-level helpers shared by readers and writers (no torch)."""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["paused_gc", "read_threads"]

#: Threads of one read, at most: past this, page-cache reads are bound by memory bandwidth, not cores.
MAX_READ_THREADS = 8
_warned: set[str] = set()  # TORCHKEEP_READ_THREADS values already warned about


def read_threads() -> int:
    """How many threads a read (``preadv`` + checksum) of one checkpoint uses.

    The cores this process may run on (its CPU affinity, and its container's CPU limit where
    cgroup v2 sets one), shared with the other ranks that ``torchrun`` started on this machine
    (``LOCAL_WORLD_SIZE``), at least 2 (one thread reads while the other hashes) and at most
    :data:`MAX_READ_THREADS`. ``TORCHKEEP_READ_THREADS=N`` sets it (1 to 64).

    Example:
        >>> 2 <= read_threads() <= MAX_READ_THREADS or "TORCHKEEP_READ_THREADS" in os.environ
        True
    """
    forced = os.environ.get("TORCHKEEP_READ_THREADS", "").strip()
    if forced.isdigit() and 1 <= int(forced) <= 64:
        return int(forced)
    if forced and forced not in _warned:
        _warned.add(forced)
        warnings.warn(
            f"TORCHKEEP_READ_THREADS={forced!r} is not a count from 1 to 64; it is ignored (unset it, or set e.g. 4)",
            stacklevel=2,
        )
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 2
    quota = _cpu_quota()
    if quota is not None:  # a container's CPU limit (Kubernetes, docker --cpus): more threads would be throttled
        cores = min(cores, quota)
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    ranks = int(local) if local.isdigit() and int(local) > 0 else 1
    return max(2, min(MAX_READ_THREADS, cores // ranks))


CPU_MAX = "/sys/fs/cgroup/cpu.max"  # cgroup v2: "<quota> <period>" in microseconds, or "max <period>"


def _cpu_quota() -> int | None:
    """Whole CPUs this process's cgroup may use (rounded up), or ``None`` when it is not limited."""
    try:
        with open(CPU_MAX) as f:
            quota, period = f.read().split()[:2]
        if quota == "max":
            return None
        return max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        return None


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector: a tree of 20,000 tensors allocates enough small
    objects to trigger dozens of full collections, which cost more than the I/O.

    Example:
        >>> import gc
        >>> with paused_gc():
        ...     gc.isenabled()
        False
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()

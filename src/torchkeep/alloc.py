"""Fresh CPU memory for the tensors a copying read fills: ordinary tensors, optionally on huge pages.

A copy into fresh memory pays a page fault per 4 KiB page it first touches; on a 2 MiB
transparent huge page (THP) one fault covers 512 of them. :func:`empty` returns an ordinary,
separately freeable ``torch.empty`` tensor and, where huge pages are turned on, asks the kernel
(``madvise(MADV_HUGEPAGE)``) for them on the 2 MiB-aligned range inside a large tensor, before
anything touches it.

Huge pages are **off by default** (``TORCHKEEP_HUGE_PAGES=1`` turns them on). Measured on the
reference VM (2 vCPUs, THP ``madvise``), a 1 GiB load in a fresh process took 2.1-2.8 s with the
advice against 0.8-1.1 s without, and left 1.6 GiB of huge pages for 1 GiB of tensors: advice on
a range of the malloc heap spreads to the heap's later growth, so small allocations fault whole
huge pages too. They may pay on bare metal; measure before turning them on. Where the kernel
compacts memory directly on a huge-page fault (``defrag`` ``always`` or ``madvise``), a
fragmented machine can also stall one fault for a second or more, so the first fault of every
advised tensor is taken here and timed; one slower than :data:`STALL_S` turns the advice off for
the rest of the process. Only on Linux with THP available (``enabled`` not ``never``).

Example:
    >>> import torch
    >>> t = empty((3, 4), torch.float32)
    >>> t.shape, t.dtype, t.is_contiguous()
    (torch.Size([3, 4]), torch.float32, True)
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
from collections.abc import Sequence

import torch

__all__ = ["HUGE_FROM", "STALL_S", "advise", "empty", "huge_pages_on", "set_huge_pages"]

#: tensors of at least this many bytes get the huge-page advice
HUGE_FROM = 8 << 20
#: a first huge-page fault slower than this (seconds) means direct compaction: stop advising
STALL_S = 0.01

_HUGE = 2 << 20
_MADV_HUGEPAGE = 14
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"

_lock = threading.Lock()
_state: dict[str, object] = {}  # "on": bool, "madvise": the libc function


def _probe() -> bool:
    """Whether huge pages are asked for (``TORCHKEEP_HUGE_PAGES=1``) and can work here."""
    return os.environ.get("TORCHKEEP_HUGE_PAGES", "0") == "1" and _probe_kernel()


def _probe_kernel() -> bool:
    """Whether huge-page advice can work here (Linux, THP not ``never``, libc ``madvise`` found)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open(_THP) as f:
            if "[never]" in f.read():
                return False
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return False
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    _state["madvise"] = madvise
    return True


def huge_pages_on() -> bool:
    """Whether :func:`empty` advises huge pages (``TORCHKEEP_HUGE_PAGES=1``, probed once per process)."""
    with _lock:
        if "on" not in _state:
            _state["on"] = _probe()
        return bool(_state["on"])


def set_huge_pages(on: bool) -> None:
    """Turn the advice on or off for this process (on only where the kernel offers THP)."""
    with _lock:
        _state["on"] = False
        if on and "madvise" not in _state:
            _state["on"] = _probe_kernel()
        elif on:
            _state["on"] = True


def empty(shape: Sequence[int], dtype: torch.dtype, *, huge: bool = True) -> torch.Tensor:
    """A fresh contiguous CPU tensor (values undefined) to read into; large ones advised onto huge pages.

    ``huge=False`` leaves the advice for later (:func:`advise`), e.g. for a placeholder that
    may never be read.
    """
    t = torch.empty(size=shape, dtype=dtype)  # size=: measured 3.5 us a call against 4.9 for a positional tuple
    if huge:
        advise(t)
    return t


def advise(t: torch.Tensor) -> None:
    """Advise huge pages for a large fresh tensor from :func:`empty`, before anything touches it."""
    nbytes = t.numel() * t.element_size()
    if nbytes >= HUGE_FROM and t.device.type == "cpu" and huge_pages_on():
        _advise(t.data_ptr(), nbytes)


def _advise(ptr: int, nbytes: int) -> None:
    start = -(-ptr // _HUGE) * _HUGE
    stop = (ptr + nbytes) // _HUGE * _HUGE
    if stop <= start:
        return
    madvise = _state.get("madvise")
    if madvise is None or madvise(start, stop - start, _MADV_HUGEPAGE) != 0:  # type: ignore[operator]
        return
    # take the first huge-page fault here, timed: one that stalls on compaction ends the advice
    t0 = time.perf_counter()
    ctypes.memset(start, 0, 1)
    if time.perf_counter() - t0 > STALL_S:
        set_huge_pages(False)

"""Host staging between files and device memory, through two small page-locked buffers.

Reads (:class:`Stage`): each reading thread preads a chunk into a host buffer of its own,
hashes it there, and copies it to the device while it reads the next chunk into its second
buffer. A CUDA destination never gets pageable host memory of its own: no fresh allocation (no
page faults), no second pass, and the host-to-device copy of one chunk overlaps the read of the
next. The bytes hashed are the staging buffer's, the very bytes copied; a buffer is filled again
only after the copy out of it has finished (:meth:`Stage.take`).

Saves (:class:`Fetch`): device tensors come to the host a piece at a time, into the same kind
of buffers; the copy of the next piece runs while the last one is hashed and written. A save
of a model on the GPU so holds 2 x :data:`STAGE` bytes of page-locked memory, not a pinned host
copy of the whole model (which PyTorch's caching host allocator keeps cached after the save).

Example:
    >>> import torch
    >>> st = Stage(torch.device("cpu"))  # CPU stand-in: plain buffers, synchronous copies
    >>> buf, view = st.take()
    >>> view[:3] = b"abc"
    >>> dst = torch.zeros(3, dtype=torch.uint8)
    >>> st.send(dst, buf[:3]); st.sent(); st.drain()
    >>> bytes(dst.numpy())
    b'abc'
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from torchkeep.dtypes import buffer_of

__all__ = ["STAGE", "Fetch", "Segment", "Stage", "device_bytes", "pieces"]

STAGE = 4 << 20  # bytes per staging buffer (a run of small tensors must fit: reader._RUN)


def device_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat ``uint8`` tensor on its device (no copy).

    Example:
        >>> device_bytes(torch.ones(2, dtype=torch.float16)).tolist()
        [0, 60, 0, 60]
    """
    flat = t.detach().reshape(-1)
    return flat if flat.dtype is torch.uint8 else flat.view(torch.uint8)


class Stage:
    """Two host buffers of :data:`STAGE` bytes that one thread fills and copies to ``device``.

    On CUDA the buffers are page-locked, copies are asynchronous on the thread's current
    stream, and an event per buffer says when it may be filled again. Elsewhere the copies are
    synchronous and the buffers plain (the CPU stand-in the tests use).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda" and torch.cuda.is_available()
        self.device = device
        self.bufs = [torch.empty(STAGE, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(2)]
        self.views = [buffer_of(b) for b in self.bufs]
        # one event per buffer, re-recorded for each fill; blocking: a waiting thread sleeps
        # instead of spinning on a core the other readers need
        self.events = [torch.cuda.Event(blocking=True) for _ in range(2)] if self.cuda else []
        self.fences: list[Any] = [None, None]
        self.k = 1

    def take(self) -> tuple[torch.Tensor, memoryview]:
        """The other buffer, once the copies out of it have finished: ``(tensor, its bytes)``."""
        self.k ^= 1
        fence = self.fences[self.k]
        if fence is not None:
            fence.synchronize()
            self.fences[self.k] = None
        return self.bufs[self.k], self.views[self.k]

    def send(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy ``src`` (a slice of the buffer last taken) into ``dst`` (bytes on this stage's device)."""
        if dst.device != self.device:
            raise ValueError(f"a staging buffer for {self.device} cannot send to {dst.device}")
        dst.copy_(src, non_blocking=self.cuda)

    def sent(self) -> None:
        """Every copy out of the buffer last taken is issued: fence it."""
        if self.cuda:
            event = self.events[self.k]
            event.record(torch.cuda.current_stream(self.device))
            self.fences[self.k] = event

    def drain(self) -> None:
        """Wait for every copy issued: the device holds the bytes, both buffers are free.

        Both fences are waited for even if the first raises (a failed copy); then it re-raises.
        """
        fences = [f for f in self.fences if f is not None]
        self.fences = [None, None]
        _wait(fences)


Segment = tuple[int, int, int, int]  # (tensor index, offset in its bytes, bytes, offset in the buffer)


def pieces(sizes: list[int], piece: int | None = None) -> list[list[Segment]]:
    """The bytes of tensors of ``sizes``, back to back, cut into pieces of at most ``piece`` bytes
    (default :data:`STAGE`, a staging buffer).

    Small tensors share a piece; a large one spans several. Empty tensors are left out.

    Example:
        >>> pieces([3, 10, 0, 2], piece=8)
        [[(0, 0, 3, 0), (1, 0, 5, 3)], [(1, 5, 5, 0), (3, 0, 2, 5)]]
    """
    piece = piece or STAGE
    out: list[list[Segment]] = []
    cur: list[Segment] = []
    used = 0
    for i, n in enumerate(sizes):
        pos = 0
        while pos < n:
            take = min(n - pos, piece - used)
            cur.append((i, pos, take, used))
            pos += take
            used += take
            if used == piece:
                out.append(cur)
                cur, used = [], 0
    if cur:
        out.append(cur)
    return out


class Fetch:
    """Device tensors' bytes into host memory, a piece at a time, one piece ahead (for saves).

    On CUDA the two buffers are page-locked, the copies asynchronous (each on its source
    device's current stream) and waited for with blocking events. Elsewhere the buffers are
    plain and the copies synchronous (the CPU stand-in the tests use).

    Example:
        >>> srcs = [torch.arange(3, dtype=torch.uint8), torch.arange(5, dtype=torch.uint8)]
        >>> plan = pieces([3, 5], piece=4)
        >>> fetched = Fetch(torch.device("cpu")).run(srcs, plan, device_bytes)
        >>> [list(view[: sum(n for _, _, n, _ in p)]) for p, view in zip(plan, fetched)]
        [[0, 1, 2, 0], [1, 2, 3, 4]]
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda" and torch.cuda.is_available()
        self.bufs = [torch.empty(STAGE, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(2)]
        self.views = [buffer_of(b) for b in self.bufs]

    def run(
        self, srcs: list[torch.Tensor], plan: list[list[Segment]], flat: Callable[[torch.Tensor], torch.Tensor]
    ) -> Iterator[memoryview]:
        """For each piece of ``plan`` (over ``srcs``, device tensors of ``flat(t).numel()`` bytes), the
        buffer holding its bytes once they have all landed. Meanwhile the next piece is being
        copied into the other buffer, so a view is good until the next one is asked for.

        ``flat(t)``: ``t``'s bytes as a flat ``uint8`` tensor on its device, made when its first
        piece is copied and dropped after its last (a non-contiguous tensor's contiguous copy so
        lives for its own pieces only, on the stream its copies run on). Work already queued on
        the sources' devices, on any stream, finishes first.
        """
        if self.cuda:
            for dev in {t.device for t in srcs}:
                torch.cuda.synchronize(dev)
        fences: list[list[Any]] = [[], []]
        live: dict[int, torch.Tensor] = {}  # flat bytes of the tensors the current piece reaches

        def issue(j: int) -> None:
            buf = self.bufs[j % 2]
            devices: set[torch.device] = set()
            try:
                for i, lo, n, at in plan[j]:
                    src = live.get(i)
                    if src is None:
                        src = live[i] = flat(srcs[i])
                    buf[at : at + n].copy_(src[lo : lo + n], non_blocking=self.cuda)
                    devices.add(src.device)
                    if lo + n == src.numel():
                        del live[i]
            finally:  # fence what was issued, also when a copy failed part of the way through
                if self.cuda:
                    events = []
                    for dev in devices:
                        ev = torch.cuda.Event(blocking=True)  # a waiting thread sleeps, it does not spin
                        ev.record(torch.cuda.current_stream(dev))
                        events.append(ev)
                    fences[j % 2] = events

        try:
            if plan:
                issue(0)
            for j in range(len(plan)):
                if j + 1 < len(plan):
                    issue(j + 1)  # into the buffer the caller finished with when it asked for this one
                events, fences[j % 2] = fences[j % 2], []
                _wait(events)
                yield self.views[j % 2]
        finally:  # stopped early (an error): copies still in flight must land before the buffers go
            events = fences[0] + fences[1]
            fences[0], fences[1] = [], []
            _wait(events)


def _wait(events: list[Any]) -> None:
    """Wait for every event, even if one raises (a failed copy); then raise the first error."""
    error: BaseException | None = None
    for ev in events:
        try:
            ev.synchronize()
        except BaseException as e:
            error = error or e
    if error is not None:
        raise error

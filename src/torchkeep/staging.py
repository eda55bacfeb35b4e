"""Host staging for reads into device memory: each reading thread preads a chunk into a host
buffer of its own (page-locked for CUDA), hashes it there, and copies it to the device while
it reads the next chunk into its second buffer.

A CUDA destination never gets pageable host memory of its own: no fresh allocation (no page
faults), no second pass, and the host-to-device copy of one chunk overlaps the read of the
next. The bytes hashed are the staging buffer's, the very bytes copied; a buffer is filled again
only after the copy out of it has finished (:meth:`Stage.take`).

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

from typing import Any

import torch

from torchkeep.dtypes import buffer_of

__all__ = ["STAGE", "Stage", "device_bytes"]

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
        error: BaseException | None = None
        for i, fence in enumerate(self.fences):
            if fence is not None:
                self.fences[i] = None
                try:
                    fence.synchronize()
                except BaseException as e:
                    error = error or e
        if error is not None:
            raise error

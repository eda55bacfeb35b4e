"""Asynchronous saves: take a consistent snapshot now, write it in a background thread.

:class:`AsyncWriter` is what ``CheckpointManager(async_save=True)`` uses; it also works on
its own with :func:`torchkeep.writer.save_flat`. ``submit`` returns once every tensor of the
tree has been copied into host buffers (pinned when CUDA is present), which are reused
from one save to the next; the training loop may then change its parameters freely. At most
one write is in flight: ``submit`` first waits for the previous one (whose buffers it
reuses). An exception in the background is raised, as itself, by the next ``submit``,
``wait`` or ``close``.

Example:
    >>> import torch, tempfile, os
    >>> from torchkeep.writer import save_flat
    >>> model = torch.nn.Linear(2, 2)
    >>> path = os.path.join(tempfile.mkdtemp(), "c.safetensors")
    >>> with AsyncWriter() as writer:
    ...     writer.submit({"model": model}, lambda flat: save_flat(flat, path))
    ...     with torch.no_grad():
    ...         _ = model.weight.add_(1.0)   # does not change what is written
    >>> import torchkeep as tk
    >>> torch.equal(tk.load(path)["model"]["weight"] + 1.0, model.weight.detach())
    True
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch

from torchkeep.tree import Flat, flatten
from torchkeep.writer import resolved

__all__ = ["AsyncWriter", "Snapshotter"]


class Snapshotter:
    """Copies a tree's tensors into host buffers kept from one snapshot to the next."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, obj: Any) -> Flat:
        """Flatten ``obj`` (calling ``state_dict()`` on Stateful leaves now) and copy its tensors."""
        flat = flatten(obj)
        copies: dict[str, torch.Tensor] = {}
        devices: set[torch.device] = set()
        for key, t in flat.tensors.items():
            src = resolved(t)
            buf = self._buffers.get(key)
            if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                pinned = src.is_cuda and torch.cuda.is_available()
                buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=pinned)
                self._buffers[key] = buf
            buf.copy_(src, non_blocking=src.is_cuda)
            if src.is_cuda:
                devices.add(src.device)
            copies[key] = buf
        for key in set(self._buffers) - set(copies):  # keys gone from the tree: free their buffers
            del self._buffers[key]
        for dev in devices:  # the snapshot is complete before submit returns; each copy ran on
            torch.cuda.synchronize(dev)  # its source device's stream, so every device is waited for
        return Flat(tensors=copies, skeleton=flat.skeleton)


class AsyncWriter:
    """Snapshot now, write later, one write in flight, errors re-raised as themselves."""

    def __init__(self) -> None:
        self._snapshots = Snapshotter()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, obj: Any, write: Callable[[Flat], Any], *, done: Callable[[Any], None] | None = None) -> None:
        """Wait for the previous write, snapshot ``obj``, start ``write(snapshot)`` in the background.

        ``done(result)`` runs in the background thread after a successful write (e.g. the
        manager's manifest update and retention: nothing is deleted before its replacement
        is committed).
        """
        self.wait()
        flat = self._snapshots.take(obj)

        def run() -> None:
            try:
                result = write(flat)
                if done is not None:
                    done(result)
            except BaseException as e:  # surfaced by the next submit / wait / close
                self._error = e

        self._thread = threading.Thread(target=run, name="torchkeep-async-save")
        self._thread.start()

    @property
    def busy(self) -> bool:
        """True while a write is in flight."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Block until the write in flight (if any) is done; re-raise its exception."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """Wait for the last write; re-raise its exception."""
        self.wait()

    def __enter__(self) -> AsyncWriter:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if et is None:
            self.close()
        elif self._thread is not None:
            self._thread.join()  # never leave a write running behind an exception

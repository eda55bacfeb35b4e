"""Hash the bytes DCP writes on their way out, so a save needs no second read of its own files.

DCP's writers open every data file through ``self.fs.create_stream(path, mode)``. :class:`TapFS`
wraps that file system (local or fsspec) and hands DCP a :class:`Tap` stream that feeds each
buffer to xxh3 after the write returned; when the stream closes without an error, the file's
``{"bytes", "xxh3"}`` entry is recorded. Everything else is delegated unchanged.

Example:
    >>> import io
    >>> tap = Tap(io.BytesIO())
    >>> tap.write(b"abc"), tap.tell(), tap.entry()["bytes"]
    (3, 3, 3)
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterator
from typing import Any

from torchkeep.format.header import HashState

__all__ = ["Tap", "TapFS", "TappedWriter"]


class Tap:
    """A write-only stream that hashes every byte it passes on, front to back."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._hash = HashState()
        self.size = 0

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        wrote = self._stream.write(data)
        if wrote is not None and wrote != n:
            raise OSError(f"short write ({wrote} of {n} bytes)")
        self._hash.update(data)
        self.size += n
        return n

    def tell(self) -> int:
        return self.size

    def seek(self, pos: int, whence: int = 0) -> int:
        if (whence == 0 and pos == self.size) or (whence == 1 and pos == 0):
            return self.size
        raise io.UnsupportedOperation("checkpoint streams are written front to back")

    def flush(self) -> None:
        self._stream.flush()

    def close(self) -> None:
        self._stream.close()

    @property
    def closed(self) -> bool:
        return bool(getattr(self._stream, "closed", False))

    def fileno(self) -> int:
        """The local file's descriptor (DCP fsyncs it); object-storage streams have none."""
        return int(self._stream.fileno())

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def entry(self) -> dict[str, Any]:
        return {"bytes": self.size, "xxh3": self._hash.hexdigest()}


class TapFS:
    """DCP's file system ``inner``, recording ``record(file name, entry)`` for every file it finishes writing."""

    def __init__(self, inner: Any, record: Callable[[str, dict[str, Any]], None]) -> None:
        self._inner = inner
        self._record = record

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[Any]:
        with self._inner.create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            tap = Tap(stream)
            yield tap
        # only after the file is complete (closed, or its upload finished, without an error)
        self._record(os.path.basename(os.fspath(path)), tap.entry())


class TappedWriter:
    """Mixin for DCP's storage writers: hashes what it writes (``digests``) and records the data files
    this rank wrote (``written``). Call :meth:`tap` at the end of ``__init__``."""

    fs: Any
    digests: dict[str, dict[str, Any]]
    written: set[str]

    def tap(self) -> None:
        self.digests = {}
        self.fs = TapFS(self.fs, self.digests.__setitem__)
        self.written = set()

    def write_data(self, plan: Any, planner: Any) -> Any:
        fut = super().write_data(plan, planner)  # type: ignore[misc]
        self.written.update(str(r.storage_data.relative_path) for r in fut.wait())
        return fut

"""Local files: atomic, durable commits and vectored reads/writes of tensor memory.

Call order for a write (what :func:`torchkeep.save` does)::

    with AtomicFile(path, durable=True) as f:   # temp file beside ``path``
        write_buffers(f.fd, offset, buffers)     # data, any number of calls
        os.pwrite(f.fd, header, 0)               # header last
        f.commit()                               # fsync, rename, fsync directory

Leaving the block without ``commit()`` (an exception) removes the temp file; the
previous file at ``path`` is never touched until the rename.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

__all__ = ["AtomicFile", "exchange", "fsync_dir", "read_into", "write_buffers"]

_IOV_MAX = 1024
_MAX_IO = 1 << 30  # Linux transfers at most ~2 GiB per call; stay well below


def _chunks(buffers: Sequence[memoryview]) -> list[list[memoryview]]:
    """Split buffers into ``preadv``/``pwritev`` batches: at most IOV_MAX views and ~1 GiB each."""
    batches: list[list[memoryview]] = []
    cur: list[memoryview] = []
    size = 0
    for b in buffers:
        n = b.nbytes
        if n == 0:
            continue
        parts = [b] if n <= _MAX_IO else [b[i : i + _MAX_IO] for i in range(0, n, _MAX_IO)]
        for part in parts:
            if cur and (len(cur) >= _IOV_MAX or size + part.nbytes > _MAX_IO):
                batches.append(cur)
                cur, size = [], 0
            cur.append(part)
            size += part.nbytes
    if cur:
        batches.append(cur)
    return batches


def write_buffers(fd: int, offset: int, buffers: Sequence[memoryview]) -> int:
    """Write ``buffers`` back to back at ``offset`` with ``pwritev``; returns the end offset."""
    for batch in _chunks(buffers):
        while batch:
            n = os.pwritev(fd, batch, offset)
            offset += n
            # a short write: drop what went out and retry the rest
            while batch and n >= len(batch[0]):
                n -= len(batch[0])
                batch = batch[1:]
            if batch and n:
                batch = [batch[0][n:], *batch[1:]]
    return offset


def read_into(fd: int, offset: int, buffers: Sequence[memoryview]) -> int:
    """Fill ``buffers`` from consecutive bytes at ``offset`` with ``preadv``; returns the end offset.

    Raises:
        EOFError: the file ended early.
    """
    for batch in _chunks(buffers):
        while batch:
            n = os.preadv(fd, batch, offset)
            if n == 0:
                raise EOFError(offset)
            offset += n
            while batch and n >= len(batch[0]):
                n -= len(batch[0])
                batch = batch[1:]
            if batch and n:
                batch = [batch[0][n:], *batch[1:]]
    return offset


_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where unsupported.

    Replacing a directory otherwise takes two renames, with a moment where neither is in place.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> (d / "a").write_text("A"); (d / "b").write_text("B")
        1
        1
        >>> exchange(d / "a", d / "b") is False or (d / "a").read_text() == "B"
        True
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False  # this file system or kernel cannot swap
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def fsync_dir(directory: Path) -> None:
    """fsync a directory, so that a rename inside it survives a power loss."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFile:
    """A temp file beside ``path`` that replaces ``path`` atomically on :meth:`commit`.

    Args:
        path: the final file.
        durable: fsync the file before and the directory after the rename. Without it
            the rename is still atomic, but a power loss may lose the new file.

    Example:
        >>> import os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "x.bin")
        >>> with AtomicFile(p) as f:
        ...     _ = os.write(f.fd, b"hi")
        ...     f.commit()
        >>> open(p, "rb").read()
        b'hi'
    """

    def __init__(self, path: str | Path, *, durable: bool = True) -> None:
        self.path = Path(path)
        self.durable = durable
        # the name part is cut so that the temp name fits wherever the target name does
        self.tmp = self.path.with_name(f".{self.path.name[:200]}.tmp-{os.urandom(6).hex()}")
        # mode 0o666 through the umask, like any file a program creates
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        self.committed = False

    def commit(self) -> None:
        if self.durable:
            os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.tmp, self.path)
        self.committed = True
        if self.durable:
            fsync_dir(self.path.parent)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self.committed:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if not self.committed:
            self.abort()

"""Local files: atomic, durable commits and vectored reads/writes of tensor memory.

Call order for a write (what :func:`torchkeep.save` does)::

    with AtomicFile(path, durable=True) as f:   # temp file beside ``path``
        write_buffers(f.fd, offset, buffers)     # data, any number of calls
        os.pwrite(f.fd, header, 0)               # header last
        f.commit()                               # fsync, rename, fsync directory

Leaving the block without ``commit()`` (an exception) removes the temp file; the
previous file at ``path`` is never touched until the rename. A write that runs out of space
(ENOSPC, EDQUOT, EFBIG, from a write, the fsync or the rename) raises
:class:`~torchkeep.errors.InsufficientSpaceError`.

Temp files of killed writes: each writer holds ``flock`` on its temp file until its rename, and
a new ``AtomicFile`` for the same target removes the earlier temp files of that target whose
lock is free (the kernel drops a dead process's locks) and that have not been modified for
:data:`STALE_AFTER` seconds (a guard for writers that do not lock, such as a file system
without ``flock``). Only names this class makes for that target are touched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from torchkeep.errors import InsufficientSpaceError

__all__ = [
    "SPACE_ERRNOS",
    "STALE_AFTER",
    "AtomicFile",
    "exchange",
    "free_bytes",
    "fsync_dir",
    "read_into",
    "remove_stale_temps",
    "temp_prefix",
    "write_buffers",
]

#: errnos that mean "the disk (or the quota, or the file size limit) is full"
SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)})
#: seconds a temp file must be left untouched before a later write of the same target removes it
STALE_AFTER = 60.0
_TEMP_SUFFIX = re.compile(r"[0-9a-f]{12}")
_NAME_BYTES = 200  # of the target's name kept in a temp name: it fits wherever the target's name does

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
    """Write ``buffers`` back to back at ``offset`` with ``pwritev``; returns the end offset.

    An ``OSError`` for a full disk carries ``needed_bytes``: the end offset this call was to reach.
    """
    try:
        return _write_buffers(fd, offset, buffers)
    except OSError as e:
        if e.errno in SPACE_ERRNOS:
            e.needed_bytes = offset + sum(b.nbytes for b in buffers)  # type: ignore[attr-defined]
        raise


def _write_buffers(fd: int, offset: int, buffers: Sequence[memoryview]) -> int:
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


def free_bytes(directory: str | os.PathLike[str]) -> int:
    """Bytes free for this user in ``directory``'s file system (``-1`` when unknown)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return -1
    return int(st.f_bavail) * int(st.f_frsize)


def temp_prefix(path: Path) -> str:
    """The start of every temp name :class:`AtomicFile` uses for ``path`` (12 hex digits follow).

    The target's name is cut to 200 bytes (of UTF-8), so that a temp name fits wherever the target's does.

    Example:
        >>> temp_prefix(Path("/r/ckpt.safetensors"))
        '.ckpt.safetensors.tmp-'
    """
    name = os.fsencode(path.name)[:_NAME_BYTES]
    return "." + os.fsdecode(name) + ".tmp-"


def _remove_if_stale(path: Path, min_age: float) -> bool:
    """Unlink the temp file at ``path`` if no writer holds its lock and it is older than ``min_age`` s."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False  # gone, a link, unreadable: not ours to judge
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or time.time() - st.st_mtime < min_age:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a live writer holds it (or locks do not work here: leave it)
        try:
            now = os.lstat(path)
        except FileNotFoundError:
            return False
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return False  # renamed into place, and the name reused since
        os.unlink(path)  # under the lock: a writer that locks after this sees st_nlink == 0
        return True
    finally:
        os.close(fd)


def remove_stale_temps(path: str | os.PathLike[str], *, min_age: float = STALE_AFTER) -> int:
    """Remove the temp files earlier (killed) :class:`AtomicFile` writes of ``path`` left beside it.

    Only names :func:`temp_prefix` gives for ``path`` followed by 12 hex digits, only regular
    files (never a link or a directory), only those no live writer holds ``flock`` on, and only
    those not modified for ``min_age`` seconds. Errors are ignored: cleaning never fails a save.

    Returns:
        How many were removed.

    Example:
        >>> import os, tempfile
        >>> d = tempfile.mkdtemp(); left = os.path.join(d, ".c.bin.tmp-0123456789ab")
        >>> open(left, "wb").close(); os.utime(left, (0, 0))
        >>> remove_stale_temps(os.path.join(d, "c.bin")), os.listdir(d)
        (1, [])
    """
    target = Path(path)
    prefix = temp_prefix(target)
    removed = 0
    try:
        with os.scandir(target.parent) as it:
            names = [e.name for e in it if e.name.startswith(prefix)]
    except OSError:
        return 0
    for name in names:
        if _TEMP_SUFFIX.fullmatch(name[len(prefix) :]):
            with contextlib.suppress(OSError):
                removed += _remove_if_stale(target.parent / name, min_age)
    return removed


class AtomicFile:
    """A temp file beside ``path`` that replaces ``path`` atomically on :meth:`commit`.

    Args:
        path: the final file.
        durable: fsync the file before and the directory after the rename. Without it
            the rename is still atomic, but a power loss may lose the new file.

    Before creating its temp file it removes the stale temp files of killed writes of the same
    target (:func:`remove_stale_temps`). The temp file is created exclusively (never through an
    existing name or link) and locked with ``flock`` until it is renamed.

    Raises:
        InsufficientSpaceError: a write, the fsync or the rename hit ENOSPC/EDQUOT/EFBIG (the temp
            file is removed; ``path`` is untouched).

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
        self.committed = False
        self.fd = -1
        remove_stale_temps(self.path)
        prefix = temp_prefix(self.path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        for _ in range(8):
            self.tmp = self.path.with_name(prefix + os.urandom(6).hex())
            # mode 0o666 through the umask, like any file a program creates
            try:
                fd = os.open(self.tmp, flags, 0o666)
            except OSError as e:
                if e.errno in SPACE_ERRNOS:
                    raise self._space_error(e, 0) from e
                raise
            with contextlib.suppress(OSError):  # held until the rename; dropped by the kernel if we die
                fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink > 0:
                self.fd = fd
                return
            os.close(fd)  # a cleaner removed it between the create and the lock: take a new name
        raise FileExistsError(errno.EEXIST, "could not create a temp file beside the target", str(self.path))

    def _space_error(self, e: OSError, needed: int) -> InsufficientSpaceError:
        detail = f"{errno.errorcode.get(e.errno or 0, e.errno)}: {e.strerror}"
        return InsufficientSpaceError(
            self.path.parent, needed, free_bytes(self.path.parent), err=e.errno or errno.ENOSPC, detail=detail
        )

    def commit(self) -> None:
        if self.durable:
            os.fsync(self.fd)
        os.replace(self.tmp, self.path)  # still locked: a cleaner never sees the temp name unlocked
        self.committed = True
        os.close(self.fd)
        self.fd = -1
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
        if self.committed:
            return
        written = 0
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                written = os.fstat(self.fd).st_size
        self.abort()
        if isinstance(ev, OSError) and not isinstance(ev, InsufficientSpaceError) and ev.errno in SPACE_ERRNOS:
            raise self._space_error(ev, max(getattr(ev, "needed_bytes", 0), written)) from ev

"""Opening a path a user or a file named, whatever it turns out to be: typed errors, never a hang.

A checkpoint is read from a regular file. Anything else a path can name (a FIFO, whose
``open`` blocks until a writer comes; a socket; ``/dev/zero``, endless; a directory) is refused
with :class:`~torchkeep.errors.CorruptCheckpointError` saying what it is, before any byte is read.
The kind is taken from ``stat`` first (so no device is opened), and checked again on the open
descriptor (opened non-blocking), so a path swapped in between cannot make a read block.

Example:
    >>> import os, tempfile
    >>> d = tempfile.mkdtemp(); os.mkfifo(os.path.join(d, "pipe"))
    >>> try:
    ...     open_regular(os.path.join(d, "pipe"))
    ... except Exception as e:
    ...     print(type(e).__name__, "FIFO" in str(e))
    CorruptCheckpointError True
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from torchkeep.errors import CheckpointNotFoundError, CorruptCheckpointError, TorchkeepError

__all__ = ["CheckpointPermissionError", "kind_of", "open_regular"]

_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class CheckpointPermissionError(TorchkeepError, PermissionError):
    """The path exists but this process may not read it (or write beside it).

    Attributes:
        path: the path.

    Example:
        >>> isinstance(CheckpointPermissionError("/x"), PermissionError)
        True
    """

    def __init__(self, path: str | os.PathLike[str], action: str = "read") -> None:
        self.path = os.fspath(path)
        super().__init__(
            errno.EACCES,
            f"{self.path}: permission denied: this process (uid {os.getuid()}) cannot {action} it. "
            f"Check its permissions (ls -l {self.path}) or run as a user who can {action} it",
        )

    def __str__(self) -> str:
        return str(self.strerror)


def kind_of(mode: int) -> str:
    """What a ``st_mode`` is, for messages: ``"a regular file"``, ``"a FIFO (named pipe)"``, ...

    Example:
        >>> import stat
        >>> kind_of(stat.S_IFIFO), kind_of(stat.S_IFCHR)
        ('a FIFO (named pipe)', 'a character device')
    """
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _refuse(path: Path, mode: int, follow: bool) -> CorruptCheckpointError:
    what = kind_of(mode)
    if stat.S_ISLNK(mode) and not follow:
        return CorruptCheckpointError(path, f"{what}, which is not followed here; name the file it points to")
    return CorruptCheckpointError(
        path, f"{what}, not a regular file; checkpoints are read from regular files (copy the data to a file first)"
    )


def open_regular(path: str | os.PathLike[str], *, follow: bool = True) -> int:
    """A read-only descriptor of the regular file at ``path`` (blocking reads, close-on-exec).

    Args:
        path: the file.
        follow: follow a symbolic link at ``path`` (its last component); ``False`` refuses one.

    Raises:
        CheckpointNotFoundError: nothing there (a dangling link included).
        CheckpointPermissionError: not readable by this process (a ``PermissionError``).
        CorruptCheckpointError: a directory, FIFO, socket, device (or, with ``follow=False``, a link).
    """
    p = Path(path)
    try:
        st = os.stat(p, follow_symlinks=follow)
    except FileNotFoundError:
        raise CheckpointNotFoundError(p) from None
    except PermissionError:
        raise CheckpointPermissionError(p) from None
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(p, st.st_mode, follow)
    try:
        fd = os.open(p, os.O_RDONLY | _NONBLOCK | _CLOEXEC | (0 if follow else _NOFOLLOW))
    except FileNotFoundError:
        raise CheckpointNotFoundError(p) from None
    except PermissionError:
        raise CheckpointPermissionError(p) from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.ENODEV):  # swapped since the stat
            raise CorruptCheckpointError(
                p, f"not a regular file (it changed while being opened: {e.strerror})"
            ) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(p, st.st_mode, follow)
        if _NONBLOCK:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd

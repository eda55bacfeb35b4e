"""Where a CheckpointManager keeps its run: a local directory, or an fsspec URL (:mod:`.remote`).

A run store is a handful of methods. The manager calls them in this order::

    open     lock() -> clean(is_ours) -> read(MANIFEST), names() -> record(name) (rebuild/adopt)
    save     free_bytes() -> put(name, tensors, meta) -> write(MANIFEST, data) -> delete(dropped)...
    restore  local(name): a local path to memory-map and verify, for the length of a ``with``
    close    unlock()

A checkpoint is a file, or a directory: ``NAME.dcp`` (saved by a distributed run,
:mod:`torchkeep.distributed`) or ``NAME.shards`` (an incremental run's shard set, whose
``model.safetensors.index.json`` carries the manager's record); on a local store ``header``,
``delete`` and ``clean`` handle all three.

What "committed" means differs, and ``adopts`` says which:

* local (``adopts=True``): a checkpoint is renamed into place whole, so a file that carries
  the manager's record is complete even if a crash came before the manifest named it; the
  manager adopts it.
* object stores (``adopts=False``): there is no rename, so a checkpoint is committed only
  once the manifest names it; anything else is a leftover of a killed save, never shown.

Example:
    >>> import tempfile
    >>> run = LocalRun(tempfile.mkdtemp())
    >>> run.write("manifest.json", b"{}", durable=False); run.read("manifest.json"), run.names()
    (b'{}', ['manifest.json'])
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from torchkeep.errors import CheckpointLockedError, CorruptCheckpointError, TargetExistsError, TorchkeepError
from torchkeep.format.shards import MAX_INDEX_SIZE
from torchkeep.storage.files import kind_of, open_regular
from torchkeep.storage.local import AtomicFile, free_bytes

__all__ = ["DIR_SUFFIXES", "LAST", "LOCK", "SHARDS_INDEX", "Body", "LocalRun", "RunStore", "header_length"]

LOCK = ".lock"
#: The stable names of a local run's newest committed checkpoint: symbolic links, a file or a directory.
LAST = ("last.safetensors", "last.dcp", "last.shards")
#: the suffixes of checkpoints that are directories, in the order of the ``last`` links above
DIR_SUFFIXES = (".dcp", ".shards")
#: the shard index of a ``NAME.shards`` checkpoint directory
SHARDS_INDEX = "model.safetensors.index.json"
_TEMP = re.compile(r"\.(?P<target>.+)\.tmp-[0-9a-f]+", re.DOTALL)
# a checkpoint directory being deleted, or replaced by torchkeep.distributed (never a temp file)
_OLD = re.compile(r"\.(?P<target>.+)\.old-[0-9a-f]+", re.DOTALL)
_DIR_TREE = "tree.safetensors"  # a distributed checkpoint's tree file: it carries the manager's record
_DIR_MANIFEST = "torchkeep-manifest.json"  # written last: a directory without it never committed


class Body(Protocol):
    """A checkpoint file's content, written by :mod:`torchkeep.writer` (``writer.Body``): the store
    only says where the bytes go."""

    def write_to(self, fd: int) -> None:
        """The whole file into ``fd`` (any order of writes; the store commits it)."""

    def stream(self, write: Callable[[memoryview], Any]) -> bytes:
        """The whole file front to back through ``write``; returns the header bytes."""


class RunStore(Protocol):
    """The storage of one run directory (see the module docstring for the call order)."""

    location: str  # the directory or URL, for messages
    adopts: bool  # a checkpoint file is whole once visible (atomic rename)

    def path_of(self, name: str) -> Path | str: ...
    def lock(self) -> None: ...
    def unlock(self) -> None: ...
    def clean(self, is_ours: Callable[[str], bool]) -> None: ...
    def names(self) -> list[str]: ...
    def read(self, name: str) -> bytes | None: ...
    def write(self, name: str, data: bytes, *, durable: bool) -> None: ...
    def put(self, name: str, body: Body, *, durable: bool) -> tuple[int, bytes]: ...
    def header(self, name: str) -> tuple[int, bytes] | None: ...
    def local(self, name: str) -> contextlib.AbstractContextManager[Path]: ...
    def delete(self, name: str) -> None: ...
    def free_bytes(self) -> int: ...


class LocalRun:
    """A run directory on a local (or network) file system: atomic renames, fsyncs and ``flock``.

    Locking: ``.lock`` is held with ``fcntl.flock`` for the manager's lifetime and records the
    holder's pid. The kernel drops a flock when its process dies (even by SIGKILL), so a lock
    file left by a dead process is simply locked again: no stale-lock logic.

    Links: nothing here writes through a symbolic link. ``.lock`` is opened with ``O_NOFOLLOW``
    (a link or anything but a regular file there is refused, its target untouched); checkpoints
    and the manifest are written to fresh temp files (``O_EXCL``) renamed over the name, which
    replaces a link rather than writing into its target; a link where a checkpoint or the
    manifest should be is never read through.
    """

    adopts = True

    def __init__(self, directory: str | os.PathLike[str], *, create: bool = True) -> None:
        self.directory = Path(os.fspath(directory)).expanduser().absolute()
        self.location = str(self.directory)
        if create:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._fd = -1

    def path_of(self, name: str) -> Path:
        return self.directory / name

    def lock(self) -> None:
        path = self.directory / LOCK
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags, 0o666)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EMLINK):
                raise
            fd = -1
        mode = os.lstat(path).st_mode if fd < 0 else os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            if fd >= 0:
                os.close(fd)
            raise TargetExistsError(
                path,
                f"the run's lock file is {kind_of(mode)}, which the manager never opens (it would write into "
                "whatever it names)",
                f"Remove it (rm {path}); the manager creates its own lock file there",
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                raw = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                pid = int(raw) if raw.isdigit() else None
            finally:
                os.close(fd)
            raise CheckpointLockedError(self.directory, pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def unlock(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)  # closing the only descriptor releases the flock

    def clean(self, is_ours: Callable[[str], bool]) -> None:
        """Remove temp files and directories a killed save or delete left, only of names ``is_ours`` accepts."""
        for name in os.listdir(self.directory):
            m = _TEMP.fullmatch(name)
            path = self.directory / name
            if m and (is_ours(m["target"]) or (m["target"] in LAST and path.is_symlink())):  # a killed point_last
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
            elif (m := _OLD.fullmatch(name)) and is_ours(m["target"]) and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)

    def names(self) -> list[str]:
        """The directory's entries, less the ``last`` links (they name a checkpoint, they are not one)."""
        return [n for n in os.listdir(self.directory) if n not in LAST or not (self.directory / n).is_symlink()]

    def read(self, name: str) -> bytes | None:
        """The bytes of the regular file ``name``; ``None`` when missing. Anything else there (a link,
        a FIFO, a directory) reads as empty, so the manifest counts as corrupt and is rebuilt."""
        try:
            fd = open_regular(self.directory / name, follow=False)
        except FileNotFoundError:
            return None
        except CorruptCheckpointError:
            return b""
        with os.fdopen(fd, "rb") as fh:
            return fh.read()

    def write(self, name: str, data: bytes, *, durable: bool) -> None:
        with AtomicFile(self.directory / name, durable=durable) as f:
            view = memoryview(data)
            while view:
                view = view[os.write(f.fd, view) :]
            f.commit()

    def put(self, name: str, body: Body, *, durable: bool) -> tuple[int, bytes]:
        path = self.directory / name
        with AtomicFile(path, durable=durable) as f:
            body.write_to(f.fd)
            f.commit()
        size, head = self.header(name) or (0, b"")
        return size, head

    def header(self, name: str) -> tuple[int, bytes] | None:
        """``(file size, length prefix + JSON header)``, or ``None`` when missing or too short.

        For a distributed checkpoint directory: the bytes of all its files, and its tree file's
        header; ``None`` when it has no torchkeep manifest (it never committed).
        """
        path = self.directory / name
        if path.is_dir() and not path.is_symlink() and name.endswith(DIR_SUFFIXES[1]):
            return _index_of(path)
        if path.is_dir() and not path.is_symlink():
            if not (path / _DIR_MANIFEST).is_file():
                return None
            got = _file_header(path / _DIR_TREE)
            if got is None:
                return None
            with contextlib.suppress(OSError):
                return sum(f.stat().st_size for f in path.iterdir() if f.is_file()), got[1]
            return None
        return _file_header(path)

    @contextlib.contextmanager
    def local(self, name: str) -> Iterator[Path]:
        """The checkpoint's path. A file checkpoint must be the regular file the manager wrote: a
        directory, link, FIFO... under its name raises ``CorruptCheckpointError`` (restore falls back)."""
        path = self.directory / name
        if not name.endswith(DIR_SUFFIXES):
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                mode = None
            if mode is not None and not stat.S_ISREG(mode):
                raise CorruptCheckpointError(
                    path,
                    f"{kind_of(mode)} where the run's checkpoint file should be (the manager writes regular files)",
                )
        yield path

    def delete(self, name: str) -> None:
        """Remove a checkpoint file, or a checkpoint directory: renamed to a hidden name first (atomic),
        so a crash while removing it never leaves a visible half directory; ``clean`` finishes the job."""
        path = self.directory / name
        if path.is_dir() and not path.is_symlink():
            doomed = self.directory / f".{name}.old-{secrets.token_hex(4)}"
            try:
                os.rename(path, doomed)
            except FileNotFoundError:
                return
            shutil.rmtree(doomed, ignore_errors=True)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def point_last(self, name: str | None) -> None:
        """Make ``last.safetensors`` (``last.dcp``, ``last.shards`` for a directory checkpoint) a relative symbolic
        link to ``name``, atomically (a new link renamed over the old); ``None`` removes it.

        It is changed only after the manifest that names ``name`` is written, so it never names
        an uncommitted checkpoint. A file system without links simply has none."""
        want = (
            None
            if name is None
            else next((LAST[i + 1] for i, x in enumerate(DIR_SUFFIXES) if name.endswith(x)), LAST[0])
        )
        for link in LAST:
            path = self.directory / link
            if link != want:
                if path.is_symlink():
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                continue
            if path.is_symlink() and os.readlink(path) == name:
                continue
            if path.exists() and not path.is_symlink():
                continue  # the user's own file of that name: never replaced
            tmp = self.directory / f".{link}.tmp-{secrets.token_hex(6)}"
            try:
                os.symlink(name, tmp)
                os.replace(tmp, path)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def free_bytes(self) -> int:
        return free_bytes(self.directory)


def header_length(prefix: bytes, size: int) -> int | None:
    """The JSON header length a file of ``size`` bytes starting with ``prefix`` declares, or ``None``
    when the prefix is short or the length cannot be right (past the end, or over 256 MiB).

    Example:
        >>> header_length((5).to_bytes(8, "little"), 20), header_length((50).to_bytes(8, "little"), 20)
        (5, None)
    """
    if len(prefix) < 8:
        return None
    n = int.from_bytes(prefix[:8], "little")
    return None if n > min(size - 8, 1 << 28) else n


def _index_of(path: Path) -> tuple[int, bytes] | None:
    """``(bytes of the directory's files, its shard index)`` of a ``NAME.shards`` checkpoint, or ``None``
    when it has no index (never committed) or the index is not a regular file of a sane size."""
    try:
        fd = open_regular(path / SHARDS_INDEX, follow=False)
    except (FileNotFoundError, TorchkeepError):
        return None
    with os.fdopen(fd, "rb") as fh:
        raw = fh.read(MAX_INDEX_SIZE + 1)
    if len(raw) > MAX_INDEX_SIZE:
        return None
    with contextlib.suppress(OSError):
        return sum(f.lstat().st_size for f in path.iterdir() if f.is_file() and not f.is_symlink()), raw
    return None


def _file_header(path: Path) -> tuple[int, bytes] | None:
    """``(file size, length prefix + JSON header)`` of a torchkeep file, or ``None`` (missing, or not
    a regular file: a link, a FIFO, a directory are never read as a checkpoint)."""
    try:
        fd = open_regular(path, follow=False)
    except (FileNotFoundError, TorchkeepError):
        return None
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(8)
        n = header_length(head, size)
        return None if n is None else (size, head + fh.read(n))

"""A run on an object store or any fsspec file system: ``s3://bucket/run``, ``gs://...``, ``memory://run``.

Needs ``pip install torchkeep[remote]`` (fsspec and s3fs; other stores need their fsspec
package, e.g. gcsfs). Object stores have no atomic rename, so the commit protocol is:

1. upload the checkpoint object (header first: the data is hashed before the upload starts);
2. rewrite ``manifest.json`` naming it: **this single PUT is the commit**;
3. only then delete the objects retention drops.

Readers list the manifest, never the bucket, so a killed upload (an unfinished multipart
upload, or on non-atomic stores a partial object) is never seen. The next manager that opens
the run aborts unfinished S3 multipart uploads of its checkpoint names and deletes checkpoint
objects that carry its record but that no manifest names.

Locking: ``.lock`` holds ``{"host", "pid", "token"}`` and is created exclusively (on S3 a
conditional PUT), so of two managers opening at once exactly one gets it. A lock whose holder is
a dead process on this host is taken over; any other is reported with the host, pid and the
fix. Before each manifest write the manager checks that the lock is still its own.

Example:
    >>> import torch, torchkeep as tk
    >>> with tk.CheckpointManager("memory://doc-run", keep_last=1) as mgr:
    ...     _ = mgr.save({"w": torch.ones(2)}, step=1)
    ...     _ = mgr.save({"w": torch.ones(2)}, step=2)
    ...     [c.file for c in mgr.checkpoints()], mgr.latest().path
    (['ckpt_000002.safetensors'], 'memory://doc-run/ckpt_000002.safetensors')
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from torchkeep.errors import CheckpointLockedError, CheckpointNotFoundError
from torchkeep.storage.runs import LOCK, Body, header_length

__all__ = ["RemoteRun", "filesystem"]

_CHUNK = 16 << 20  # bytes per write call: bounds the file object's buffer copy
_HEAD = 1 << 16  # first read of a header: most headers fit, larger ones take a second request


def filesystem(url: str, options: Mapping[str, Any]) -> tuple[Any, str]:
    """``(fsspec file system, path)`` for ``url``; a missing package raises ``ImportError`` naming the install.

    Example:
        >>> filesystem("memory://x/run", {})[1]
        '/x/run'
    """
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise ImportError(
            f"{url}: object-storage runs need fsspec; install it with: pip install 'torchkeep[remote]'"
        ) from None
    try:
        return url_to_fs(url, **dict(options))
    except (ImportError, ValueError) as e:
        scheme = url.split("://", 1)[0]
        raise ImportError(
            f"{url}: no fsspec file system for {scheme}:// ({e}). Install its package "
            "(s3:// -> pip install 'torchkeep[remote]', gs:// -> pip install gcsfs, az:// -> pip install adlfs)."
        ) from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RemoteRun:
    """A run directory under an fsspec URL (see the module docstring for the commit protocol).

    Args:
        url: ``scheme://bucket/prefix``.
        storage_options: passed to fsspec (for s3: ``key``, ``secret``, ``endpoint_url`` or
            ``client_kwargs={"endpoint_url": ...}``, ``anon``...).
    """

    adopts = False

    def __init__(self, url: str, storage_options: Mapping[str, Any], *, create: bool = True) -> None:
        self.fs, root = filesystem(url, storage_options)
        self.root = root.rstrip("/")
        self.location = url.rstrip("/")
        self._token: str | None = None
        if create:
            with contextlib.suppress(OSError, NotImplementedError):
                self.fs.makedirs(self.root, exist_ok=True)  # a no-op on object stores

    def _p(self, name: str) -> str:
        return f"{self.root}/{name}"

    def path_of(self, name: str) -> str:
        return f"{self.location}/{name}"

    # -- lock ------------------------------------------------------------------------------------
    def lock(self) -> None:
        here = socket.gethostname()
        token = secrets.token_hex(8)
        mine = json.dumps({"host": here, "pid": os.getpid(), "token": token}).encode()
        for _attempt in range(3):
            try:
                # an exclusive create (S3: a conditional PUT, If-None-Match: *) decides between racing openers
                self.fs.pipe_file(self._p(LOCK), mine, mode="create")
                break
            except FileExistsError:
                raw = self.read(LOCK)
                if raw is None:
                    continue  # released meanwhile: race for it again, exclusively
                self._check_stale(raw, here)
                self.write(LOCK, mine, durable=True)  # a dead process's lock on this host: take it over
                break
            except TypeError:  # an fsspec without mode=: check, write, read back (last writer wins)
                raw = self.read(LOCK)
                if raw is not None:
                    self._check_stale(raw, here)
                self.write(LOCK, mine, durable=True)
                break
        else:
            raise CheckpointLockedError(self.location, None, host="unknown")
        back = self.read(LOCK)
        if back is None or json.loads(back).get("token") != token:
            held = json.loads(back) if back else {}
            raise CheckpointLockedError(self.location, held.get("pid"), host=held.get("host") or "unknown")
        self._token = token

    def _check_stale(self, raw: bytes, here: str) -> None:
        """Return if the lock ``raw`` is held by a dead process on this host (it may be taken over); else raise."""
        try:
            held = json.loads(raw)
            host, pid = str(held["host"]), int(held["pid"])
        except (ValueError, KeyError, TypeError):
            raise CheckpointLockedError(self.location, None, host="unknown") from None
        if host != here or _alive(pid):
            raise CheckpointLockedError(self.location, pid, host=host)
        warnings.warn(
            f"{self.location}: taking over the lock of process {pid}, which is no longer running", stacklevel=5
        )

    def fence(self) -> None:
        """Raise unless this store still holds the lock (checked before each manifest write)."""
        if self._token is None:
            return
        raw = self.read(LOCK)
        held = json.loads(raw) if raw else {}
        if held.get("token") != self._token:
            raise CheckpointLockedError(self.location, held.get("pid"), host=held.get("host") or "unknown")

    def unlock(self) -> None:
        token, self._token = self._token, None
        if token is None:
            return
        with contextlib.suppress(Exception):  # never mask the caller's error over a lock object
            raw = self.read(LOCK)
            if raw is not None and json.loads(raw).get("token") == token:
                self.delete(LOCK)

    # -- listing and small objects ---------------------------------------------------------------
    def clean(self, is_ours: Callable[[str], bool]) -> None:
        """Abort S3 multipart uploads a killed save left under this run (invisible, but billed).

        Uncommitted whole objects are found later, against the manifest.
        """
        if not hasattr(self.fs, "list_multipart_uploads"):
            return
        bucket, _, prefix = self.root.partition("/")
        try:
            uploads = self.fs.list_multipart_uploads(bucket)
        except Exception:  # no permission to list uploads: nothing is lost, they stay invisible
            return
        for up in uploads:
            key = str(up.get("Key", ""))
            folder, _, name = key.rpartition("/")
            if folder == prefix and is_ours(name):
                with contextlib.suppress(Exception):
                    self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=up["UploadId"])

    def names(self) -> list[str]:
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(self.root)  # another process may have written since
        try:
            listing = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        out = []
        for item in listing:
            if item.get("type", "file") == "file":
                out.append(str(item["name"]).rstrip("/").rsplit("/", 1)[-1])
        return out

    def read(self, name: str) -> bytes | None:
        try:
            return bytes(self.fs.cat_file(self._p(name)))
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes, *, durable: bool) -> None:
        """One PUT: whole or absent on an object store. The manifest is written only while the lock is ours."""
        if name != LOCK:
            self.fence()
        self.fs.pipe_file(self._p(name), bytes(data))

    # -- checkpoints -----------------------------------------------------------------------------
    def put(self, name: str, body: Body, *, durable: bool) -> tuple[int, bytes]:
        path = self._p(name)
        f = self.fs.open(path, "wb")
        size = 0

        def write(buf: memoryview) -> None:
            nonlocal size
            for i in range(0, buf.nbytes, _CHUNK):
                f.write(buf[i : i + _CHUNK])
            size += buf.nbytes

        try:
            head = body.stream(write)
            f.close()  # completes the (multipart) upload: the object appears whole
        except BaseException:
            with contextlib.suppress(Exception):
                f.discard()  # aborts a multipart upload instead of completing a partial one
            with contextlib.suppress(Exception):
                self.fs.rm_file(path)
            raise
        return size, head

    def header(self, name: str) -> tuple[int, bytes] | None:
        path = self._p(name)
        try:
            size = int(self.fs.info(path)["size"])
            first = bytes(self.fs.cat_file(path, start=0, end=min(size, _HEAD)))
        except (FileNotFoundError, KeyError):
            return None
        n = header_length(first, size)
        if n is None:
            return None
        if 8 + n > len(first):
            first += bytes(self.fs.cat_file(path, start=len(first), end=8 + n))
        return size, first[: 8 + n]

    @contextlib.contextmanager
    def local(self, name: str) -> Iterator[Path]:
        """Download to a temporary file (under ``$TMPDIR``), removed when the block ends."""
        with tempfile.TemporaryDirectory(prefix="torchkeep-") as tmp:
            dest = Path(tmp) / name
            try:
                self.fs.get_file(self._p(name), str(dest))
            except FileNotFoundError:
                raise CheckpointNotFoundError(self.path_of(name)) from None
            yield dest

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._p(name))

    def free_bytes(self) -> int:
        return -1  # object stores do not say

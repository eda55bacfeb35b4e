"""Where bytes go: local files (atomic commits), run directories and fsspec URLs.

:func:`open_run` picks the store of a run: a directory, or an object-store URL.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torchkeep.errors import InvalidArgumentError
from torchkeep.storage.local import AtomicFile, read_into, write_buffers
from torchkeep.storage.paths import is_url, local_path

if TYPE_CHECKING:
    from torchkeep.storage.runs import RunStore

__all__ = ["AtomicFile", "open_run", "read_into", "write_buffers"]


def open_run(
    directory: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None, *, create: bool = True
) -> RunStore:
    """A :class:`LocalRun` for a path or ``file://`` URL, a :class:`~torchkeep.storage.remote.RemoteRun` for any other URL.

    Args:
        directory: the run directory or URL.
        storage_options: fsspec options for a URL.
        create: create a missing local directory (``False`` for read-only tools).
    """
    # the stores are imported here: reading a checkpoint header needs neither (nor socket, nor fsspec)
    from torchkeep.storage.remote import RemoteRun
    from torchkeep.storage.runs import LocalRun

    text = os.fspath(directory)
    if is_url(text):
        return RemoteRun(str(text), storage_options or {}, create=create)
    if storage_options:
        raise InvalidArgumentError(
            "storage_options",
            storage_options,
            f"storage_options is for fsspec URLs (s3://..., memory://...), not a local path ({text})",
        )
    return LocalRun(local_path(text), create=create)

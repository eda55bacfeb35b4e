"""Local paths and fsspec URLs: the one rule for telling them apart (``file://`` is local).

Example:
    >>> is_url("s3://bucket/run"), is_url("file:///tmp/run"), is_url("runs/a")
    (True, False, False)
    >>> local_path("file:///tmp/run"), join("s3://b/run/", "x")
    ('/tmp/run', 's3://b/run/x')
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torchkeep.errors import ArgumentTypeError

__all__ = ["as_path", "is_url", "join", "local_path"]


def as_path(value: Any, argument: str = "path") -> Path:
    """``value`` (a ``str`` or ``os.PathLike``) as a ``Path`` with ``~`` expanded.

    Raises:
        ArgumentTypeError: anything else (a ``TypeError``), naming ``argument``.
    """
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if isinstance(text, str):
            return Path(text).expanduser()
    raise ArgumentTypeError(argument, value, "a path (a str or os.PathLike)")


def is_url(path: Any) -> bool:
    """True for an fsspec URL (``s3://bucket/run``, ``memory://x``) that goes through object storage.

    ``file://`` URLs are local paths (see :func:`local_path`).
    """
    try:
        text = os.fspath(path)
    except TypeError:
        return False
    return isinstance(text, str) and "://" in text and not text.startswith("file://")


def local_path(path: Any) -> Any:
    """``path`` without a ``file://`` prefix (other values unchanged)."""
    text = os.fspath(path)
    if isinstance(text, str) and text.startswith("file://"):
        return text[len("file://") :]
    return path


def join(directory: Any, name: str) -> Any:
    """``directory / name`` for a path, ``directory + "/" + name`` for a URL (never collapsing ``//``)."""
    return f"{str(directory).rstrip('/')}/{name}" if is_url(directory) else Path(local_path(directory)) / name

"""Errors the commands raise themselves: a path that exists but is not what the verb takes.

The root group prints them like any library error: one red line on stderr, exit status 2
(with ``--json``, also ``{"ok": false, "error": ..., "path": ...}`` on stdout).
"""

from __future__ import annotations

import os
from pathlib import Path

from torchkeep.errors import TorchkeepError

__all__ = ["JSON_ERROR_HELP", "ModelInputError", "WrongInputError", "what_is"]


class WrongInputError(TorchkeepError, ValueError):
    """The path exists but is the wrong kind of thing for this command; the message says what to pass."""

    def __init__(self, path: str | os.PathLike[str], message: str) -> None:
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: {message}")


class ModelInputError(TorchkeepError, ValueError):
    """The model in the file cannot take what the command line describes (input shapes, dtype, dynamic axes,
    layer types); the message names the flag to change."""

    def __init__(self, path: str | os.PathLike[str], message: str) -> None:
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: {message}")


def what_is(path: str | os.PathLike[str]) -> str:
    """``"a directory"``, ``"an empty directory"``, ``"a 12-byte file"``, ``"an empty file"``: for messages."""
    p = Path(path)
    if not os.fspath(path).startswith(("/", ".")) and "://" in os.fspath(path):
        return "a URL"
    if p.is_dir():
        try:
            empty = not any(p.iterdir())
        except OSError:
            empty = False
        return "an empty directory" if empty else "a directory"
    try:
        size = p.stat().st_size
    except OSError:
        return "not readable"
    return "an empty file" if size == 0 else f"a {size:,}-byte file"


#: appended to the ``--json`` help of every verb that has it: the one shape of an error
JSON_ERROR_HELP = 'An error that stops it (exit 2) prints {"ok": false, "error": MESSAGE, "path": PATH}.'

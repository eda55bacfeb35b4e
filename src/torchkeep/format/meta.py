"""The header metadata every torchkeep file carries, built in one place (pure, no torch).

Keys inside safetensors' ``__metadata__`` (all values are strings):

- ``format: "pt"`` (what safetensors' own torch helpers write), ``torchkeep.format``,
  ``torchkeep.hash``, ``torchkeep.library``, ``torchkeep.torch``, ``torchkeep.created``;
- ``torchkeep.tree``: the typed JSON skeleton of the state tree (:mod:`torchkeep.tree`);
- ``torchkeep.user``: the user's metadata as JSON;
- ``torchkeep.model``: the model record of ``save_model`` files.

Example:
    >>> meta = provenance("2.13.0+cpu", when="2026-01-01T00:00:00+00:00")
    >>> meta["torchkeep.format"], meta["torchkeep.torch"]
    ('torchkeep/1', '2.13.0')
    >>> user_json({"run": "a"})
    '{"run":"a"}'
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from torchkeep._version import __version__
from torchkeep.errors import InvalidArgumentError, UnsupportedObjectError
from torchkeep.format.header import FORMAT_KEY, FORMAT_NAME, FORMAT_VERSION, HASH_NAME

__all__ = [
    "MAX_SOURCE_DATE_EPOCH",
    "MODEL_KEY",
    "OUTPUT_FORMATS",
    "TREE_KEY",
    "USER_KEY",
    "created",
    "provenance",
    "torch_version",
    "tree_json",
    "user_json",
]

TREE_KEY = "torchkeep.tree"
USER_KEY = "torchkeep.user"
MODEL_KEY = "torchkeep.model"
#: what ``convert`` writes (``to=``): the whole tree, plain weights, ``torch.save``, a distributed checkpoint
OUTPUT_FORMATS = ("torchkeep", "safetensors", "torch", "distributed", "hf")


#: the largest ``SOURCE_DATE_EPOCH`` accepted: 9999-12-31T23:59:59Z (ISO 8601 has four-digit years)
MAX_SOURCE_DATE_EPOCH = 253402300799


def created() -> str:
    """Creation time, UTC, to the second; ``SOURCE_DATE_EPOCH`` pins it for reproducible files.

    ``SOURCE_DATE_EPOCH`` must be a decimal integer of seconds since 1970 up to
    :data:`MAX_SOURCE_DATE_EPOCH` (year 9999); empty means unset. Anything else is an error rather
    than a silent "now", as the reproducible-builds specification asks: a build that meant to pin
    its time must not quietly write a different file.

    Raises:
        InvalidArgumentError: a malformed or out-of-range ``SOURCE_DATE_EPOCH`` (a ``ValueError``).

    Example:
        >>> import os
        >>> os.environ["SOURCE_DATE_EPOCH"] = "0"; created()
        '1970-01-01T00:00:00+00:00'
        >>> del os.environ["SOURCE_DATE_EPOCH"]
    """
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not epoch:
        return datetime.now(timezone.utc).isoformat(timespec="seconds")
    if not (epoch.isascii() and epoch.isdigit()) or int(epoch) > MAX_SOURCE_DATE_EPOCH:
        raise InvalidArgumentError(
            "SOURCE_DATE_EPOCH",
            epoch[:40],
            "set the environment variable to a whole number of seconds since 1970-01-01 UTC, at most "
            f"{MAX_SOURCE_DATE_EPOCH} (year 9999), e.g. SOURCE_DATE_EPOCH=$(git log -1 --format=%ct), or unset it",
        )
    return datetime.fromtimestamp(int(epoch), timezone.utc).isoformat(timespec="seconds")


def torch_version() -> str:
    """The installed torch's version, without importing torch when it is not imported yet."""
    loaded = sys.modules.get("torch")
    if loaded is not None and isinstance(getattr(loaded, "__version__", None), str):
        return loaded.__version__
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return "unknown"


def provenance(torch: str | None = None, *, when: str | None = None) -> dict[str, str]:
    """Format, hash, versions and creation time: the header metadata of every torchkeep file.

    ``torch`` is the torch version to record (default: the installed one).
    """
    torch = torch if torch is not None else torch_version()
    return {
        "format": "pt",
        FORMAT_KEY: f"{FORMAT_NAME}/{FORMAT_VERSION}",
        "torchkeep.hash": HASH_NAME,
        "torchkeep.library": __version__,
        "torchkeep.torch": torch.split("+")[0],
        "torchkeep.created": when if when is not None else created(),
    }


def tree_json(skeleton: Any) -> str:
    """The skeleton as the compact JSON stored under :data:`TREE_KEY`."""
    return json.dumps(skeleton, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def user_json(metadata: Mapping[str, Any]) -> str:
    """User metadata as the compact JSON stored under :data:`USER_KEY`.

    Raises:
        UnsupportedObjectError: not a dict with string keys, or not JSON-serialisable.
    """
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
        raise UnsupportedObjectError("metadata", metadata, "metadata must be a dict with string keys.")
    try:
        return json.dumps(dict(metadata), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UnsupportedObjectError("metadata", metadata, f"metadata must be JSON-serialisable ({e}).") from None

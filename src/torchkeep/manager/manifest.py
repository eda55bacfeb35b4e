"""The run directory's index, ``manifest.json``: read, written atomically, rebuilt from checkpoint headers.

Format (``version`` 1)::

    {"version": 1, "latest": "ckpt_000012.safetensors", "best": "ckpt_000009.safetensors",
     "entries": [{"file": ..., "step": 12, "metrics": {"val_acc": 0.8}, "size": 1234,
                  "created": 1700000000.0, "digest": "<sha256 of the file's header>"}, ...]}

Entries are in save order, oldest first. Every checkpoint the manager writes also carries its
entry in its own user metadata (key :data:`META_KEY`), so a lost or corrupt manifest is rebuilt
from the files, and a file the manager wrote but did not get to index (a crash in between) is
adopted. Files without that record are never indexed, hence never deleted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torchkeep.errors import TorchkeepError
from torchkeep.reader import Checkpoint
from torchkeep.storage.local import AtomicFile

__all__ = ["MANIFEST", "META_KEY", "CheckpointInfo", "header_digest", "read", "rebuild", "record_of", "write"]

MANIFEST = "manifest.json"
META_KEY = "torchkeep.manager"
VERSION = 1


@dataclass(frozen=True, eq=True)
class CheckpointInfo:
    """One checkpoint of a :class:`~torchkeep.CheckpointManager` run.

    Attributes:
        file: the file name inside the run directory.
        path: the full path.
        step: the step it was saved at.
        metrics: the metrics passed to ``save`` (NaN and infinities kept as floats).
        size: bytes on disk.
        created: Unix time of the save.
        digest: sha256 of the file's header (which holds every tensor's checksum).

    Example:
        >>> CheckpointInfo("a.safetensors", Path("/r/a.safetensors"), 3, {"acc": 0.5}, 10, 0.0, "").step
        3
    """

    file: str
    path: Path
    step: int | None
    metrics: dict[str, Any] = field(default_factory=dict)
    size: int = 0
    created: float = 0.0
    digest: str = ""

    __hash__ = None  # type: ignore[assignment]  # metrics is a dict

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        del d["path"]
        return d

    @classmethod
    def from_json(cls, directory: Path, d: Mapping[str, Any]) -> CheckpointInfo:
        name = d["file"]
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            raise ValueError(f"bad file name {name!r}")
        step = d.get("step")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            raise ValueError(f"bad step {step!r}")
        metrics = d.get("metrics") or {}
        if not isinstance(metrics, dict):
            raise ValueError("metrics is not an object")
        return cls(
            file=name,
            path=directory / name,
            step=step,
            metrics=dict(metrics),
            size=int(d.get("size", 0)),
            created=float(d.get("created", 0.0)),
            digest=str(d.get("digest", "")),
        )


def _dumps(obj: Any) -> str:
    # NaN/inf metrics are legal here (Python's json reads them back); a NaN is never "best"
    return json.dumps(obj, ensure_ascii=False, allow_nan=True, sort_keys=False)


def record_of(info: CheckpointInfo) -> str:
    """The JSON string stored in a checkpoint's user metadata under :data:`META_KEY`."""
    return _dumps(info.to_json())


def header_digest(path: Path) -> str:
    """sha256 of a safetensors file's 8-byte length prefix and JSON header."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
        return hashlib.sha256(head + fh.read(min(n, 1 << 28))).hexdigest()


def read(directory: Path) -> tuple[list[CheckpointInfo] | None, str]:
    """``(entries, "")`` from ``manifest.json``, or ``(None, reason)`` when it is missing or unreadable."""
    try:
        raw = (directory / MANIFEST).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, "missing"
    except (OSError, UnicodeDecodeError) as e:
        return None, f"unreadable ({e})"
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(doc.get("entries"), list):
            raise ValueError("not a version-1 manifest")
        entries = [CheckpointInfo.from_json(directory, e) for e in doc["entries"]]
    except (ValueError, TypeError, KeyError, RecursionError) as e:
        return None, f"corrupt ({e})"
    return entries, ""


def write(
    directory: Path, entries: Iterable[CheckpointInfo], latest: str | None, best: str | None, *, durable: bool = True
) -> None:
    """Replace ``manifest.json`` atomically (temp file, fsync, rename, fsync of the directory)."""
    doc = {"version": VERSION, "latest": latest, "best": best, "entries": [e.to_json() for e in entries]}
    data = (_dumps(doc) + "\n").encode("utf-8")
    with AtomicFile(directory / MANIFEST, durable=durable) as f:
        view = memoryview(data)
        while view:
            view = view[os.write(f.fd, view) :]
        f.commit()


def from_file(path: Path) -> CheckpointInfo | None:
    """The manager record stored in a checkpoint's header, or ``None`` (not the manager's, or unreadable)."""
    try:
        with Checkpoint(path, verify=False) as ck:
            raw = ck.metadata.get(META_KEY)
        if not isinstance(raw, str):
            return None
        d = json.loads(raw)
        if not isinstance(d, dict) or d.get("file") != path.name:
            return None  # a copy under another name is not this manager's file
        info = CheckpointInfo.from_json(path.parent, d)
        return CheckpointInfo(
            info.file, info.path, info.step, info.metrics, path.stat().st_size, info.created, header_digest(path)
        )
    except (TorchkeepError, OSError, ValueError, TypeError, KeyError, RecursionError):
        return None


def rebuild(directory: Path, files: Iterable[str]) -> list[CheckpointInfo]:
    """Entries for those of ``files`` that carry a manager record, oldest first."""
    found = [info for name in files if (info := from_file(directory / name)) is not None]
    found.sort(key=lambda i: (i.created, -math.inf if i.step is None else i.step, i.file))
    return found

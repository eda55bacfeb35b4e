"""The run directory's index, ``manifest.json``: encoded, parsed, rebuilt from checkpoint headers (pure).

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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torchkeep.format.meta import USER_KEY

if TYPE_CHECKING:
    from torchkeep.storage.runs import RunStore

__all__ = [
    "MANIFEST",
    "META_KEY",
    "CheckpointInfo",
    "encode",
    "from_header",
    "ordered",
    "parse",
    "rebuild",
    "record_of",
]

MANIFEST = "manifest.json"
META_KEY = "torchkeep.manager"
VERSION = 1


@dataclass(frozen=True, eq=True)
class CheckpointInfo:
    """One checkpoint of a :class:`~torchkeep.CheckpointManager` run.

    Attributes:
        file: the file name inside the run directory.
        path: the full path (a ``str`` URL for runs on object storage).
        step: the step it was saved at.
        metrics: the metrics passed to ``save`` (NaN and infinities kept as floats).
        size: bytes on disk (of an incremental checkpoint, the logical size: shards it shares with
            other checkpoints of the run count in each; ``torchkeep ls`` also shows the physical size).
        created: Unix time of the save.
        digest: sha256 of the file's header (which holds every tensor's checksum); of an incremental
            checkpoint, of its shard index (which holds each shard's size and header sha256).

    Example:
        >>> CheckpointInfo("a.safetensors", Path("/r/a.safetensors"), 3, {"acc": 0.5}, 10, 0.0, "").step
        3
    """

    file: str
    path: Path | str
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
    def from_json(cls, base: Path | Callable[[str], Path | str], d: Mapping[str, Any]) -> CheckpointInfo:
        """The entry ``d`` of a manifest; ``base`` is the run directory or a ``name -> path`` function."""
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
            path=base(name) if callable(base) else base / name,
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


def parse(raw: bytes | None, base: Path | Callable[[str], Path | str]) -> tuple[list[CheckpointInfo] | None, str]:
    """Entries of a manifest's bytes (``None``: missing), or ``(None, reason)``."""
    if raw is None:
        return None, "missing"
    try:
        doc = json.loads(raw.decode("utf-8"))
        if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(doc.get("entries"), list):
            raise ValueError("not a version-1 manifest")
        entries = [CheckpointInfo.from_json(base, e) for e in doc["entries"]]
    except (ValueError, TypeError, KeyError, RecursionError, UnicodeDecodeError) as e:
        return None, f"corrupt ({e})"
    return entries, ""


def encode(entries: Iterable[CheckpointInfo], latest: str | None, best: str | None) -> bytes:
    """The bytes of ``manifest.json``."""
    doc = {"version": VERSION, "latest": latest, "best": best, "entries": [e.to_json() for e in entries]}
    return (_dumps(doc) + "\n").encode("utf-8")


def from_header(name: str, size: int, head: bytes, base: Path | Callable[[str], Path | str]) -> CheckpointInfo | None:
    """The manager record in a checkpoint's header bytes (length prefix + JSON), or in the shard index
    of an incremental (``NAME.shards``) checkpoint (JSON, whose ``metadata`` holds it), or ``None``."""
    try:
        if head[:1] == b"{":  # a shard index: its metadata holds the user metadata as an object
            user = (json.loads(head.decode("utf-8")).get("metadata") or {}).get(USER_KEY) or {}
            raw = user.get(META_KEY)
        else:
            meta = json.loads(head[8:].decode("utf-8")).get("__metadata__") or {}
            raw = json.loads(meta.get(USER_KEY) or "{}").get(META_KEY)
        if not isinstance(raw, str):
            return None
        d = json.loads(raw)
        if not isinstance(d, dict) or d.get("file") != name:
            return None  # a copy under another name is not this manager's file
        info = CheckpointInfo.from_json(base, d)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, UnicodeDecodeError):
        return None
    digest = hashlib.sha256(head).hexdigest()
    return CheckpointInfo(info.file, info.path, info.step, info.metrics, size, info.created, digest)


def ordered(infos: Iterable[CheckpointInfo]) -> list[CheckpointInfo]:
    """Oldest first: by save time, then step, then name."""
    return sorted(infos, key=lambda i: (i.created, -math.inf if i.step is None else i.step, i.file))


def rebuild(store: RunStore, names: Iterable[str]) -> list[CheckpointInfo]:
    """Entries for those of ``names`` in ``store`` whose header carries a manager record, oldest first."""
    found = []
    for name in names:
        got = store.header(name)
        if got is not None and (info := from_header(name, *got, store.path_of)) is not None:
            found.append(info)
    return ordered(found)

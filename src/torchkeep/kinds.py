"""What a path is, decided by its content: the one detector every verb asks (no torch).

:func:`detect` looks at bytes and directory entries, never at suffixes:

===============================  ==================================================================
kind                             what it is
===============================  ==================================================================
``torchkeep``                    a torchkeep file (a safetensors file with torchkeep's header keys)
``safetensors``                  a plain safetensors file
``sharded``                      a shard index (``*.index.json``, ours or Hugging Face's) and its shards
``torch.save (zip)``             a ``torch.save`` zip archive (torch >= 1.6)
``torch.save (raw pickle...)``   a pre-1.6 ``torch.save`` pickle
``torch.distributed.checkpoint`` a plain DCP directory (``.metadata`` + ``*.distcp``)
``torchkeep.distributed``        a DCP directory committed by :mod:`torchkeep.distributed` (a manifest)
===============================  ==================================================================

A directory is resolved to what it holds: a torchkeep distributed checkpoint, a DCP
directory, its shard index (``model.safetensors.index.json`` first), the weights file of a
Hugging Face model, PEFT adapter or diffusers folder (``model.safetensors``, ``adapter_model.safetensors``,
``diffusion_pytorch_model.safetensors``, their ``.bin`` forms), or its only ``*.safetensors`` file,
or its only ``torch.save`` file.

Example:
    >>> import torch, torchkeep as tk, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> _ = tk.save({"w": torch.ones(2)}, os.path.join(d, "c.bin"))  # the name does not matter
    >>> found = detect(d)
    >>> found.kind, found.file.name
    ('torchkeep', 'c.bin')
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from torchkeep.container import ZIP_MAGIC, is_legacy
from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    KeyMismatchError,
    MissingShardError,
    UnsupportedSourceError,
)
from torchkeep.format.header import is_torchkeep_file
from torchkeep.format.shards import MAX_INDEX_SIZE, Index, looks_like_index, parse_index
from torchkeep.storage.dcp_manifest import is_torchkeep_dcp
from torchkeep.storage.files import open_regular
from torchkeep.storage.paths import as_path

__all__ = [
    "DCP",
    "KINDS",
    "LEGACY_PICKLE",
    "LEGACY_ZIP",
    "SAFETENSORS",
    "SHARDED",
    "TORCHKEEP",
    "TORCHKEEP_DCP",
    "Detected",
    "describe",
    "detect",
    "is_legacy_kind",
]

TORCHKEEP = "torchkeep"
SAFETENSORS = "safetensors"
SHARDED = "sharded"
LEGACY_ZIP = "torch.save (zip)"
LEGACY_PICKLE = "torch.save (raw pickle, torch < 1.6)"
DCP = "torch.distributed.checkpoint"
TORCHKEEP_DCP = "torchkeep.distributed"
KINDS = (TORCHKEEP, SAFETENSORS, SHARDED, LEGACY_ZIP, LEGACY_PICKLE, DCP, TORCHKEEP_DCP)

_PREFERRED_INDEX = (
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "diffusion_pytorch_model.safetensors.index.json",
)
_PREFERRED_FILE = (
    "model.safetensors",
    "pytorch_model.bin",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
)
#: names only choose which damaged file an error blames when a directory holds no readable checkpoint
_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


@dataclass
class Detected:
    """A path and what it holds.

    Attributes:
        kind: one of :data:`KINDS`.
        path: the path as given (file or directory).
        file: the file to read: the checkpoint file, the shard index, or ``None`` for a
            DCP directory (``path`` itself).
        index: the parsed shard index, for ``sharded``.
        shard_kinds: ``{shard file name: kind}`` of every shard, for ``sharded``.
    """

    kind: str
    path: Path
    file: Path | None
    index: Index | None = None
    shard_kinds: dict[str, str] = field(default_factory=dict)

    @property
    def target(self) -> Path:
        """The file or directory that holds the checkpoint (``file``, else ``path``)."""
        return self.file if self.file is not None else self.path

    @property
    def shards(self) -> list[Path]:
        """Every file the checkpoint's tensors live in (the shards of a sharded checkpoint, else the file)."""
        if self.index is not None and self.file is not None:
            return [self.file.parent / s for s in self.index.shards]
        return [self.file] if self.file is not None else []

    @property
    def legacy(self) -> bool:
        return is_legacy_kind(self.kind)

    def check_shard(self, fname: str, names: Iterable[str]) -> None:
        """Raise :class:`~torchkeep.errors.KeyMismatchError` unless the shard ``fname`` of this shard
        set holds (``names``) every tensor its index places there.

        Example:
            >>> from torchkeep.format.shards import Index
            >>> d = Detected(SHARDED, Path("m"), Path("m/i.json"), Index({"w": "a.safetensors"}))
            >>> d.check_shard("a.safetensors", ["w"])
        """
        assert self.index is not None and self.file is not None  # detect() sets both for SHARDED
        lacking = sorted(set(self.index.names_in(fname)) - set(names))
        if lacking:
            raise KeyMismatchError(
                str(self.file.parent / fname),
                missing=lacking,
                fix=f"the index {self.file.name} lists these tensors in this shard, which lacks them: "
                "the shards do not belong to this index; download them again",
            )


def is_legacy_kind(kind: str) -> bool:
    """True for the two ``torch.save`` kinds."""
    return kind in (LEGACY_ZIP, LEGACY_PICKLE)


def detect(path: str | os.PathLike[str], *, operation: str = "open") -> Detected:
    """What ``path`` is, by content.

    Args:
        path: a file or directory.
        operation: what the caller is doing, named in errors (``"tk.load"``, ``"inspect"``).

    Example:
        >>> import torch, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "old.ckpt")
        >>> torch.save({"w": torch.ones(1)}, p)
        >>> detect(p).kind
        'torch.save (zip)'

    Raises:
        CheckpointNotFoundError: no such path (or a shard index's shard is missing: MissingShardError).
        UnsupportedSourceError: a directory without a checkpoint in it, or with several candidates.
        CorruptCheckpointError: a file that none of the kinds can read, or not a regular file (a FIFO,
            socket or device).
        CheckpointPermissionError: a file this process may not read (a ``PermissionError``).
    """
    p = as_path(path)
    if not p.exists():
        raise CheckpointNotFoundError(p)
    if p.is_dir():
        return _directory(p, operation)
    return _file(p, p, operation)


def _file(p: Path, given: Path, operation: str = "open") -> Detected:
    # a FIFO, socket or device is refused before a byte is read (a FIFO's open would block)
    with os.fdopen(open_regular(p), "rb") as fh:
        head = fh.read(8)
        if is_legacy(head):
            return Detected(LEGACY_ZIP if head.startswith(ZIP_MAGIC) else LEGACY_PICKLE, given, p)
        if head.lstrip()[:1] == b"{":
            raw = head + fh.read(MAX_INDEX_SIZE)
            if looks_like_index(raw):
                return _sharded(p, given, parse_index(raw, p))
        # the kind from the header's first bytes: the verb that opens the file parses it once, not twice
        fd = fh.fileno()
        size = os.fstat(fd).st_size
        if int.from_bytes(head[:8].ljust(8, b"\0"), "little") > size and os.pread(fd, 5, 257) == b"ustar":
            # torch.load tries the tar format (torch < 0.4) before anything else: never loaded here
            raise UnsupportedSourceError(
                given,
                "torch.save tar archive (torch < 0.4)",
                operation,
                "torchkeep never loads this format (torch.load unpickles its members); `torchkeep scan FILE` "
                "lists what it imports; if you trust it, load it with the torch that wrote it and save its "
                "state_dict() again",
            )
        torchkeep = is_torchkeep_file(lambda off, n: os.pread(fd, n, off), size, str(p))
    return Detected(TORCHKEEP if torchkeep else SAFETENSORS, given, p)


def _sharded(index_path: Path, given: Path, index: Index) -> Detected:
    root = index_path.parent
    absent = [s for s in index.shards if not (root / s).is_file()]
    if absent:
        raise MissingShardError(index_path, absent)
    kinds = {}
    for s in index.shards:
        sub = _file(root / s, root / s)
        if sub.kind == SHARDED:
            raise CorruptCheckpointError(index_path, f"shard {s!r} is itself an index")
        kinds[s] = sub.kind
    return Detected(SHARDED, given, index_path, index, kinds)


def _directory(p: Path, operation: str) -> Detected:
    if is_torchkeep_dcp(p):
        return Detected(TORCHKEEP_DCP, p, None)
    if (p / ".metadata").is_file():
        return Detected(DCP, p, None)
    entries = sorted(e for e in p.iterdir() if e.is_file() and not e.name.startswith("."))
    indexes = []
    for e in entries:
        if e.name.endswith(".json") and _is_index_file(e):
            indexes.append(e)
    if indexes:
        preferred = [e for name in _PREFERRED_INDEX for e in indexes if e.name == name]
        if preferred or len(indexes) == 1:
            return _file((preferred or indexes)[0], p)
        raise UnsupportedSourceError(
            p,
            "directory",
            operation,
            f"it holds several shard indexes ({', '.join(e.name for e in indexes)}); pass the one to use",
        )
    named = [p / n for n in _PREFERRED_FILE if (p / n).is_file()]
    if named:
        return _file(named[0], p)
    failures: dict[Path, CorruptCheckpointError] = {}
    candidates = [d for d in (_try_file(e, failures) for e in entries) if d is not None]
    if len(candidates) == 1:
        return Detected(candidates[0].kind, p, candidates[0].file)
    named = [e for e in failures if e.suffix in _CHECKPOINT_SUFFIXES]
    if not candidates and len(named) == 1:
        raise failures[named[0]]  # the one file meant to be the checkpoint is damaged: say so, not "empty"
    if not candidates:
        raise UnsupportedSourceError(
            p,
            "directory",
            operation,
            "it holds no checkpoint (no safetensors or torch.save file, shard index, or DCP .metadata); "
            "pass the checkpoint file itself",
        )
    names = ", ".join(d.file.name for d in candidates[:10] if d.file is not None)
    raise UnsupportedSourceError(
        p, "directory", operation, f"it holds several checkpoints ({names}); pass the one to use"
    )


def _is_index_file(e: Path) -> bool:
    try:
        if e.stat().st_size > MAX_INDEX_SIZE:
            return False
        return looks_like_index(e.read_bytes())
    except OSError:
        return False


def _try_file(e: Path, failures: dict[Path, CorruptCheckpointError]) -> Detected | None:
    """The kind of ``e`` when it is a checkpoint file; ``None`` for anything else (a config, a README)."""
    try:
        d = _file(e, e)
    except CorruptCheckpointError as err:
        failures[e] = err
        return None
    except OSError:
        return None
    return d if d.kind != SHARDED else None


def describe(found: Detected) -> str:
    """A short human description: ``'sharded (3 shards)'``, ``'torchkeep'``."""
    if found.kind == SHARDED and found.index is not None:
        return f"sharded ({len(found.index.shards)} shards)"
    return found.kind

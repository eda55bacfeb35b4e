"""Incremental checkpoints on disk, read-only and without torch: their shard records, the physical
size of a run whose checkpoints share shard files, and verifying such a run reading each shard once.

An incremental checkpoint is a directory ``NAME.shards`` holding an ordinary sharded checkpoint
(``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``, the Hugging Face layout).
Its index's metadata records, under :data:`SHARDS_KEY`, each shard's size and the sha256 of its
header (which holds the checksum of every tensor in it), so the index's own sha256, the manager's
``digest``, covers every byte of the checkpoint. Shards equal to the previous checkpoint's are
hard links to the same file: the data stays on disk while any checkpoint links it.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> d = Path(tempfile.mkdtemp())
    >>> (d / "a.safetensors").write_bytes(b"x" * 10) and None
    >>> physical_sizes(d, ["a.safetensors", "a.safetensors"])
    [10, 0]
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchkeep.errors import CorruptCheckpointError, TorchkeepError
from torchkeep.format.header import Header, parse_header
from torchkeep.format.shards import Index, parse_index
from torchkeep.headers import HeaderFile
from torchkeep.storage.dcp_manifest import verify_all
from torchkeep.storage.files import open_regular
from torchkeep.storage.runs import SHARDS_INDEX, header_length

__all__ = ["SHARDS_KEY", "ShardSet", "head_of", "open_set", "physical_sizes", "verify_run"]

#: index metadata key: ``{shard file name: [size in bytes, sha256 hex of its header]}``
SHARDS_KEY = "torchkeep.shards"


def head_of(path: Path) -> tuple[int, bytes]:
    """``(file size, length prefix + JSON header)`` of the regular file ``path`` (never through a link).

    Raises:
        CorruptCheckpointError: not a regular file, or too short for the header it declares.
        FileNotFoundError: no such file.
    """
    fd = open_regular(path, follow=False)
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        prefix = fh.read(8)
        n = header_length(prefix, size)
        if n is None:
            raise CorruptCheckpointError(path, "too short for the header length its first 8 bytes declare")
        return size, prefix + fh.read(n)


def _sha(head: bytes) -> str:
    return hashlib.sha256(head).hexdigest()


@dataclass
class ShardSet:
    """A parsed incremental checkpoint: its index and, per shard, the recorded ``(size, header sha256)``."""

    directory: Path
    index: Index
    records: dict[str, tuple[int, str]] = field(default_factory=dict)

    def shard(self, name: str) -> tuple[Path, Header]:
        """The shard's path and parsed header, after checking they are the ones its index recorded.

        Raises:
            CorruptCheckpointError: missing, a link, resized or with another header than recorded.
        """
        path = self.directory / name
        want = self.records.get(name)
        try:
            size, head = head_of(path)
        except FileNotFoundError:
            raise CorruptCheckpointError(path, "the shard its index names is missing") from None
        if want is None or (size, _sha(head)) != tuple(want):
            raise CorruptCheckpointError(
                path, "the shard is not the one its index recorded (another size or header); restore it from a copy"
            )
        header = parse_header(lambda off, n: head[off : off + n], size, str(path))
        lacking = sorted(set(self.index.names_in(name)) - set(header.tensors))
        if lacking:
            raise CorruptCheckpointError(path, f"the shard lacks tensors its index places there: {lacking[:10]}")
        return path, header


def open_set(directory: Path) -> ShardSet:
    """The index and shard records of the incremental checkpoint ``directory``.

    Raises:
        CorruptCheckpointError: no readable index, or an index without the shard records.
    """
    where = directory / SHARDS_INDEX
    try:
        fd = open_regular(where, follow=False)
    except FileNotFoundError:
        raise CorruptCheckpointError(where, "the checkpoint directory has no shard index") from None
    with os.fdopen(fd, "rb") as fh:
        index = parse_index(fh.read(), where)
    raw = index.metadata.get(SHARDS_KEY)
    if not isinstance(raw, dict):
        raise CorruptCheckpointError(where, f"the index has no {SHARDS_KEY!r} records of its shards")
    records: dict[str, tuple[int, str]] = {}
    for name, rec in raw.items():
        if not (isinstance(rec, list) and len(rec) == 2 and isinstance(rec[0], int) and isinstance(rec[1], str)):
            raise CorruptCheckpointError(where, f"malformed record of shard {name!r}")
        records[name] = (rec[0], rec[1])
    if set(records) != set(index.shards):
        raise CorruptCheckpointError(where, "its shard records and its weight_map name different shards")
    return ShardSet(directory, index, records)


def _files(path: Path) -> list[Path]:
    if path.is_dir() and not path.is_symlink():
        return sorted(c for c in path.iterdir() if c.is_file() and not c.is_symlink())
    return [path]


def physical_sizes(root: Path, names: Iterable[str]) -> list[int]:
    """Per checkpoint (in the order given, oldest first), the bytes of the files it is first to hold:
    a shard shared with an older checkpoint (a hard link) counts once, in the oldest. Their sum is
    what the run takes on disk (apparent sizes)."""
    seen: set[tuple[int, int]] = set()
    out = []
    for name in names:
        total = 0
        for f in _files(root / name):
            try:
                st = f.lstat()
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
        out.append(total)
    return out


def _check_file(path: Path) -> str | None:
    """``None`` when every checksum of the file matches, else why not."""
    try:
        with HeaderFile(path) as ck:
            if ck.header.checksums is None:
                return "it carries no checksums"
            ck.verify_all()
    except TorchkeepError as e:
        return f"{type(e).__name__}: {' '.join(str(e).split())}"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    return None


def verify_run(root: Path, names: Iterable[str]) -> list[dict[str, Any]]:
    """Verify checkpoints of a run, each shard file once however many checkpoints link it.

    Returns one ``{"file", "ok", "error", "shards", "shared"}`` per name: ``shards`` it holds,
    ``shared`` of those already checked for an older checkpoint; a damaged shared shard makes
    every checkpoint that links it fail, each naming the shard.
    """
    done: dict[tuple[int, int], str | None] = {}
    out = []
    for name in names:
        path = root / name
        row: dict[str, Any] = {"file": name, "ok": True, "error": None, "shards": 0, "shared": 0}
        try:
            if path.is_dir() and not path.is_symlink() and (path / SHARDS_INDEX).exists():
                shards = open_set(path)
                for shard in shards.index.shards:
                    row["shards"] += 1
                    spath = path / shard
                    try:
                        st = spath.lstat()
                        key = (st.st_dev, st.st_ino)
                    except OSError:
                        key = (-1, row["shards"])
                    if key in done:
                        row["shared"] += 1
                    else:
                        try:
                            shards.shard(shard)  # the one its index recorded
                            done[key] = _check_file(spath)
                        except TorchkeepError as e:
                            done[key] = f"{type(e).__name__}: {' '.join(str(e).split())}"
                    if done[key] is not None and row["ok"]:
                        row["ok"], row["error"] = False, f"shard {shard}: {done[key]}"
            elif name.endswith(".dcp") and path.is_dir():  # a distributed run's checkpoint directory
                row["shards"] = 1
                verify_all(path)
            else:
                row["shards"] = 1
                err = _check_file(path)
                row["ok"], row["error"] = err is None, err
        except TorchkeepError as e:
            row["ok"], row["error"] = False, f"{type(e).__name__}: {' '.join(str(e).split())}"
        out.append(row)
    return out

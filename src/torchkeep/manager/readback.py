"""Reading a checkpoint back right after the manager wrote it, before retention may delete an older one.

A save the loader would refuse (a reader limit the writer did not know, a file damaged or
rewritten between its write and its rename) must never replace the last checkpoint that loads.
So the manager checks the new file the way ``tk.load`` will read it:

* a local file: its header is parsed by the reader's own parser (every reader limit applies)
  and every tensor's checksum is recomputed from the file (through the page cache, which holds
  what was just written: about 0.2-0.4 s per GiB against 3.7-5 s for the durable write
  itself), and the manager's record in it must read back;
* an incremental checkpoint (``NAME.shards``, :mod:`.incremental`): every shard it just wrote is
  verified in full; a shard it links from the previous checkpoint is checked by its size and header
  sha256 against the record that checkpoint's index keeps (its data was verified when written, and
  ``torchkeep verify RUN`` checks it again); the index must read back byte for byte;
* on object storage: the header bytes just uploaded are parsed the same way and the record must
  read back (re-downloading the data would double the transfer; the upload streamed the bytes
  the checksums were computed from).

Example:
    >>> import torch, tempfile, torchkeep as tk
    >>> from torchkeep.storage import open_run
    >>> run = open_run(tempfile.mkdtemp())
    >>> with tk.CheckpointManager(run.location) as mgr:
    ...     info = mgr.save({"w": torch.ones(2)}, step=0)
    >>> check(run, info.file, *run.header(info.file))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torchkeep.errors import CorruptCheckpointError
from torchkeep.format.header import parse_header
from torchkeep.headers import HeaderFile
from torchkeep.manager import manifest
from torchkeep.manager.shardset import open_set
from torchkeep.storage.runs import SHARDS_INDEX

__all__ = ["check", "check_shards"]


def _fail(path: Any, e: CorruptCheckpointError | str) -> CorruptCheckpointError:
    reason = e.reason if isinstance(e, CorruptCheckpointError) else e
    return CorruptCheckpointError(
        path, f"the checkpoint just written does not read back ({reason}); it is not kept, and no older one was deleted"
    )


def _verify_file(path: Path) -> None:
    """Every checksum of a local file, through the reader's own parser; a file without checksums fails."""
    with HeaderFile(path, verify=True) as ck:
        if ck.header.checksums is None:
            raise CorruptCheckpointError(path, "it carries no checksums")
        ck.verify_all()


def check(store: Any, name: str, size: int, head: bytes) -> None:
    """Raise :class:`~torchkeep.errors.CorruptCheckpointError` unless the file ``name`` just written
    to ``store`` (``size`` bytes, whose header, length prefix included, is ``head``) reads back whole.

    Local files are verified in full (header, every checksum); on object storage the header.
    """
    path = store.path_of(name)
    if isinstance(path, Path):
        try:
            _verify_file(path)
        except CorruptCheckpointError as e:
            raise _fail(path, e) from e
    else:
        try:
            header = parse_header(lambda off, n: head[off : off + n], size, str(path))
        except CorruptCheckpointError as e:
            raise _fail(path, e) from e
        if header.checksums is None:
            raise _fail(path, "it carries no checksums")
    if manifest.from_header(name, size, head, store.path_of) is None:
        raise _fail(path, "the manager's record in its header does not read back")


def check_shards(path: Path, written: list[str], raw: bytes, name: str) -> None:
    """Raise :class:`~torchkeep.errors.CorruptCheckpointError` unless the incremental checkpoint directory
    ``path`` reads back: its index is ``raw``, every shard is the one it records, and the shards
    ``written`` by this save verify in full."""
    try:
        shards = open_set(path)
        if (path / SHARDS_INDEX).read_bytes() != raw:
            raise CorruptCheckpointError(path, "its index is not the one written")
        for shard in shards.index.shards:
            spath, _ = shards.shard(shard)
            if shard not in written:
                continue
            _verify_file(spath)
    except CorruptCheckpointError as e:
        raise _fail(path, e) from e
    if manifest.from_header(name, 0, raw, lambda n: path) is None:
        raise _fail(path, "the manager's record in its index does not read back")

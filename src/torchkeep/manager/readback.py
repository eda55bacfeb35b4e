"""Reading a checkpoint back right after the manager wrote it, before retention may delete an older one.

A save the loader would refuse (a reader limit the writer did not know, a file damaged or
rewritten between its write and its rename) must never replace the last checkpoint that loads.
So the manager checks the new file the way ``tk.load`` will read it:

* a local file: its header is parsed by the reader's own parser (every reader limit applies)
  and every tensor's checksum is recomputed from the file (through the page cache, which holds
  what was just written: about 0.2-0.4 s per GiB against 3.7-5 s for the durable write
  itself), and the manager's record in it must read back;
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

__all__ = ["check"]


def _fail(path: Any, e: CorruptCheckpointError | str) -> CorruptCheckpointError:
    reason = e.reason if isinstance(e, CorruptCheckpointError) else e
    return CorruptCheckpointError(
        path, f"the checkpoint just written does not read back ({reason}); it is not kept, and no older one was deleted"
    )


def check(store: Any, name: str, size: int, head: bytes) -> None:
    """Raise :class:`~torchkeep.errors.CorruptCheckpointError` unless the file ``name`` just written
    to ``store`` (``size`` bytes, whose header, length prefix included, is ``head``) reads back whole.

    Local files are verified in full (header, every checksum); on object storage the header.
    """
    path = store.path_of(name)
    if isinstance(path, Path):
        try:
            with HeaderFile(path, verify=True) as ck:
                if ck.header.checksums is None:
                    raise _fail(path, "it carries no checksums")
                ck.verify_all()
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

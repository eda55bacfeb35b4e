"""The container of a legacy ``torch.save`` file as torch reads it (no torch, no unpickling).

:func:`is_legacy` tells a ``torch.save`` file (zip, or a raw pickle from torch < 1.6) by its
first bytes; :func:`check_zip` refuses zip archives that torch would read differently from
Python's ``zipfile`` or that could expand beyond the file. :mod:`torchkeep.scan` analyses
the pickles inside; :mod:`torchkeep.legacy` loads them.
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

from torchkeep.errors import CorruptCheckpointError
from torchkeep.format.header import MAX_HEADER_SIZE

__all__ = ["MAX_ZIP_ENTRIES", "ZIP_MAGIC", "check_zip", "is_legacy"]

ZIP_MAGIC = b"PK\x03\x04"

#: More entries than this is not a checkpoint (torch.save writes about two per tensor).
MAX_ZIP_ENTRIES = 1_000_000
#: Stored (uncompressed) entries cannot hold more bytes than the file has; this covers rounding only.
_ZIP_SLACK = 4096
#: The smallest central directory record: 46 bytes plus the name.
_CENTRAL_RECORD = 46
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")


def is_legacy(head: bytes) -> bool:
    """True when the first 8 bytes are a ``torch.save`` zip archive or a raw pickle (torch < 1.6).

    A safetensors file also may start with ``0x80``: its first 8 bytes are the header length,
    and 1 in 256 lengths has ``0x80`` as low byte. So a raw pickle (``0x80``, protocol 2-5) only
    counts when those 8 bytes, read as a header length, exceed any header a reader accepts;
    a pickle's next opcodes make that number huge (torch's own magic number gives ~5e18).
    """
    if head.startswith(ZIP_MAGIC):
        return True
    return (
        len(head) >= 8
        and head[0] == 0x80
        and 2 <= head[1] <= 5
        and int.from_bytes(head[:8], "little") > MAX_HEADER_SIZE
    )


def check_zip(path: str | os.PathLike[str]) -> None:
    """Refuse a zip archive that could make a reader allocate more than the file holds.

    Reads the central directory and each entry's 30-byte local header only; nothing is
    decompressed. ``torch.save`` writes stored (uncompressed) entries, so every entry must be
    stored, lie inside the file, and all entries together cannot claim more bytes than the file
    has (overlapping entries, the classic zip bomb). Called before any ``torch.load`` of a zip.

    Raises:
        CorruptCheckpointError: naming the file and the first problem found.

    Example:
        >>> import torch, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "w.pt"); torch.save({"w": torch.ones(2)}, p)
        >>> check_zip(p)  # a real torch.save file passes
    """
    path = Path(path)
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        try:
            end = zipfile._EndRecData(fh)  # type: ignore[attr-defined]  # reads only the file's tail
        except (OSError, struct.error, ValueError):
            end = None
        if not end:
            raise CorruptCheckpointError(path, "not a zip archive (no end-of-central-directory record)")
        count, cd_size = int(end[4]), int(end[5])
        if count > MAX_ZIP_ENTRIES or count * _CENTRAL_RECORD > size or cd_size > size:
            raise CorruptCheckpointError(
                path,
                f"the zip directory claims {count:,} entries in {cd_size:,} bytes, more than a {size:,}-byte file holds",
            )
        try:
            with zipfile.ZipFile(fh) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, struct.error) as e:
            raise CorruptCheckpointError(
                path,
                f"not a readable zip archive ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})",
            ) from None
        if len(infos) > MAX_ZIP_ENTRIES:
            raise CorruptCheckpointError(path, f"{len(infos):,} zip entries, more than {MAX_ZIP_ENTRIES:,}")
        seen: set[str] = set()
        total = 0
        for info in infos:
            name = info.filename
            if name in seen:
                raise CorruptCheckpointError(path, f"zip entry {name!r} appears twice")
            seen.add(name)
            if info.flag_bits & 0x1:
                raise CorruptCheckpointError(path, f"zip entry {name!r} is encrypted")
            if info.compress_type != zipfile.ZIP_STORED:
                raise CorruptCheckpointError(
                    path,
                    f"zip entry {name!r} is compressed (method {info.compress_type}); torch.save stores entries uncompressed",
                )
            if info.compress_size != info.file_size:
                raise CorruptCheckpointError(
                    path, f"zip entry {name!r} is stored but claims {info.file_size:,} bytes in {info.compress_size:,}"
                )
            fh.seek(info.header_offset)
            local = fh.read(_LOCAL_HEADER.size)
            if len(local) < _LOCAL_HEADER.size or local[:4] != ZIP_MAGIC:
                raise CorruptCheckpointError(
                    path, f"zip entry {name!r} has no local header at offset {info.header_offset:,}"
                )
            name_len, extra_len = _LOCAL_HEADER.unpack(local)[-2:]
            end_of_data = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len + info.file_size
            if end_of_data > size:
                raise CorruptCheckpointError(
                    path, f"zip entry {name!r} claims {info.file_size:,} bytes, past the end of the {size:,}-byte file"
                )
            total += info.file_size
            if total > size + _ZIP_SLACK:
                raise CorruptCheckpointError(
                    path, f"the zip entries claim more bytes than the {size:,}-byte file holds (overlapping entries)"
                )

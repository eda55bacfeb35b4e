"""The container of a legacy ``torch.save`` file as torch reads it (no torch, no unpickling).

:func:`is_legacy` tells a ``torch.save`` file (zip, or a raw pickle from torch < 1.6) by its
first bytes. :func:`read_zip` reads a zip archive the way torch's reader (miniz, in
``caffe2/serialize/inline_container.cc``) does: the end record at the very end of the file, the
central directory at the offset that record names (not Python ``zipfile``'s adjusted guess),
entries looked up under the archive's one folder with ASCII case folding. It refuses anything
another reader could see differently (a second directory, local headers that disagree with the
central ones, overlapping, hidden or trailing bytes, unusual flag bits) and anything that would
make torch allocate more than the file holds (compressed records). :mod:`torchkeep.scan` reads
the pickles through the returned view; :mod:`torchkeep.legacy` loads them.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from torchkeep.errors import CorruptCheckpointError
from torchkeep.format.header import MAX_HEADER_SIZE

__all__ = ["MAX_ZIP_ENTRIES", "ZIP_MAGIC", "ZipEntry", "ZipView", "check_zip", "is_legacy", "read_zip"]

ZIP_MAGIC = b"PK\x03\x04"

#: More entries than this is not a checkpoint (torch.save writes about two per tensor).
MAX_ZIP_ENTRIES = 1_000_000

_EOCD = struct.Struct("<4s4H2LH")  # end of central directory: 22 bytes
_LOC64 = struct.Struct("<4sLQL")  # zip64 end-of-central-directory locator: 20 bytes
_EOCD64 = struct.Struct("<4sQ2H2L4Q")  # zip64 end-of-central-directory record: 56 bytes
_CENTRAL = struct.Struct("<4s6H3L5H2L")  # central directory record: 46 bytes + name, extra, comment
_LOCAL = struct.Struct("<4s5H3L2H")  # local header: 30 bytes + name, extra
_U16, _U32 = 0xFFFF, 0xFFFF_FFFF
#: Flag bits torch.save (bit 3: sizes in a data descriptor; bit 11: UTF-8 names) and Python's zipfile write.
_KNOWN_FLAGS = 0x0008 | 0x0800


@dataclass(frozen=True)
class ZipEntry:
    """One stored record: its name as stored, where its bytes start in the file, and how many."""

    raw: bytes
    offset: int
    size: int

    @property
    def name(self) -> str:
        return self.raw.decode("utf-8", "replace")


@dataclass(frozen=True)
class ZipView:
    """A zip archive as torch's reader sees it; every entry checked to lie inside the file."""

    prefix: bytes  # the archive's one top folder, without the slash
    entries: tuple[ZipEntry, ...]

    def find(self, record: str) -> ZipEntry | None:
        """The entry torch's ``getRecord(record)`` reads: ``prefix/record``, ASCII case folded, as miniz looks up."""
        want = (self.prefix + b"/" + record.encode()).lower()
        for entry in self.entries:
            if entry.raw.lower() == want:
                return entry
        return None

    def records(self) -> list[str]:
        """Entry names below the archive folder (what torch's ``get_all_records`` lists)."""
        return [e.raw[len(self.prefix) + 1 :].decode("utf-8", "replace") for e in self.entries]


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


def check_zip(path: str | os.PathLike[str]) -> ZipView:
    """Refuse a zip archive torch could read differently, or that could make it allocate more than the file.

    The same as :func:`read_zip`; kept under its old name. Called before any ``torch.load`` of a zip.

    Example:
        >>> import torch, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "w.pt"); torch.save({"w": torch.ones(2)}, p)
        >>> check_zip(p).find("data.pkl") is not None  # a real torch.save file passes
        True
    """
    return read_zip(path)


def read_zip(path: str | os.PathLike[str]) -> ZipView:
    """Read a zip archive's directory exactly as torch's reader will, refusing every ambiguity.

    Only the end records, the central directory and each entry's local header (and data
    descriptor) are read; nothing is decompressed. Required: the end record is the file's last
    22 bytes (no comment, nothing after it); the central directory sits at the offset it names
    and ends where the end records begin; every entry is stored (uncompressed), its local header
    agrees with its central record (name, flags, method, CRC, sizes), uses no flag bits beyond
    the data descriptor and UTF-8 names, and the entries tile the file from byte 0 to the
    directory with no gaps or overlaps; names are unique even ignoring ASCII case and all lie in
    one top folder. So no entry torch reads escapes the view, and no record can claim more bytes
    than the file holds.

    Raises:
        CorruptCheckpointError: naming the file and the first problem found.

    Example:
        >>> import torch, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "w.pt"); torch.save({"w": torch.ones(2)}, p)
        >>> sorted(e.name for e in read_zip(p).entries)[:2]
        ['w/.data/serialization_id', 'w/.format_version']
    """
    path = Path(path)
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        return _Reader(path, fh, size).read()


class _Reader:
    def __init__(self, path: Path, fh: BinaryIO, size: int) -> None:
        self.path, self.fh, self.size = path, fh, size

    def fail(self, why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(self.path, why)

    def at(self, offset: int, n: int) -> bytes:
        if offset < 0 or offset + n > self.size:
            return b""
        self.fh.seek(offset)
        return self.fh.read(n)

    def read(self) -> ZipView:
        cd_end, count, cd_size, cd_ofs = self._end_records()
        if count > MAX_ZIP_ENTRIES:
            raise self.fail(f"{count:,} zip entries, more than {MAX_ZIP_ENTRIES:,}")
        if count * _CENTRAL.size > cd_size or cd_size > self.size:
            raise self.fail(
                f"the zip directory claims {count:,} entries in {cd_size:,} bytes, "
                f"more than a {self.size:,}-byte file holds"
            )
        if cd_ofs + cd_size != cd_end:
            # Python's zipfile reads the directory just before the end record, torch's reader at the
            # named offset: when they differ the two see different archives (or prepended data)
            raise self.fail(
                f"the zip directory is named at offset {cd_ofs:,} with {cd_size:,} bytes but the end record "
                f"is at {cd_end:,}: two readers would see different directories (a second directory or hidden bytes)"
            )
        directory = self.at(cd_ofs, cd_size)
        if len(directory) != cd_size:
            raise self.fail("the zip directory lies past the end of the file")
        entries = self._central(directory, count)
        return self._layout(entries, cd_ofs)

    def _end_records(self) -> tuple[int, int, int, int]:
        if self.size < _EOCD.size + len(ZIP_MAGIC):
            raise self.fail("not a zip archive (too short for an end-of-central-directory record)")
        eocd_at = self.size - _EOCD.size
        sig, disk, cd_disk, n_disk, count, cd_size, cd_ofs, comment = _EOCD.unpack(self.at(eocd_at, _EOCD.size))
        if sig != b"PK\x05\x06" or comment != 0:
            raise self.fail(
                "not a zip archive as torch.save writes it: the end-of-central-directory record is not the "
                "file's last 22 bytes (a comment, trailing data, or no record at all)"
            )
        if disk or cd_disk or n_disk != count:
            raise self.fail("the zip archive spans several disks")
        loc = self.at(eocd_at - _LOC64.size, _LOC64.size) if eocd_at >= _LOC64.size + _EOCD64.size else b""
        if not loc.startswith(b"PK\x06\x07"):
            return eocd_at, count, cd_size, cd_ofs
        _, loc_disk, rec_ofs, disks = _LOC64.unpack(loc)
        rec_at = eocd_at - _LOC64.size - _EOCD64.size
        if rec_ofs != rec_at or loc_disk != 0 or disks != 1:
            # torch's reader reads the zip64 record at the offset the locator names, Python's just before it
            raise self.fail(
                f"the zip64 locator names a record at {rec_ofs:,}, not the one just before it at {rec_at:,}"
            )
        sig64, rec_size, _, _, disk64, cd_disk64, n_disk64, count64, size64, ofs64 = _EOCD64.unpack(
            self.at(rec_at, _EOCD64.size)
        )
        if sig64 != b"PK\x06\x06" or rec_size != _EOCD64.size - 12 or disk64 or cd_disk64 or n_disk64 != count64:
            raise self.fail("the zip64 end-of-central-directory record is missing or malformed")
        for name, small, big, sentinel in (
            ("entry count", count, count64, _U16),
            ("directory size", cd_size, size64, _U32),
            ("directory offset", cd_ofs, ofs64, _U32),
        ):
            if small != big and small != sentinel:
                raise self.fail(f"the zip and zip64 end records disagree on the {name} ({small:,} vs {big:,})")
        return rec_at, count64, size64, ofs64

    def _central(self, directory: bytes, count: int) -> list[tuple[bytes, int, int, int, int, int]]:
        """``(name, flags, crc, size, local header offset, directory position)`` for each central record."""
        out = []
        pos = 0
        for _ in range(count):
            head = directory[pos : pos + _CENTRAL.size]
            if len(head) < _CENTRAL.size or head[:4] != b"PK\x01\x02":
                raise self.fail(f"zip directory record {len(out)} is malformed")
            (_, _, _, flags, method, _, _, crc, csize, usize, nlen, elen, clen, disk, _, _, loff) = _CENTRAL.unpack(
                head
            )
            end = pos + _CENTRAL.size + nlen + elen + clen
            if end > len(directory):
                raise self.fail(f"zip directory record {len(out)} runs past the directory")
            name = directory[pos + _CENTRAL.size : pos + _CENTRAL.size + nlen]
            extra = directory[pos + _CENTRAL.size + nlen : pos + _CENTRAL.size + nlen + elen]
            shown = name.decode("utf-8", "replace")
            usize, csize, loff, disk = self._zip64(extra, [usize, csize, loff, disk], shown)
            self._flags_and_method(shown, flags, method)
            if csize != usize:
                raise self.fail(f"zip entry {shown!r} is stored but claims {usize:,} bytes in {csize:,}")
            if disk != 0:
                raise self.fail(f"zip entry {shown!r} is on another disk")
            if not name:
                raise self.fail(f"zip directory record {len(out)} has an empty name")
            out.append((name, flags, crc, usize, loff, pos))
            pos = end
        if pos != len(directory):
            # Python's zipfile reads records until the directory size is used up, torch's reader reads
            # `count` records: extra bytes would be entries only one of them sees
            raise self.fail(
                f"the zip directory holds {len(directory) - pos:,} bytes after its {count:,} records "
                "(entries one reader would see and another not)"
            )
        return out

    def _flags_and_method(self, shown: str, flags: int, method: int) -> None:
        if flags & 0x1:
            raise self.fail(f"zip entry {shown!r} is encrypted")
        if flags & ~_KNOWN_FLAGS:
            raise self.fail(
                f"zip entry {shown!r} sets unusual flag bits {flags & ~_KNOWN_FLAGS:#06x} "
                "(torch.save sets only the data-descriptor and UTF-8 bits)"
            )
        if method != 0:
            raise self.fail(
                f"zip entry {shown!r} is compressed (method {method}); torch.save stores entries uncompressed, "
                "and torch would allocate the size the record declares"
            )

    def _zip64(self, extra: bytes, fields: list[int], shown: str) -> list[int]:
        """The zip64 extended-information field replaces the 32-bit values that hold their sentinel, in order."""
        sentinels = (_U32, _U32, _U32, _U16)
        pos = 0
        found = None
        while pos < len(extra):
            if pos + 4 > len(extra):
                raise self.fail(f"zip entry {shown!r} has a malformed extra field")
            tag, n = struct.unpack_from("<2H", extra, pos)
            if pos + 4 + n > len(extra):
                raise self.fail(f"zip entry {shown!r} has a malformed extra field")
            if tag == 0x0001:
                if found is not None:
                    raise self.fail(f"zip entry {shown!r} has two zip64 extra fields")
                found = extra[pos + 4 : pos + 4 + n]
            pos += 4 + n
        out = list(fields)
        at = 0
        for i, sentinel in enumerate(sentinels):
            if fields[i] != sentinel:
                continue
            width = 4 if i == 3 else 8
            if found is None or at + width > len(found):
                raise self.fail(f"zip entry {shown!r} needs zip64 sizes it does not carry")
            out[i] = int.from_bytes(found[at : at + width], "little")
            at += width
        return out

    def _layout(self, central: list[tuple[bytes, int, int, int, int, int]], cd_ofs: int) -> ZipView:
        seen: dict[bytes, bytes] = {}
        for name, *_ in central:
            folded = name.lower()  # ASCII only, as miniz compares names
            if folded in seen:
                what = "twice" if seen[folded] == name else f"twice (as {seen[folded]!r} and {name!r}, ignoring case)"
                raise self.fail(f"zip entry {name.decode('utf-8', 'replace')!r} appears {what}")
            seen[folded] = name
        first = central[0][0] if central else b""
        if b"/" not in first:
            raise self.fail("the zip archive's first entry is not in a folder (torch's reader refuses it)")
        prefix = first.split(b"/", 1)[0]
        for name, *_ in central:
            if not name.startswith(prefix + b"/"):
                raise self.fail(
                    f"zip entry {name.decode('utf-8', 'replace')!r} is outside the archive folder {prefix.decode('utf-8', 'replace')!r}"
                )
        entries = []
        expected = 0
        for name, flags, crc, size, loff, _ in sorted(central, key=lambda c: c[4]):
            shown = name.decode("utf-8", "replace")
            if loff != expected:
                where = (
                    "overlaps the entry before it"
                    if loff < expected
                    else f"leaves {loff - expected:,} unread bytes before it"
                )
                raise self.fail(f"zip entry {shown!r} at offset {loff:,} {where} (overlapping or hidden data)")
            start, end = self._local(shown, name, flags, crc, size, loff)
            entries.append(ZipEntry(name, start, size))
            expected = end
        if expected != cd_ofs:
            raise self.fail(
                f"{cd_ofs - expected:,} bytes between the last zip entry and the directory (hidden data)"
                if expected < cd_ofs
                else "the zip entries run into the directory (overlapping data)"
            )
        order = {c[0]: i for i, c in enumerate(central)}
        return ZipView(prefix, tuple(sorted(entries, key=lambda e: order[e.raw])))

    def _local(self, shown: str, name: bytes, flags: int, crc: int, size: int, loff: int) -> tuple[int, int]:
        """``(data start, end of the entry incl. its data descriptor)``, the local header checked against the central."""
        head = self.at(loff, _LOCAL.size)
        if len(head) < _LOCAL.size or head[:4] != ZIP_MAGIC:
            raise self.fail(f"zip entry {shown!r} has no local header at offset {loff:,}")
        _, _, lflags, lmethod, _, _, lcrc, lcsize, lusize, nlen, elen = _LOCAL.unpack(head)
        lname = self.at(loff + _LOCAL.size, nlen)
        if lname != name or lflags != flags or lmethod != 0:
            raise self.fail(
                f"zip entry {shown!r}: its local header disagrees with the directory (name, flags or method)"
            )
        start = loff + _LOCAL.size + nlen + elen
        if start + size > self.size:
            raise self.fail(f"zip entry {shown!r} claims {size:,} bytes, past the end of the {self.size:,}-byte file")
        if lusize == _U32 or lcsize == _U32:
            lusize, lcsize = self._zip64(self.at(loff + _LOCAL.size + nlen, elen), [lusize, lcsize, 0, 0], shown)[:2]
        if flags & 0x8:
            if (lcrc, lcsize, lusize) not in ((0, 0, 0), (crc, size, size)):
                raise self.fail(f"zip entry {shown!r}: its local header disagrees with the directory (CRC or sizes)")
            return start, start + size + self._descriptor(shown, start + size, crc, size)
        if (lcrc, lcsize, lusize) != (crc, size, size):
            raise self.fail(f"zip entry {shown!r}: its local header disagrees with the directory (CRC or sizes)")
        return start, start + size

    def _descriptor(self, shown: str, at: int, crc: int, size: int) -> int:
        """The length of the data descriptor after an entry's data (signature, CRC, 32- or 64-bit sizes)."""
        for fmt in ("<4s3L", "<4sL2Q"):
            n = struct.calcsize(fmt)
            raw = self.at(at, n)
            if len(raw) == n and struct.unpack(fmt, raw) == (b"PK\x07\x08", crc, size, size):
                return n
        raise self.fail(f"zip entry {shown!r} has no data descriptor matching its directory record")

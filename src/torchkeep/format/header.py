"""The safetensors header of a torchkeep file: layout, building, sealing and parsing.

A file is ``<u64 little-endian N><N bytes of JSON header, space padded><data>``, exactly
as safetensors defines it. torchkeep adds, inside ``__metadata__``:

- ``torchkeep.header_digest`` first, so it sits at a fixed byte offset: the xxh3-128
  digest of the length prefix plus the header bytes with this value zeroed. A flipped
  bit anywhere in the first ``8 + N`` bytes changes it.
- ``torchkeep.checksums``: ``{tensor name: xxh3-128 hex}`` of every tensor's bytes.
- ``torchkeep.format``, ``torchkeep.tree`` (the typed JSON skeleton) and provenance keys.

Checksums are fixed-length hex, so the header is laid out once with zeroed
placeholders, the data is written (and hashed) after it, and the final header is the
same length: :meth:`HeaderBuilder.seal` only substitutes digits.

Nothing here does I/O: the reader takes a ``read(offset, size)`` callable.
"""

from __future__ import annotations

import json
import math
import operator
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as encode_basestring
from typing import NamedTuple, NoReturn

import xxhash

from torchkeep.errors import ChecksumMismatchError, CorruptCheckpointError, InvalidArgumentError, UnsupportedDtypeError
from torchkeep.format.dtypes import ITEMSIZE
from torchkeep.format.limits import MAX_DIM, MAX_HEADER_SIZE, MAX_RANK, check_header_size, shape_error

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "HASH_NAME",
    "MAX_HEADER_SIZE",
    "HashState",
    "Header",
    "HeaderBuilder",
    "TensorSpec",
    "digest",
    "is_torchkeep_file",
    "parse_header",
]

FORMAT_NAME = "torchkeep"
FORMAT_VERSION = 1
HASH_NAME = "xxh3-128"
DIGEST_KEY = "torchkeep.header_digest"
CHECKSUMS_KEY = "torchkeep.checksums"
FORMAT_KEY = "torchkeep.format"
_ZERO = "0" * 32
_PREFIX = b'{"__metadata__":{"' + DIGEST_KEY.encode() + b'":"'

HashState = xxhash.xxh3_128


def digest(data: bytes | memoryview) -> str:
    """xxh3-128 hex digest, the checksum stored for every tensor and the header."""
    return xxhash.xxh3_128_hexdigest(data)


class TensorSpec(NamedTuple):
    """One tensor entry of a header; ``start``/``end`` are offsets into the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _pad(raw: bytes) -> bytes:
    # safetensors pads the header with spaces so the data section is 8-byte aligned.
    return raw + b" " * (-len(raw) % 8)


class HeaderBuilder:
    """Lays out tensors and metadata; produces the sealed header once checksums are known.

    Args:
        entries: ``(name, safetensors dtype, shape)`` in tree order.
        metadata: string metadata; torchkeep's own keys are added by the caller.

    Tensors are ordered by element size (largest first, stable), so every tensor
    starts at a multiple of its own element size, as safetensors' writer does.
    ``torchkeep.checksums`` is the concatenated 32-digit hex digests of the tensors in
    data order (fixed width: sealing never moves a byte).

    Example:
        >>> b = HeaderBuilder([("w", "F32", (2,))], {"torchkeep.format": "torchkeep/1"})
        >>> [s.name for s in b.specs]
        ['w']
        >>> len(b.seal([digest(b"\\0" * 8)])) == b.header_size
        True
    """

    def __init__(
        self, entries: Sequence[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str], *, where: str = "obj"
    ) -> None:
        for name, _, shape in entries:
            if len(shape) > MAX_RANK:  # the reader's limit (torchkeep.format.limits), checked before writing
                raise InvalidArgumentError(
                    where, f"<tensor {name}>", f"{shape_error(list(shape))}; nothing was written"
                )
        order = sorted(range(len(entries)), key=lambda i: -ITEMSIZE[entries[i][1]])
        specs: list[TensorSpec] = []
        parts: list[str] = []
        offset = 0
        enc = encode_basestring
        for i in order:
            name, st, shape = entries[i]
            end = offset + math.prod(shape) * ITEMSIZE[st]
            specs.append(TensorSpec(name, st, shape, offset, end))
            parts.append(
                f'{enc(name)}:{{"dtype":"{st}","shape":[{",".join(map(str, shape))}],"data_offsets":[{offset},{end}]}}'
            )
            offset = end
        self.specs = specs
        self.data_size = offset
        meta = {DIGEST_KEY: _ZERO, **metadata}
        meta_text = json.dumps(meta, separators=(",", ":"), ensure_ascii=False)
        # the checksums value goes last in __metadata__, then the tensor entries
        self._before = ('{"__metadata__":' + meta_text[:-1] + f',"{CHECKSUMS_KEY}":"').encode()
        self._after = ('"}' + "".join("," + p for p in parts) + "}").encode()
        self.header_size = 8 + len(_pad(self._before + (_ZERO * len(specs)).encode() + self._after))
        check_header_size(self.header_size - 8, len(specs), where)

    def seal(self, checksums: Sequence[str]) -> bytes:
        """The complete ``8 + N`` header bytes, given one hex checksum per spec (data order)."""
        if len(checksums) != len(self.specs) or any(len(h) != 32 for h in checksums):
            raise ValueError("seal() needs one 32-digit hex checksum per tensor")
        body = _pad(self._before + "".join(checksums).encode() + self._after)
        prefix = struct.pack("<Q", len(body))
        sealed_digest = digest(prefix + body).encode()
        start = len(_PREFIX)
        return prefix + body[:start] + sealed_digest + body[start + 32 :]


@dataclass
class Header:
    """A parsed, validated header.

    Attributes:
        size: bytes before the data section (``8 + N``).
        tensors: name -> spec, in data order.
        metadata: the ``__metadata__`` strings.
        checksums: name -> hex digest, for torchkeep files (else ``None``).
    """

    size: int
    tensors: dict[str, TensorSpec]
    metadata: dict[str, str]
    checksums: dict[str, str] | None = None
    file_size: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def is_torchkeep(self) -> bool:
        return self.metadata.get(FORMAT_KEY, "").startswith(FORMAT_NAME)


_OWN_KEYS = (FORMAT_KEY.encode(), CHECKSUMS_KEY.encode(), b'"torchkeep.tree"')


def _looks_torchkeep(raw: bytes) -> bool:
    return raw.startswith(_PREFIX) or any(k in raw for k in _OWN_KEYS)


def is_torchkeep_file(read: Callable[[int, int], bytes], file_size: int, path: str) -> bool:
    """Whether a safetensors file is a torchkeep file, without parsing its header when its first bytes say so.

    A torchkeep header starts with the header digest key at a fixed offset: that prefix (and a
    plausible length) is enough to tell the kind. Anything else is parsed in full, which also
    raises the typed error of a file that is not a readable safetensors file. Checksums are the
    reader's job: a torchkeep file is still parsed and verified when it is opened.

    Raises:
        CorruptCheckpointError, ChecksumMismatchError: as :func:`parse_header`, when the prefix does not decide.
    """
    if file_size >= 8 + len(_PREFIX):
        (n,) = struct.unpack("<Q", read(0, 8))
        if 2 <= n <= MAX_HEADER_SIZE and 8 + n <= file_size and read(8, len(_PREFIX)) == _PREFIX:
            return True
    return parse_header(read, file_size, path).is_torchkeep


def parse_header(read: Callable[[int, int], bytes], file_size: int, path: str) -> Header:
    """Read and validate the header of a safetensors/torchkeep file.

    Args:
        read: ``read(offset, size) -> bytes`` over the file.
        file_size: the file's size in bytes.
        path: used in error messages.

    Raises:
        CorruptCheckpointError: empty, truncated, bad JSON, bad offsets, header bomb.
        ChecksumMismatchError: a torchkeep header whose digest does not match.
        UnsupportedDtypeError: a dtype this torch build cannot represent.
    """
    if file_size == 0:
        raise CorruptCheckpointError(path, "the file is empty (0 bytes)")
    if file_size < 8:
        raise CorruptCheckpointError(path, f"the file is {file_size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", read(0, 8))
    if n < 2 or n > MAX_HEADER_SIZE or 8 + n > file_size:
        probe = read(8, len(_PREFIX))
        if probe == _PREFIX:
            raise ChecksumMismatchError(
                path,
                "<header>",
                detail=f"its length field says {n} bytes in a {file_size}-byte file: truncated or damaged",
            )
        if n > MAX_HEADER_SIZE:
            raise CorruptCheckpointError(path, f"header length {n} exceeds the {MAX_HEADER_SIZE}-byte limit")
        raise CorruptCheckpointError(
            path, f"header length {n} does not fit in a {file_size}-byte file (truncated or not a safetensors file)"
        )
    raw = read(8, n)
    if len(raw) != n:
        raise CorruptCheckpointError(path, "the file was truncated while reading the header")
    torchkeep = _looks_torchkeep(raw)
    if raw.startswith(_PREFIX):
        start = len(_PREFIX)
        stored = raw[start : start + 32].decode("latin-1")
        actual = digest(struct.pack("<Q", n) + raw[:start] + _ZERO.encode() + raw[start + 32 :])
        if stored != actual:
            raise ChecksumMismatchError(path, "<header>", stored, actual)
    try:
        head = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        if torchkeep:
            raise ChecksumMismatchError(path, "<header>") from None
        raise CorruptCheckpointError(path, f"the header is not valid JSON ({e})") from None
    if not isinstance(head, dict):
        raise CorruptCheckpointError(path, "the header is not a JSON object")
    meta = head.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptCheckpointError(path, "__metadata__ must map strings to strings")
    if torchkeep and not raw.startswith(_PREFIX):
        raise ChecksumMismatchError(path, "<header>")
    data_size = file_size - 8 - n
    specs = _validate_entries(head, data_size, path)
    checksums = None
    if CHECKSUMS_KEY in meta:
        hexes = meta[CHECKSUMS_KEY]
        names = list(specs)
        if len(hexes) != 32 * len(names):
            raise CorruptCheckpointError(path, "torchkeep.checksums does not hold one digest per stored tensor")
        checksums = {name: hexes[32 * i : 32 * i + 32] for i, name in enumerate(names)}
    return Header(size=8 + n, tensors=specs, metadata=meta, checksums=checksums, file_size=file_size)


_OFFSETS = operator.itemgetter(3, 4)  # a TensorSpec's (start, end)


def _validate_entries(head: dict, data_size: int, path: str) -> dict[str, TensorSpec]:
    specs: list[TensorSpec] = []
    itemsize = ITEMSIZE
    for name, info in head.items():
        try:
            st = info["dtype"]
            shape = info["shape"]
            start, end = info["data_offsets"]
            size = n = itemsize[st]
            if type(shape) is list and len(shape) <= MAX_RANK:  # what JSON gives: checked inline, one pass
                for d in shape:
                    if type(d) is not int or d < 0:
                        raise ValueError
                    n *= d
                if (n == 0 or n > MAX_DIM) and shape_error(shape, size):  # the limit is on the nonzero dims
                    raise ValueError
            else:
                raise ValueError
            if type(start) is not int or type(end) is not int:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            _entry_error(name, info, path)
        if not 0 <= start <= end <= data_size:
            raise CorruptCheckpointError(
                path, f"tensor {name!r} spans bytes [{start}, {end}) outside the {data_size}-byte data section"
            )
        if end - start != n:
            raise CorruptCheckpointError(path, f"tensor {name!r}: {end - start} bytes stored for shape {shape} of {st}")
        specs.append(TensorSpec(name, st, tuple(shape), start, end))
    specs.sort(key=_OFFSETS)
    pos = 0
    for s in specs:
        if s.start < pos:
            raise CorruptCheckpointError(path, f"tensor {s.name!r} overlaps the tensor stored before it")
        if s.start > pos:
            raise CorruptCheckpointError(path, f"a {s.start - pos}-byte hole before tensor {s.name!r}")
        pos = s.end
    if pos != data_size:
        raise CorruptCheckpointError(
            path, f"the data section is {data_size} bytes but the tensors cover {pos} (truncated or padded)"
        )
    return {s.name: s for s in specs}


def _entry_error(name: str, info: object, path: str) -> NoReturn:
    """Raise the precise error for a malformed tensor entry."""
    if not isinstance(info, dict):
        raise CorruptCheckpointError(path, f"entry {name!r} is not an object")
    st, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(st, str):
        raise CorruptCheckpointError(path, f"tensor {name!r} has no dtype")
    if st not in ITEMSIZE:
        raise UnsupportedDtypeError(f"{path}: tensor {name!r}", st)
    problem = shape_error(shape, ITEMSIZE[st])
    if problem:
        raise CorruptCheckpointError(path, f"tensor {name!r}: {problem}")
    raise CorruptCheckpointError(path, f"tensor {name!r} has invalid data_offsets {offs!r}")

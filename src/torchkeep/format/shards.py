"""Sharded checkpoints, pure: sizes, shard naming, splitting and the one index parser (no torch, no I/O).

A sharded checkpoint is ``name-00001-of-0000N.safetensors`` files beside
``name.safetensors.index.json``: ``{"metadata": {"total_size": N, ...}, "weight_map": {tensor: shard}}``,
the Hugging Face convention (``save_pretrained``, ``convert --max-shard-size`` and ``save_model``
write it). torchkeep's own indexes add ``torchkeep.format``, ``torchkeep.tree`` and
``torchkeep.user`` to the index metadata.

Example:
    >>> shard_names("model.safetensors", 2)
    (['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors'], 'model.safetensors.index.json')
    >>> split_shards([("a", 6), ("b", 6), ("c", 20)], 10)
    [['a'], ['b'], ['c']]
    >>> parse_index(b'{"weight_map": {"w": "m-1.safetensors"}}', "i.json").shards
    ['m-1.safetensors']
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torchkeep.errors import ConversionError, CorruptCheckpointError

__all__ = [
    "INDEX_SUFFIX",
    "Index",
    "index_bytes",
    "is_index_name",
    "looks_like_index",
    "parse_index",
    "parse_size",
    "shard_names",
    "split_shards",
]

INDEX_SUFFIX = ".index.json"
#: the most bytes an index file may have (the largest hub indexes are a few MB)
MAX_INDEX_SIZE = 64 << 20
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(value: int | str | None, what: str = "max_shard_size") -> int | None:
    """Bytes from ``5000``, ``"500MB"``, ``"5GB"`` (powers of 1000) or ``"4GiB"`` (powers of 1024).

    ``what`` names the option in errors.

    Example:
        >>> parse_size("5GB"), parse_size("1.5KiB"), parse_size(100), parse_size(None)
        (5000000000, 1536, 100, None)
    """
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", str(value), re.IGNORECASE)
        if m is None:
            raise ConversionError(f"{what} {value!r} is not a size; write it like 5GB, 500MB, 4GiB or 1000000")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    if n <= 0:
        raise ConversionError(f"{what} must be positive, got {value!r}")
    return n


def is_index_name(name: str) -> bool:
    """True for a name ending in ``.index.json`` (a hint for output naming only: inputs are detected by content)."""
    return name.endswith(INDEX_SUFFIX)


def shard_names(name: str, n: int) -> tuple[list[str], str]:
    """``(shard file names, index file name)`` for ``n`` shards of ``name`` (HF naming).

    ``name`` is the single-file name (``model.safetensors``) or the index name.
    """
    if is_index_name(name):
        name = name[: -len(INDEX_SUFFIX)]
    stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else name
    return [f"{stem}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)], f"{stem}.safetensors{INDEX_SUFFIX}"


def split_shards(sizes: Iterable[tuple[str, int]], limit: int) -> list[list[str]]:
    """Names grouped greedily, in order, into shards of at most ``limit`` bytes; a larger tensor gets its own."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, n in sizes:
        if groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    return groups


@dataclass
class Index:
    """A parsed shard index.

    Attributes:
        weight_map: tensor name -> shard file name (a plain name beside the index).
        metadata: the index's ``metadata`` object ({} when absent).
        shards: the shard file names, each once, in order of first mention.
    """

    weight_map: dict[str, str]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def shards(self) -> list[str]:
        return list(dict.fromkeys(self.weight_map.values()))

    def names_in(self, shard: str) -> list[str]:
        """The tensor names the index places in ``shard``."""
        return [n for n, f in self.weight_map.items() if f == shard]


def looks_like_index(raw: bytes) -> bool:
    """Content sniffing: a JSON object that mentions ``"weight_map"`` near its start or anywhere."""
    head = raw.lstrip()[:1]
    return head == b"{" and b'"weight_map"' in raw


def parse_index(raw: bytes, where: Any) -> Index:
    """The one shard-index parser: validates the JSON and that every shard is a plain file name.

    Raises:
        CorruptCheckpointError: not JSON, no ``weight_map`` object, a name that is not a string,
            or a shard named by a path (``../x``, ``/abs``, ``a/b``): shards lie beside their index.
    """
    if len(raw) > MAX_INDEX_SIZE:
        raise CorruptCheckpointError(where, f"the index is {len(raw)} bytes, more than an index can be")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptCheckpointError(where, f"the index is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
        raise CorruptCheckpointError(where, 'the index has no "weight_map" object')
    weight_map = data["weight_map"]
    for name, f in weight_map.items():
        if not isinstance(f, str) or "/" in f or "\\" in f or f in ("", ".", ".."):
            raise CorruptCheckpointError(where, f"the weight_map names {f!r} for {name!r}, not a file beside the index")
    meta = data.get("metadata")
    return Index(dict(weight_map), meta if isinstance(meta, dict) else {})


def _members(obj: dict[str, Any]) -> str:
    """``obj``'s members, one per line at depth 2; each value as compact one-line JSON."""
    if not obj:
        return "{}"
    lines = [f"    {json.dumps(k, ensure_ascii=False)}: {json.dumps(v, ensure_ascii=False)}" for k, v in obj.items()]
    return "{\n" + ",\n".join(lines) + "\n  }"


def index_bytes(weight_map: dict[str, str], total_size: int, metadata: dict[str, Any] | None = None) -> bytes:
    """The index file's bytes, as ``save_pretrained`` lays them out (indented JSON, newline-terminated).

    Values inside ``metadata`` (a state tree's skeleton) are written on one line each: indenting
    them in full would cost tens of milliseconds per save through Python's pure-Python encoder.

    Example:
        >>> json.loads(index_bytes({"w": "model.safetensors"}, 4))["weight_map"]
        {'w': 'model.safetensors'}
    """
    meta = _members({"total_size": total_size, **(metadata or {})})
    return f'{{\n  "metadata": {meta},\n  "weight_map": {_members(weight_map)}\n}}\n'.encode()

"""Reading ``torch.distributed.checkpoint`` (DCP) directories without running their pickle.

A DCP directory holds ``.metadata`` — a **pickle** of DCP's own metadata classes — and
``__<rank>_<n>.distcp`` data files. ``torch.distributed.checkpoint`` unpickles ``.metadata``
with the full unpickler. torchkeep instead reads it with an allowlist unpickler that can
only build DCP's metadata dataclasses, paths, dtypes and sizes; anything else in it is
refused. Before any data is read, every data file the metadata names must exist and hold
the byte ranges it claims (a checkpoint cut short by a crash is refused, not half-read).

Example:
    >>> import torch, tempfile, warnings
    >>> import torch.distributed.checkpoint as dcp
    >>> d = tempfile.mkdtemp()
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     _ = dcp.save({"w": torch.ones(2)}, checkpoint_id=d, no_dist=True)
    >>> read_dcp(d)["w"].tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

import io
import math
import os
import pickle
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from torchkeep.errors import CorruptCheckpointError, MissingShardError, UnsafeCheckpointError
from torchkeep.format.limits import shape_error

__all__ = [
    "check_chunks",
    "check_complete",
    "check_ranges",
    "dcp_errors",
    "first_failure",
    "is_dcp_dir",
    "metadata_from_bytes",
    "read_dcp",
    "read_metadata",
    "safe_reader",
]

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[str, set[str]] = {
    _DCP_METADATA: {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"LoadItemType", "WriteItemType"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size", "device"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")


def is_dcp_dir(path: Path) -> bool:
    """True for a directory holding a DCP ``.metadata`` file."""
    return path.is_dir() and (path / ".metadata").is_file()


def _read_metadata(path: Path) -> Any:
    meta = path / ".metadata"
    with open(meta, "rb") as f:
        raw = f.read()
    return metadata_from_bytes(raw, meta)


def metadata_from_bytes(raw: bytes, where: Any) -> Any:
    """DCP's ``Metadata`` from the bytes of a ``.metadata`` file, by the allowlist unpickler.

    ``where`` names the file in errors (a path or a URL).

    Raises:
        UnsafeCheckpointError: the pickle needs classes beyond DCP's metadata.
        CorruptCheckpointError: unreadable metadata.

    Example:
        >>> metadata_from_bytes(b"cos\\nsystem\\n.", "x/.metadata")
        Traceback (most recent call last):
        ...
        torchkeep.errors.UnsafeCheckpointError: x/.metadata: ...
    """
    try:
        md = _MetadataUnpickler(io.BytesIO(raw)).load()
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            where, f"DCP metadata is a pickle, and this one needs more than DCP's metadata classes ({e})"
        ) from None
    except (EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise CorruptCheckpointError(where, f"unreadable DCP metadata ({type(e).__name__}: {e})") from None
    if type(md).__name__ != "Metadata" or not hasattr(md, "state_dict_metadata"):
        raise CorruptCheckpointError(where, "the .metadata pickle does not hold DCP Metadata")
    return md


def _check_complete(path: Path, md: Any) -> None:
    """Every data file named must exist and hold the byte ranges the metadata claims."""

    def size(rel: str) -> int | None:
        p = path / rel
        return p.stat().st_size if p.is_file() else None

    check_ranges(path, md, size)


def check_ranges(where: Any, md: Any, size: Any) -> None:
    """Raise unless every data file ``md`` names has a ``size(name)`` (``None``: missing) covering its ranges.

    ``where`` (a directory or URL) names the checkpoint in errors.

    Raises:
        MissingShardError / CorruptCheckpointError: the checkpoint is incomplete.
    """
    ends: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        rel = str(info.relative_path)
        if os.path.isabs(rel) or ".." in Path(rel).parts or "://" in rel:
            raise CorruptCheckpointError(where, f"DCP metadata names a data file outside the directory: {rel!r}")
        ends[rel] = max(ends.get(rel, 0), int(info.offset) + int(info.length))
    sizes = {rel: size(rel) for rel in ends}
    missing = [rel for rel, n in sizes.items() if n is None]
    if missing:
        raise MissingShardError(f"{str(where).rstrip('/')}/.metadata", missing)
    short = [rel for rel, end in ends.items() if (sizes[rel] or 0) < end]
    if short:
        raise CorruptCheckpointError(
            where, f"DCP data files shorter than the metadata says (an interrupted save?): {', '.join(sorted(short))}"
        )


#: the most a compressed (transformed) DCP chunk may expand: the documented cap on allocation for such files
_MAX_TRANSFORM_RATIO = 1024


def check_chunks(where: Any, md: Any) -> None:
    """Raise unless every tensor's chunks cover it exactly and read bytes of their own.

    Checked before anything is allocated or read: each chunk lies inside its tensor, has
    stored data, no two chunks overlap and together they cover every element (so a tensor is
    never handed out with memory no chunk wrote); no two chunks read the same bytes, and every
    tensor's elements fit in the bytes stored for it (so no file asks for more memory than it
    holds: a stored chunk is a ``torch.save`` of at least its values).

    Raises:
        CorruptCheckpointError: naming the tensor and what is wrong.
    """
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    storage = md.storage_data or {}
    used: dict[str, list[tuple[int, int, str]]] = {}
    for fqn, m in md.state_dict_metadata.items():
        if not isinstance(m, TensorStorageMetadata):
            continue
        name = str(fqn)[:200]
        size = tuple(m.size)
        itemsize = torch.empty((), dtype=m.properties.dtype).element_size()
        problem = shape_error(list(size), itemsize)
        if problem:
            raise CorruptCheckpointError(where, f"tensor {name!r}: {problem}")
        boxes = []
        stored = 0
        transformed = False
        for chunk in m.chunks:
            off, sz = tuple(chunk.offsets), tuple(chunk.sizes)
            if (
                len(off) != len(size)
                or len(sz) != len(size)
                or shape_error(list(off)) is not None
                or shape_error(list(sz)) is not None
                or any(o + n > d for o, n, d in zip(off, sz, size, strict=True))
            ):
                raise CorruptCheckpointError(
                    where, f"tensor {name!r} of shape {list(size)} has a chunk at {list(off)} of {list(sz)} outside it"
                )
            info = storage.get(MetadataIndex(fqn, torch.Size(off)))
            if info is None:
                raise CorruptCheckpointError(where, f"tensor {name!r} has a chunk at {list(off)} with no data stored")
            length = int(info.length)
            transformed = transformed or bool(getattr(info, "transform_descriptors", None))
            used.setdefault(str(info.relative_path), []).append((int(info.offset), length, name))
            stored += length
            if math.prod(sz):
                boxes.append((off, sz))
        covered = sum(math.prod(sz) for _, sz in boxes)
        numel = math.prod(size)
        if covered != numel or _overlap(boxes):
            raise CorruptCheckpointError(
                where,
                f"the chunks of tensor {name!r} cover {covered:,} of its {numel:,} elements"
                + (", overlapping" if covered >= numel else "")
                + ": they must cover it exactly, once (a damaged or crafted .metadata)",
            )
        # a chunk is stored as a torch.save of at least its values; compressed (transformed) chunks up to a cap
        ratio = _MAX_TRANSFORM_RATIO if transformed else 1
        if numel * itemsize > stored * ratio:
            raise CorruptCheckpointError(
                where, f"tensor {name!r} declares {numel * itemsize:,} bytes but its chunks store {stored:,}"
            )
    for rel, ranges in used.items():
        ranges.sort()
        end, last = 0, ""
        for start, n, x in ranges:
            if n and start < end:
                raise CorruptCheckpointError(
                    where,
                    f"chunks of {last!r} and {x!r} read the same bytes of {rel!r} (at {start:,}): a crafted .metadata",
                )
            if start + n > end:
                end, last = start + n, x


def _overlap(boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> bool:
    """Whether any two boxes ``(offsets, sizes)`` share an element (sweep along the first dimension)."""
    if not boxes or not boxes[0][0]:
        return len(boxes) > 1  # 0-d tensors: one chunk
    boxes = sorted(boxes)
    active: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for off, sz in boxes:
        active = [(o, s) for o, s in active if o[0] + s[0] > off[0]]
        for o, s in active:
            if all(a < c + m and c < a + n for a, n, c, m in zip(off, sz, o, s, strict=True)):
                return True
        active.append((off, sz))
    return False


def read_metadata(path: str | os.PathLike[str]) -> Any:
    """DCP's ``Metadata`` of a directory, read by the allowlist unpickler (never ``pickle.load``).

    Raises:
        UnsafeCheckpointError: ``.metadata`` needs classes beyond DCP's metadata.
        CorruptCheckpointError: unreadable metadata.
    """
    return _read_metadata(Path(os.fspath(path)))


def check_complete(path: str | os.PathLike[str], md: Any) -> None:
    """Raise unless every data file ``md`` names exists and holds the byte ranges it claims.

    Raises:
        MissingShardError / CorruptCheckpointError: the checkpoint is incomplete.
    """
    _check_complete(Path(os.fspath(path)), md)


def safe_reader(path: str | os.PathLike[str], md: Any, storage_options: Any = None) -> Any:
    """A DCP reader of ``path`` that hands DCP the already-read ``md`` instead of unpickling.

    A local directory gets a ``FileSystemReader``; an fsspec URL (``s3://...``) an
    ``FsspecReader`` with ``storage_options``.
    """
    if isinstance(path, str) and "://" in path:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        class _Remote(FsspecReader):
            def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
                return md  # the copy read by the allowlist unpickler, never pickle.load

        return _Remote(path, **dict(storage_options or {}))

    from torch.distributed.checkpoint import FileSystemReader

    class _Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return md  # the copy read by the allowlist unpickler, never pickle.load

    return _Reader(os.fspath(path))


def first_failure(e: BaseException) -> tuple[int, BaseException] | None:
    """``(rank, cause)`` of the lowest failed rank in DCP's ``CheckpointException``, or ``None``.

    Example:
        >>> first_failure(ValueError("not DCP's")) is None
        True
    """
    failures = getattr(e, "failures", None)
    if not isinstance(failures, dict) or not failures:
        return None
    rank, cause = sorted(failures.items())[0]
    if isinstance(cause, tuple):  # (exception, traceback)
        cause = cause[0]
    return int(rank), cause


@contextmanager
def dcp_errors(label: Any) -> Iterator[None]:
    """DCP's read failure (a ``CheckpointException``, which is a ``BaseException``) as a typed error.

    A vanished shard becomes :class:`MissingShardError`; anything else :class:`CorruptCheckpointError`
    naming the rank it happened on, so ``except Exception`` and the manager's fallback see it.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as e:
        rank, cause = first_failure(e) or (-1, e)
        if isinstance(cause, FileNotFoundError):
            raise MissingShardError(label, [os.path.basename(str(cause.filename or cause))]) from e
        raise CorruptCheckpointError(label, f"reading failed on rank {rank}: {type(cause).__name__}: {cause}") from e


def read_dcp(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read every tensor of a DCP directory into CPU memory, as ``{flattened fqn: tensor}``.

    Non-tensor entries (DCP stores them as pickled bytes) are not read. A torchkeep
    distributed checkpoint (see :mod:`torchkeep.distributed`) has its manifest verified
    first, and its tensor names come back dotted (``model/0.weight`` -> ``model.0.weight``),
    as DCP names nested dicts.

    Raises:
        UnsafeCheckpointError: ``.metadata`` needs classes beyond DCP's metadata.
        MissingShardError / CorruptCheckpointError: the checkpoint is incomplete.
        FileChecksumError: a torchkeep distributed checkpoint's file does not match its manifest.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from torchkeep.storage.dcp_manifest import is_torchkeep_dcp, verify_all

    root = Path(os.fspath(path))
    ours = is_torchkeep_dcp(root)
    if ours:
        verify_all(root)
    md = _read_metadata(root)
    _check_complete(root, md)
    check_chunks(root, md)  # before anything is allocated: torch.empty is filled only where chunks are
    state = {
        fqn: torch.empty(tuple(m.size), dtype=m.properties.dtype)
        for fqn, m in md.state_dict_metadata.items()
        if isinstance(m, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.simplefilter("ignore", UserWarning)
        with dcp_errors(root):
            dcp.load(state, storage_reader=safe_reader(root, md), no_dist=True)
    return {k.replace("/", "."): v for k, v in state.items()} if ours else state

"""Find model weights in any source: a path of any format, a sharded directory, or a tree in memory.

:func:`open_source` turns a source into a :class:`Source`: a tree whose tensor leaves are
either tensors (in-memory and legacy sources) or :class:`LazyTensor` handles that know
their shape and dtype and read their bytes only when asked (torchkeep and safetensors
files, read into memory of their own and verified there). :func:`candidates` lists the state dicts inside
that tree; :mod:`torchkeep.loading` picks the one that fits the model.

What a path is comes from :func:`torchkeep.kinds.detect` (by content, never by suffix);
this module reads it:

* torchkeep files (state trees) and plain safetensors files (a flat ``{name: tensor}``);
* sharded checkpoints (a shard index, ours or Hugging Face's, or the directory holding it);
* legacy ``torch.save`` files, through ``torch.load(weights_only=True)`` after the pickle scan;
* ``torch.distributed.checkpoint`` directories (plain or torchkeep's), as a flat ``{fqn: tensor}``.

:func:`read_tree` reads a whole checkpoint of any kind into memory (what ``tk.load`` returns).

Example:
    >>> import torch, torchkeep as tk, tempfile, os
    >>> p = tk.save({"model": torch.nn.Linear(2, 1), "epoch": 3}, os.path.join(tempfile.mkdtemp(), "c.safetensors"))
    >>> with open_source(p) as src:
    ...     sorted(candidates(src.tree))
    ['model']
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from torchkeep import kinds
from torchkeep.container import ZIP_MAGIC, is_legacy
from torchkeep.dcp import read_dcp
from torchkeep.dtypes import ST_TO_DTYPE, buffer_of
from torchkeep.errors import (
    ArgumentTypeError,
    CorruptCheckpointError,
    InvalidArgumentError,
    UnsupportedSourceError,
)
from torchkeep.format.header import parse_header
from torchkeep.format.limits import view_error
from torchkeep.format.meta import TREE_KEY, USER_KEY
from torchkeep.hashing import digests_of
from torchkeep.legacy import load_legacy
from torchkeep.placement import Placer, fixed_device
from torchkeep.reader import Checkpoint, check_digests
from torchkeep.runtime import paused_gc
from torchkeep.tree import SkeletonError, is_stateful, unflatten
from torchkeep.zerocopy import check_mapped, map_tensors

__all__ = [
    "WRAPPER_KEYS",
    "LazyTensor",
    "Source",
    "candidates",
    "decode_lazy",
    "lookup",
    "open_source",
    "read_buffer",
    "read_tree",
    "shape_dtype",
]

# keys under which training scripts and frameworks keep a model's state dict, most common first
WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "module", "net", "network", "ema", "state_dict_ema")
_MAX_DEPTH = 4


@dataclass(eq=False)
class LazyTensor:
    """A tensor in a file: shape and dtype known, bytes read (as a read-only CPU view) by :meth:`load`.

    Attributes:
        shape: the tensor's shape.
        dtype: its dtype.
        device: the device it was saved from (``None`` when the file does not say).
        fetch: returns the tensor, in memory of its own whose bytes were verified (when the
            source verifies): what was checked is what is used.
        stored: the name of the stored tensor it reads (a view of it, for tied weights).
        verify: ``verify(stored_names)`` reads those tensors of the file this one lives in into
            memory of their own and checks their checksums there (each once, many in parallel),
            so a later :meth:`load` hands out those very bytes; raises on damage. Shared by all
            tensors of a file.
        read_into: ``read_into({stored name: destination})`` reads stored tensors of the same file
            straight into tensors the caller holds (contiguous CPU or CUDA tensors of the stored shape
            and dtype), each checksum verified as its bytes land (on a mismatch the destinations hold
            part of the file); ``None`` for a view of a stored tensor or a source that cannot
            (legacy pickles, tensors in memory).
        precheck: ``precheck(stored_names)`` compares those tensors' checksums with their bytes in
            a map of the file (no copy), so a damaged file is refused before :attr:`read_into`
            touches any destination. Shared by all tensors of a file.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str | None
    fetch: Callable[[], torch.Tensor] = field(repr=False)
    stored: str = ""
    verify: Callable[[list[str]], None] = field(repr=False, default=lambda keys: None)
    read_into: Callable[[dict[str, torch.Tensor]], None] | None = field(repr=False, default=None)
    precheck: Callable[[list[str]], None] = field(repr=False, default=lambda keys: None)

    def load(self) -> torch.Tensor:
        return self.fetch()


def shape_dtype(x: torch.Tensor | LazyTensor) -> tuple[tuple[int, ...], torch.dtype]:
    """``(shape, dtype)`` of a tensor or a :class:`LazyTensor` without reading it."""
    return tuple(x.shape), x.dtype


def is_tensorish(x: Any) -> bool:
    return isinstance(x, (torch.Tensor, LazyTensor))


class Source:
    """An opened source: ``tree`` (tensors or :class:`LazyTensor` leaves) and ``label`` for messages.

    Use as a context manager, or call :meth:`close`; lazy tensors are valid until then.
    """

    def __init__(
        self, tree: Any, label: str, closers: list[Callable[[], None]] | None = None, kind: str = "memory"
    ) -> None:
        self.tree = tree
        self.label = label
        self.kind = kind
        self._closers = closers or []

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def open_source(source: Any, *, verify: bool = True, allow_globals: Any = None) -> Source:
    """Open ``source`` (a path, a module, a state dict or any state tree) for :func:`load_into`.

    Args:
        source: a file or directory path, an ``nn.Module``, or a (nested) dict of tensors.
        verify: check checksums of torchkeep files before their tensors are used.
        allow_globals: extra globals a legacy pickle may use (see :func:`torchkeep.load`).

    Raises:
        CheckpointNotFoundError, MissingShardError, CorruptCheckpointError, UnsafeCheckpointError.
    """
    if isinstance(source, torch.nn.Module):
        return Source(source.state_dict(), "<memory>")
    if isinstance(source, Mapping) or is_stateful(source):
        return Source(_states(source), "<memory>")
    if not isinstance(source, (str, os.PathLike)):
        raise ArgumentTypeError(
            "source", source, "a path, a module or a state dict (for a file object, save it to disk first)"
        )
    found = kinds.detect(source, operation="load_into")
    if found.kind in (kinds.DCP, kinds.TORCHKEEP_DCP):
        return Source(read_dcp(found.path), str(found.path), kind=found.kind)
    if found.kind == kinds.SHARDED:
        return _open_index(found, verify, allow_globals)
    return _open_file(found.target, verify, found.kind, allow_globals)


def _states(tree: Any, depth: int = 0) -> Any:
    """Stateful leaves (modules, ...) of an in-memory tree replaced by their state dicts."""
    if isinstance(tree, torch.nn.Module) or (is_stateful(tree) and not isinstance(tree, Mapping)):
        return tree.state_dict()
    if isinstance(tree, Mapping) and depth < _MAX_DEPTH + 2:
        if all(isinstance(v, torch.Tensor) for v in tree.values()):
            return tree  # a state dict: keep it as is (no copy)
        return {k: _states(v, depth + 1) for k, v in tree.items()}
    return tree


def _open_file(path: Path, verify: bool, kind: str, allow_globals: Any = None) -> Source:
    if kinds.is_legacy_kind(kind):
        saved: dict[int, str] = {}

        def remember(t: torch.Tensor, device: str) -> torch.Tensor:
            saved[id(t)] = device  # read onto the CPU; load_into places each tensor itself
            return t

        tree = load_legacy(path, map_location=remember, allow_globals=allow_globals)
        return Source(_wrap_loaded(tree, saved), str(path), kind=kind)
    ck = Checkpoint(path, verify=verify)
    try:
        tree = _lazy_tree(ck)
    except BaseException:
        ck.close()
        raise
    return Source(tree, str(path), [ck.close], kind=kind)


def _wrap_loaded(tree: Any, saved: dict[int, str]) -> Any:
    """Tensors of a legacy tree as :class:`LazyTensor` handles that remember their saved device."""
    if isinstance(tree, torch.Tensor):
        return LazyTensor(tuple(tree.shape), tree.dtype, saved.get(id(tree)), lambda: tree)
    if isinstance(tree, Mapping):
        return {k: _wrap_loaded(v, saved) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_wrap_loaded(v, saved) for v in tree]
    return tree


def _private(ck: Checkpoint) -> tuple[Callable[[str], torch.Tensor], Callable[[list[str]], None]]:
    """``(get(key), read(keys))``: stored tensors read into memory of their own, checksums verified there.

    The bytes hashed are the bytes handed out: each tensor is read (``preadv``) into fresh memory and
    hashed in that memory, never in a shared mapping another process could rewrite between the check
    and the copy. ``read`` reads many at once (in parallel, before any is used); ``get`` reads one
    that was not read yet. Each tensor is read once, so loading one model out of a checkpoint that
    also holds an optimizer reads and checks only the model's bytes.
    """
    cache: dict[str, torch.Tensor] = {}

    def read(keys: list[str]) -> None:
        todo = sorted(set(keys) - cache.keys(), key=lambda k: ck.spec(k).start)
        if todo:
            cache.update(ck.read(todo))

    def get(key: str) -> torch.Tensor:
        if key not in cache:
            read([key])
        return cache[key]

    return get, read


def _lazy_tree(ck: Checkpoint) -> Any:
    view, check = _private(ck)
    specs = ck.header.tensors

    def read_into(dests: dict[str, torch.Tensor]) -> None:
        ck.read(list(dests), into=dests)

    def precheck(names: list[str]) -> None:
        check_mapped(ck, names)

    stored: dict[str, LazyTensor] = {}
    for key, spec in specs.items():
        stored[key] = LazyTensor(
            tuple(spec.shape),
            ST_TO_DTYPE[spec.dtype],
            None,
            lambda key=key: view(key),
            key,
            check,
            read_into,
            precheck,
        )
    return decode_lazy(ck.path, ck.skeleton if ck.has_tree else None, stored)


def decode_lazy(where: Path, skeleton: Any, stored: dict[str, LazyTensor]) -> Any:
    """The tree of ``skeleton`` whose tensor leaves are (views of) the ``stored`` lazy tensors; flat without one."""
    if skeleton is None:
        return dict(stored)

    def lazy(key: str, dev: str | None = None, v: Any = None) -> LazyTensor:
        base = stored.get(key) if isinstance(key, str) else None
        if base is None:
            raise CorruptCheckpointError(where, f"the tree refers to tensor {key!r}, which the file lacks")
        if v is None:
            return replace(base, device=dev, stored=key)
        problem = view_error(math.prod(base.shape), *v) if isinstance(v, list) and len(v) == 3 else "not a view"
        if problem:  # checked before anything is read: a view never reaches past the tensor it views
            raise CorruptCheckpointError(where, f"bad view {str(v)[:80]} of tensor {key!r}: {problem}")
        off, shape, stride = v[0], tuple(v[1]), tuple(v[2])

        def fetch() -> torch.Tensor:
            t = base.fetch()
            return t.as_strided(shape, stride, t.storage_offset() + int(off))

        return LazyTensor(shape, base.dtype, dev, fetch, key, base.verify)

    def no_tensor(key: str) -> torch.Tensor:
        raise SkeletonError(f"unexpected tensor reference {key!r}")

    def dec(n: Any) -> Any:
        if isinstance(n, dict):
            if "T" in n:
                return lazy(n["T"], n.get("dev"), n.get("v"))
            if "d" in n:
                return {k: dec(v) for k, v in n["d"].items()}
            if "o" in n or "D" in n:
                out = {}
                for k, v in n.get("o", n.get("D")):
                    key = unflatten(k, no_tensor)
                    out[tuple(key) if isinstance(key, list) else key] = dec(v)
                return out
            if "S" in n:
                return dec(n["v"])
            if "l" in n:
                return [dec(v) for v in n["l"]]
            if "t" in n:
                return tuple(dec(v) for v in n["t"])
            if "G" in n:
                return None  # a generator state: never model weights
        return unflatten(n, no_tensor)

    try:
        return dec(skeleton)
    except CorruptCheckpointError:
        raise  # already names the file and what is wrong (a bad view, a number out of range)
    except (SkeletonError, TypeError, ValueError, KeyError, AttributeError, ArithmeticError, RecursionError) as e:
        raise CorruptCheckpointError(where, f"malformed tree: {e}") from None


def _open_index(found: kinds.Detected, verify: bool, allow_globals: Any = None) -> Source:
    """A sharded checkpoint: every shard opened lazily, tensors by the index's ``weight_map``."""
    assert found.index is not None and found.file is not None  # detect() sets both for SHARDED
    index, root = found.index, found.file.parent
    tree: dict[str, Any] = {}
    closers: list[Callable[[], None]] = []
    try:
        for fname in index.shards:
            shard = _open_file(root / fname, verify, found.shard_kinds[fname], allow_globals)
            closers.append(shard.close)
            flat = shard.tree
            names = index.names_in(fname)
            found.check_shard(
                fname, [n for n, v in flat.items() if is_tensorish(v)] if isinstance(flat, Mapping) else []
            )
            for n in names:
                tree[n] = flat[n]
        skeleton = index.metadata.get(TREE_KEY)  # torchkeep shard sets keep their state tree in the index
        if skeleton is not None:
            tree = decode_lazy(found.file, skeleton, tree)
    except BaseException:
        for c in reversed(closers):
            c()
        raise
    return Source(tree, str(found.file), closers, kind=kinds.SHARDED)


def read_tree(
    found: kinds.Detected,
    *,
    place: Placer | None = None,
    verify: bool = True,
    trust_pickle: bool = False,
    progress: Callable[[int], None] | None = None,
    allow_globals: Any = None,
    mmap: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """``(state tree, user metadata)`` of a detected checkpoint, read whole into memory, checksums verified.

    Stateful leaves come back as their state dicts; plain safetensors files, shard sets of
    plain shards and DCP directories as flat ``{name: tensor}`` dicts. ``place(tensor, saved_device)``
    moves each tensor (``None``: leave it on the CPU). ``progress(nbytes)`` is called as input is read.
    ``mmap=True``: tensors are views of private maps of the files, checked before they are made
    (:mod:`torchkeep.zerocopy`); torchkeep and safetensors files and their shard sets only.
    """
    if mmap:
        _check_mappable(found)
    if found.kind in (kinds.DCP, kinds.TORCHKEEP_DCP):
        flat = read_dcp(found.path)
        if progress is not None:
            progress(sum(t.numel() * t.element_size() for t in flat.values()))
        return (flat if place is None else {k: place(t, None) for k, t in flat.items()}), {}
    if found.legacy:
        assert found.file is not None
        tree = load_legacy(
            found.file,
            map_location=place if place is not None else "cpu",
            trust_pickle=trust_pickle,
            allow_globals=allow_globals,
        )
        if progress is not None:
            progress(found.file.stat().st_size)
        return tree, {}
    if found.kind == kinds.SHARDED:
        return _read_sharded(found, place, verify, progress, trust_pickle, allow_globals, mmap)
    assert found.file is not None
    with paused_gc(), Checkpoint(found.file, verify=verify) as ck:
        tensors = _read_all(ck, progress, mmap, place)
        return _build(found.file, ck.skeleton, tensors, place, tree=ck.has_tree), ck.metadata


def read_buffer(data: bytes | bytearray | memoryview, label: str, *, place: Placer | None, verify: bool) -> Any:
    """The state tree of a torchkeep or safetensors file held in memory (what ``tk.load(file_object)`` reads).

    Each tensor gets memory of its own (the buffer may be freed or reused after); checksums are
    checked before anything is returned.

    Raises:
        UnsupportedSourceError: the bytes are a ``torch.save`` stream (the pickle scan reads files:
            save it to disk and load the path).
        CorruptCheckpointError, ChecksumMismatchError: damaged bytes.
    """
    view = memoryview(data).cast("B")
    head = bytes(view[:8])
    if is_legacy(head):
        raise UnsupportedSourceError(
            label,
            kinds.LEGACY_ZIP if head.startswith(ZIP_MAGIC) else kinds.LEGACY_PICKLE,
            "tk.load of a file object",
            "torchkeep reads torch.save files only from disk, after scanning their pickle; write the bytes to a "
            "file and tk.load that path",
        )
    header = parse_header(lambda off, n: bytes(view[off : off + n]), view.nbytes, label)
    specs = list(header.tensors.values())
    tensors = {}
    for s in specs:  # copied first, then hashed in the copies: the bytes checked are the bytes returned
        t = torch.empty(s.shape, dtype=ST_TO_DTYPE[s.dtype])
        buffer_of(t)[:] = view[header.size + s.start : header.size + s.end]
        tensors[s.name] = t
    if verify and header.checksums is not None:
        check_digests(label, specs, digests_of([buffer_of(tensors[s.name]) for s in specs]), header.checksums)
    raw = header.metadata.get(TREE_KEY)
    try:
        skeleton = json.loads(raw) if raw is not None else None
    except (ValueError, RecursionError):
        raise CorruptCheckpointError(label, f"metadata {TREE_KEY} is not valid JSON") from None
    return _build(Path(label), skeleton, tensors, place, tree=raw is not None)


_BATCH = 64 << 20  # bytes read per batch (one progress step)


def _check_mappable(found: kinds.Detected) -> None:
    legacy = [k for k in found.shard_kinds.values() if kinds.is_legacy_kind(k)] if found.kind == kinds.SHARDED else []
    if found.kind in (kinds.TORCHKEEP, kinds.SAFETENSORS) or (found.kind == kinds.SHARDED and not legacy):
        return
    raise InvalidArgumentError(
        "mmap",
        True,
        f"{found.target} is a {legacy[0] if legacy else found.kind} checkpoint"
        f"{' (its shards)' if legacy else ''}, which cannot be mapped: mmap=True applies to torchkeep and "
        "safetensors files and their shard sets; load it without mmap=True (or convert it once with tk.convert)",
    )


def _read_all(
    ck: Checkpoint, progress: Callable[[int], None] | None, mmap: bool = False, place: Placer | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of ``ck`` (checksums verified), in ~64 MiB batches when progress is reported;
    straight to the CUDA device ``place`` sends everything to, when it does (staged, no host copy)."""
    if mmap:  # views of a private map of the file, checked before they are made
        out = map_tensors(ck)
        if progress is not None:
            progress(sum(s.nbytes for s in ck.header.tensors.values()))
        return out
    device = _cuda_target(place)
    if progress is None:
        return ck.read(device=device)
    out: dict[str, torch.Tensor] = {}
    batch: list[str] = []
    size = 0
    specs = list(ck.header.tensors.values())
    for i, spec in enumerate(specs):
        batch.append(spec.name)
        size += spec.nbytes
        if size >= _BATCH or i == len(specs) - 1:
            out.update(ck.read(batch, device=device))
            progress(size)
            batch, size = [], 0
    return out


def _cuda_target(place: Placer | None) -> torch.device | None:
    """The CUDA device every tensor goes to, where it exists here (else the placer reports the failure)."""
    device = fixed_device(place)
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    return device if device.index is None or device.index < torch.cuda.device_count() else None


def _build(
    path: Path, skeleton: Any, tensors: dict[str, torch.Tensor], place: Placer | None, *, tree: bool = True
) -> Any:
    """The tree of ``skeleton`` over ``tensors``; a flat dict without a tree (``tree=False``, or no skeleton)."""
    if not tree or (skeleton is None and tensors):
        return tensors if place is None else {k: place(t, None) for k, t in tensors.items()}
    try:
        return unflatten(skeleton, tensors.__getitem__, place)
    except (SkeletonError, KeyError) as e:
        raise CorruptCheckpointError(path, f"the state tree does not match the tensors ({e})") from None


def _read_sharded(
    found: kinds.Detected,
    place: Placer | None,
    verify: bool,
    progress: Callable[[int], None] | None,
    trust_pickle: bool = False,
    allow_globals: Any = None,
    mmap: bool = False,
) -> tuple[Any, dict[str, Any]]:
    assert found.index is not None and found.file is not None
    index, root = found.index, found.file.parent
    tensors: dict[str, torch.Tensor] = {}
    with paused_gc():
        for fname in index.shards:
            wanted = index.names_in(fname)
            if kinds.is_legacy_kind(found.shard_kinds[fname]):  # pytorch_model-0000N-of-0000M.bin shards
                got = load_legacy(
                    root / fname, map_location="cpu", trust_pickle=trust_pickle, allow_globals=allow_globals
                )
                if progress is not None:
                    progress((root / fname).stat().st_size)
                found.check_shard(fname, got.keys() if isinstance(got, Mapping) else ())
                tensors.update((n, got[n]) for n in wanted)
                continue
            with Checkpoint(root / fname, verify=verify) as ck:
                found.check_shard(fname, ck.keys())
                got = _read_all(ck, progress, mmap, place)
                tensors.update((n, got[n]) for n in wanted)
    meta = index.metadata
    raw_user = meta.get(USER_KEY)
    user = raw_user if isinstance(raw_user, dict) else {}
    return _build(found.file, meta.get(TREE_KEY), tensors, place), user


def is_state_dict(node: Any) -> bool:
    """A mapping of string keys to tensors (at least one): what ``module.state_dict()`` returns."""
    return (
        isinstance(node, Mapping)
        and len(node) > 0
        and all(isinstance(k, str) for k in node)
        and all(is_tensorish(v) for v in node.values())
    )


def candidates(tree: Any) -> dict[str, Mapping[str, Any]]:
    """Every state dict inside ``tree``, by dotted key (``""`` for the tree itself).

    Only string-keyed dicts are searched (optimizer states, keyed by integers, are not),
    at most a few levels deep.

    Example:
        >>> import torch
        >>> sorted(candidates({"epoch": 1, "model_state_dict": {"w": torch.ones(1)}}))
        ['model_state_dict']
    """
    out: dict[str, Mapping[str, Any]] = {}

    def walk(node: Any, prefix: str, depth: int) -> None:
        if is_state_dict(node):
            out[prefix] = node
            return
        if not isinstance(node, Mapping) or depth >= _MAX_DEPTH:
            return
        for k, v in node.items():
            if isinstance(k, str) and isinstance(v, Mapping):
                walk(v, f"{prefix}.{k}" if prefix else k, depth + 1)

    walk(tree, "", 0)
    return out


def lookup(tree: Any, key: str) -> Any:
    """The node at dotted ``key`` (``"a.b"``); a key that itself contains dots is found too.

    Raises:
        KeyError: no such node (the caller turns it into a helpful error).
    """
    if key == "":
        return tree
    if isinstance(tree, Mapping) and key in tree:
        return tree[key]
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):  # longest first component that exists
        head = ".".join(parts[:i])
        if isinstance(tree, Mapping) and head in tree:
            try:
                return lookup(tree[head], ".".join(parts[i:]))
            except KeyError:
                continue
    raise KeyError(key)


def iter_tensors(sd: Mapping[str, Any]) -> Iterator[tuple[str, torch.Tensor | LazyTensor]]:
    for k, v in sd.items():
        if is_tensorish(v):
            yield k, v

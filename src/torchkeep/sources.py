"""Find model weights in any source: a path of any format, a sharded directory, or a tree in memory.

:func:`open_source` turns a source into a :class:`Source`: a tree whose tensor leaves are
either tensors (in-memory and legacy sources) or :class:`LazyTensor` handles that know
their shape and dtype and read their bytes only when asked (torchkeep and safetensors
files, through a verified memory map). :func:`candidates` lists the state dicts inside
that tree; :mod:`torchkeep.loading` picks the one that fits the model.

Formats, detected by content, not by extension:

* torchkeep files (state trees) and plain safetensors files (a flat ``{name: tensor}``);
* legacy ``torch.save`` files, read through :func:`torchkeep.load` (``weights_only=True``);
* a directory holding ``*.safetensors.index.json`` (or ``pytorch_model.bin.index.json``),
  the index file itself, or a directory with exactly one ``*.safetensors`` file.

Example:
    >>> import torch, torchkeep as tk, tempfile, os
    >>> p = tk.save({"model": torch.nn.Linear(2, 1), "epoch": 3}, os.path.join(tempfile.mkdtemp(), "c.safetensors"))
    >>> with open_source(p) as src:
    ...     sorted(candidates(src.tree))
    ['model']
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from torchkeep.dcp import is_dcp_dir, read_dcp
from torchkeep.errors import CheckpointNotFoundError, CorruptCheckpointError, KeyMismatchError, MissingShardError
from torchkeep.format.dtypes import ST_TO_DTYPE
from torchkeep.legacy import is_legacy
from torchkeep.mapped import MappedCheckpoint
from torchkeep.reader import Checkpoint, check_digests
from torchkeep.storage.local import buffer_of
from torchkeep.tree import SkeletonError, is_stateful, unflatten

__all__ = ["WRAPPER_KEYS", "LazyTensor", "Source", "candidates", "lookup", "open_source", "shape_dtype"]

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
        fetch: returns the tensor (a read-only view over a memory map: only copy from it).
        stored: the name of the stored tensor it reads (a view of it, for tied weights).
        verify: ``verify(stored_names)`` checks those tensors' checksums in the file this
            one lives in (each once); raises on damage. Shared by all tensors of a file.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str | None
    fetch: Callable[[], torch.Tensor] = field(repr=False)
    stored: str = ""
    verify: Callable[[list[str]], None] = field(repr=False, default=lambda keys: None)

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

    def __init__(self, tree: Any, label: str, closers: list[Callable[[], None]] | None = None) -> None:
        self.tree = tree
        self.label = label
        self._closers = closers or []

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def open_source(source: Any, *, verify: bool = True) -> Source:
    """Open ``source`` (a path, a module, a state dict or any state tree) for :func:`load_into`.

    Args:
        source: a file or directory path, an ``nn.Module``, or a (nested) dict of tensors.
        verify: check checksums of torchkeep files before their tensors are used.

    Raises:
        CheckpointNotFoundError, MissingShardError, CorruptCheckpointError, UnsafeCheckpointError.
    """
    if isinstance(source, torch.nn.Module):
        return Source(source.state_dict(), "<memory>")
    if isinstance(source, Mapping) or is_stateful(source):
        return Source(_states(source), "<memory>")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"source must be a path, a module or a state dict, not {type(source).__name__}; "
            "for a file object, save it to disk first"
        )
    path = Path(os.fspath(source)).expanduser()
    if not path.exists():
        raise CheckpointNotFoundError(path)
    if path.is_dir():
        return _open_dir(path, verify)
    if path.name.endswith(".index.json"):
        return _open_index(path, verify)
    return _open_file(path, verify)


def _states(tree: Any, depth: int = 0) -> Any:
    """Stateful leaves (modules, ...) of an in-memory tree replaced by their state dicts."""
    if isinstance(tree, torch.nn.Module) or (is_stateful(tree) and not isinstance(tree, Mapping)):
        return tree.state_dict()
    if isinstance(tree, Mapping) and depth < _MAX_DEPTH + 2:
        if all(isinstance(v, torch.Tensor) for v in tree.values()):
            return tree  # a state dict: keep it as is (no copy)
        return {k: _states(v, depth + 1) for k, v in tree.items()}
    return tree


def _open_file(path: Path, verify: bool) -> Source:
    with open(path, "rb") as fh:
        head = fh.read(8)
    if is_legacy(head):
        from torchkeep.api import load  # api imports this package's siblings; import late

        saved: dict[int, str] = {}

        def remember(t: torch.Tensor, device: str) -> torch.Tensor:
            saved[id(t)] = device  # read onto the CPU; load_into places each tensor itself
            return t

        tree = load(path, map_location=remember)
        return Source(_wrap_loaded(tree, saved), str(path))
    ck = Checkpoint(path, verify=verify)
    try:
        tree = _lazy_tree(ck, verify)
    except BaseException:
        ck.close()
        raise
    return Source(tree, str(path), [ck.close])


def _wrap_loaded(tree: Any, saved: dict[int, str]) -> Any:
    """Tensors of a legacy tree as :class:`LazyTensor` handles that remember their saved device."""
    if isinstance(tree, torch.Tensor):
        return LazyTensor(tuple(tree.shape), tree.dtype, saved.get(id(tree)), lambda: tree)
    if isinstance(tree, Mapping):
        return {k: _wrap_loaded(v, saved) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_wrap_loaded(v, saved) for v in tree]
    return tree


def _mapper(ck: Checkpoint, verify: bool) -> tuple[Callable[[str], torch.Tensor], Callable[[list[str]], None]]:
    """``(view(key), verify(keys))`` over a lazily created memory map of ``ck``.

    ``verify`` hashes only the tensors asked for (each once), so loading one model out of
    a checkpoint that also holds an optimizer reads and checks only the model's bytes.
    """
    state: dict[str, Any] = {}
    verified: set[str] = set()

    def mapped() -> MappedCheckpoint:
        if "m" not in state:
            state["m"] = MappedCheckpoint(ck)
        return state["m"]

    def check(keys: list[str]) -> None:
        sums = ck.header.checksums
        if not verify or sums is None:
            return
        todo = sorted(set(keys) - verified, key=lambda k: ck.spec(k).start)
        if not todo:
            return
        bufs = [buffer_of(mapped().view(k)) for k in todo]
        with ThreadPoolExecutor(2) as pool:
            check_digests(ck.path, [ck.spec(k) for k in todo], bufs, sums, pool)
        verified.update(todo)

    def view(key: str) -> torch.Tensor:
        return mapped().view(key)

    return view, check


def _lazy_tree(ck: Checkpoint, verify: bool) -> Any:
    view, check = _mapper(ck, verify)
    specs = ck.header.tensors

    def lazy(key: str, dev: str | None = None, v: Any = None) -> LazyTensor:
        spec = specs.get(key) if isinstance(key, str) else None
        if spec is None:
            raise CorruptCheckpointError(ck.path, f"the tree refers to tensor {key!r}, which the file lacks")
        if v is None:
            return LazyTensor(tuple(spec.shape), ST_TO_DTYPE[spec.dtype], dev, lambda: view(key), key, check)
        try:
            off, shape, stride = v
            shape, stride = tuple(int(s) for s in shape), tuple(int(s) for s in stride)
        except (TypeError, ValueError):
            raise CorruptCheckpointError(ck.path, f"bad view {v!r} of tensor {key!r}") from None

        def fetch() -> torch.Tensor:
            base = view(key)
            return base.as_strided(shape, stride, base.storage_offset() + int(off))

        return LazyTensor(shape, ST_TO_DTYPE[spec.dtype], dev, fetch, key, check)

    if not ck.has_tree:
        return {k: lazy(k) for k in specs}

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
        return dec(ck.skeleton)
    except (SkeletonError, TypeError, ValueError, KeyError, AttributeError) as e:
        raise CorruptCheckpointError(ck.path, f"malformed tree: {e}") from None


def _open_dir(path: Path, verify: bool) -> Source:
    if is_dcp_dir(path):
        return Source(read_dcp(path), str(path))
    indexes = sorted(path.glob("*.index.json"))
    preferred = [p for p in indexes if p.name == "model.safetensors.index.json"]
    if preferred or len(indexes) == 1:
        return _open_index((preferred or indexes)[0], verify)
    if len(indexes) > 1:
        raise CorruptCheckpointError(
            path, f"several index files ({', '.join(p.name for p in indexes)}); pass the one to load as the source"
        )
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return _open_file(files[0], verify)
    what = f"{len(files)} .safetensors files and no index" if files else "no *.safetensors.index.json or .safetensors"
    raise CorruptCheckpointError(path, f"a directory with {what}; pass a file path (or the index) instead")


def _open_index(index: Path, verify: bool) -> Source:
    """A sharded checkpoint: ``{"metadata": ..., "weight_map": {name: shard file}}`` (Hugging Face)."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise TypeError("weight_map must map tensor names to file names")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(index, f"not a shard index ({e})") from None
    by_file: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
        by_file.setdefault(fname, []).append(name)
    root = index.parent.resolve()
    for fname in by_file:  # an index must not point outside its directory
        if os.path.isabs(fname) or not (root / fname).resolve().is_relative_to(root):
            raise CorruptCheckpointError(index, f"shard {fname!r} lies outside the index's directory")
    absent = [f for f in by_file if not (root / f).is_file()]
    if absent:
        raise MissingShardError(index, absent)
    tree: dict[str, Any] = {}
    closers: list[Callable[[], None]] = []
    try:
        for fname, names in by_file.items():
            shard = _open_file(root / fname, verify)
            closers.append(shard.close)
            flat = shard.tree
            lacking = [n for n in names if not isinstance(flat, Mapping) or not is_tensorish(flat.get(n))]
            if lacking:
                raise KeyMismatchError(
                    f"{root / fname}",
                    missing=lacking,
                    fix=f"the index {index.name} lists these tensors in this shard, which lacks them: "
                    "the shards do not belong to this index; download them again",
                )
            for n in names:
                tree[n] = flat[n]
    except BaseException:
        for c in reversed(closers):
            c()
        raise
    return Source(tree, str(index), closers)


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

"""Writing an incremental checkpoint: shards whose tensors did not change are hard links, not writes.

``CheckpointManager(..., incremental=True)`` saves each checkpoint as a directory ``NAME.shards``
holding an ordinary sharded checkpoint (:mod:`.shardset`). One save::

    hash the tensors that could be linked (xxh3, the checksum the header stores anyway): all but
       those the previous save found changed (:data:`CHANGED_KEY`), which are likely to change again
    -> plan: each shard of the previous checkpoint whose tensors all hash the same, and whose file is
       still the one its index recorded, is linked; the other tensors go into new shards
    -> free-space check for the new shards only
    -> temp directory .NAME.shards.tmp-XXXX: links (a copy where links fail), new shards (hashed as
       they are written, as by any save; each fsynced while the next is written), the index last
       (fsynced, with the tensors found changed), fsync the directory
    -> rename it to NAME.shards, fsync the run directory
    -> read it back: each new shard verified in full, each linked one by size and header sha256

So a tensor is hashed once per save, and a run where everything changes (full fine-tuning) hashes
nothing twice: it costs what a full save costs. The guess only decides what is hashed first: a
shard is linked only when every tensor in it hashes the same, so a wrong guess costs a write, never
a wrong link.

The grouping rule keeps shards stable from one save to the next: tensors that did not change
since the previous checkpoint (``cold``) and tensors that did, or are new (``hot``), never share
a new shard, and each kind is cut into shards of at most :data:`SHARD_BYTES` in tree order. With
no previous checkpoint, ``cold`` are the frozen parameters (``requires_grad=False``) of the
modules in the saved state, and the rest is taken as changed. So a frozen backbone is written
once and linked ever after, while a trained adapter and its optimizer state are rewritten each
save without being hashed twice.

Example:
    >>> import tempfile, torch, torchkeep as tk
    >>> base, head = torch.nn.Linear(64, 64).requires_grad_(False), torch.nn.Linear(64, 2)
    >>> with tk.CheckpointManager(tempfile.mkdtemp(), incremental=True) as mgr:
    ...     for step in range(3):
    ...         _ = mgr.save({"base": base, "head": head}, step=step)
    ...         with torch.no_grad():
    ...             _ = head.weight.add_(1.0)
    ...     mgr.latest().file
    'ckpt_000002.shards'
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from torchkeep import writer
from torchkeep.dtypes import DTYPE_TO_ST, buffer_of
from torchkeep.errors import CorruptCheckpointError, TorchkeepError
from torchkeep.format.meta import FORMAT_KEY, TREE_KEY, USER_KEY
from torchkeep.format.shards import index_bytes, shard_names, split_shards
from torchkeep.hashing import digests_of
from torchkeep.manager import manifest, readback
from torchkeep.manager.manifest import CheckpointInfo
from torchkeep.manager.shardset import SHARDS_KEY, ShardSet, head_of, open_set
from torchkeep.storage.local import fsync_dir
from torchkeep.storage.runs import SHARDS_INDEX
from torchkeep.tree import Flat, flatten

__all__ = ["CHANGED_KEY", "SHARD_BYTES", "Plan", "changed_last", "frozen_names", "plan", "previous_set", "write"]

#: index metadata key: the tensors this save found changed (or new). The next save writes them again
#: without hashing them first (only a guess: a shard is linked only when all its tensors hash the same)
CHANGED_KEY = "torchkeep.changed"
#: the most bytes of tensors in one new shard (a larger tensor gets a shard of its own)
SHARD_BYTES = 512 << 20
_STEM = "model.safetensors"
#: errors of ``os.link`` after which the shard is copied instead (no hard links on this file system,
#: across devices, too many links to one file, not permitted)
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EACCES}


def frozen_names(state: Any, flat: Flat | None = None) -> set[str] | None:
    """Names in ``flatten(state)`` of the frozen parameters (``requires_grad=False``) of the modules
    found in ``state`` (dicts, lists and tuples searched a few levels deep): the first save's hint of
    what will not change. ``None`` when ``state`` holds no module (nothing is known)."""
    ptrs: set[int] = set()
    found = False

    def walk(node: Any, depth: int) -> None:
        nonlocal found
        if isinstance(node, torch.nn.Module):
            found = True
            ptrs.update(p.data_ptr() for p in node.parameters() if not p.requires_grad and p.numel())
        elif depth < 6 and isinstance(node, Mapping):
            for v in node.values():
                walk(v, depth + 1)
        elif depth < 6 and isinstance(node, (list, tuple)):
            for v in node:
                walk(v, depth + 1)

    walk(state, 0)
    if not found:
        return None
    if not ptrs:
        return set()
    flat = flat if flat is not None else flatten(state)
    return {n for n, t in flat.tensors.items() if t.numel() and t.data_ptr() in ptrs}


@dataclass
class Plan:
    """What one save writes: ``linked`` shard files of the previous checkpoint (with their recorded
    ``(size, header sha256)`` and tensor names), ``groups`` of tensor names, each a new shard, and
    ``new_bytes``, the tensor bytes of the new shards."""

    linked: list[tuple[Path, tuple[int, str], list[str]]] = field(default_factory=list)
    groups: list[list[str]] = field(default_factory=list)
    new_bytes: int = 0
    before: dict[str, Key] = field(default_factory=dict)  # every tensor of the previous checkpoint


Key = tuple[str, tuple[int, ...], str]  # safetensors dtype, shape, xxh3 digest


def _previous(prev: ShardSet | None) -> tuple[list[tuple[str, Path, tuple[int, str], dict[str, Key]]], dict[str, Key]]:
    """Per shard of ``prev`` that is still the file its index recorded: its tensors' keys; and every key."""
    shards: list[tuple[str, Path, tuple[int, str], dict[str, Key]]] = []
    every: dict[str, Key] = {}
    if prev is None:
        return shards, every
    for name in prev.index.shards:
        try:
            path, header = prev.shard(name)
        except (TorchkeepError, OSError):
            continue  # damaged or gone: its tensors are written again
        if header.checksums is None:
            continue
        keys = {n: (s.dtype, tuple(s.shape), header.checksums[n]) for n, s in header.tensors.items()}
        shards.append((name, path, prev.records[name], keys))
        every.update(keys)
    return shards, every


def changed_last(prev: ShardSet | None) -> set[str]:
    """The tensors ``prev``'s save found changed (:data:`CHANGED_KEY`): this save writes them again
    without hashing them first. Empty when unknown (then every tensor is hashed)."""
    raw = prev.index.metadata.get(CHANGED_KEY) if prev is not None else None
    return {n for n in raw if isinstance(n, str)} if isinstance(raw, list) else set()


def plan(sizes: Mapping[str, int], keys: Mapping[str, Key], prev: ShardSet | None, frozen: set[str]) -> Plan:
    """The stable grouping rule (see the module docstring), as a pure function of tensor keys.

    ``sizes`` holds every tensor, in tree order; ``keys`` the tensors hashed before writing (a tensor
    without a key is taken as changed: it is written, never linked).

    Example:
        >>> k = {"a": ("F32", (1,), "x"), "b": ("F32", (1,), "y")}
        >>> plan({"a": 4, "b": 4}, k, None, {"a"}).groups
        [['a'], ['b']]
    """
    shards, every = _previous(prev)
    out = Plan(before=every)
    done: set[str] = set()
    for _name, path, record, have in shards:
        if have and all(n in keys and keys[n] == key for n, key in have.items()):
            out.linked.append((path, record, list(have)))
            done.update(have)
    rest = [n for n in sizes if n not in done]
    # the first save: the frozen parameters; later: unchanged tensors whose shard was not (they move)
    if prev is None:
        cold = [n for n in rest if n in frozen]
    else:
        cold = [n for n in rest if n in keys and every.get(n) == keys[n]]
    hot = [n for n in rest if n not in set(cold)]
    for names in (cold, hot):
        if names:
            out.groups += split_shards([(n, sizes[n]) for n in names], SHARD_BYTES)
    out.new_bytes = sum(sizes[n] for n in rest)
    return out


def _link(src: Path, dst: Path, durable: bool) -> None:
    """A hard link ``dst`` to ``src``; a copy where the file system has no links for it."""
    try:
        os.link(src, dst, follow_symlinks=False)
        return
    except OSError as e:
        if e.errno not in _NO_LINK:
            raise
    shutil.copyfile(src, dst, follow_symlinks=False)
    if durable:
        fd = os.open(dst, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _create(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)


def _settle(fd: int, durable: bool) -> None:
    try:
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def _shape_key(t: torch.Tensor) -> tuple[str, tuple[int, ...]]:
    return DTYPE_TO_ST[t.dtype], tuple(t.shape)


def _hash(tensors: Mapping[str, torch.Tensor], names: list[str]) -> dict[str, Key]:
    digests = digests_of([buffer_of(tensors[n]) for n in names], threads=2)
    return {n: (*_shape_key(tensors[n]), d) for n, d in zip(names, digests, strict=True)}


def previous_set(root: Path, entries: list[CheckpointInfo]) -> ShardSet | None:
    """The newest incremental checkpoint of the run whose index reads, to link shards from."""
    for e in reversed(entries):
        if e.file.endswith(".shards"):
            with contextlib.suppress(TorchkeepError, OSError):
                return open_set(root / e.file)
            return None
    return None


def write(
    root: Path,
    flat: Flat,
    info: CheckpointInfo,
    prev: ShardSet | None,
    *,
    durable: bool,
    frozen: set[str] | None,
    check_space: Any,
) -> tuple[int, bytes]:
    """Write ``flat`` as the incremental checkpoint ``root / info.file``; returns ``(size, index bytes)``.

    ``frozen`` (the first save's hint, see :func:`frozen_names`) is ``None`` when nothing is known.
    ``check_space(nbytes)`` raises when the new shards would not fit. Nothing is left behind on an
    error; a kill leaves a hidden temp directory the next manager removes.
    """
    tensors = writer.host_copies(flat.tensors)
    sizes = {n: t.numel() * t.element_size() for n, t in tensors.items()}
    # hashed before writing: what could be linked. The first save links nothing; later ones skip the
    # tensors the previous save found changed (they are hashed as they are written, as in any save)
    guess = changed_last(prev)
    keys = _hash(tensors, [n for n in tensors if n not in guess]) if prev is not None else {}
    todo = plan(sizes, keys, prev, frozen or set())
    check_space(todo.new_bytes + 4096 * (len(todo.groups) + 1) + 256 * len(tensors))
    count = len(todo.linked) + len(todo.groups)
    names, _ = shard_names(_STEM, max(count, 1))
    final = root / info.file
    tmp = root / f".{info.file}.tmp-{secrets.token_hex(6)}"
    tmp.mkdir()
    try:
        weight_map: dict[str, str] = {}
        records: dict[str, list[Any]] = {}
        written: list[str] = []
        digests: dict[str, str] = {}
        it = iter(names)
        for src, record, held in todo.linked:
            name = next(it)
            _link(src, tmp / name, durable)
            records[name] = list(record)
            weight_map.update((n, name) for n in held)
        meta = writer.provenance_metadata()
        with ThreadPoolExecutor(1) as syncer:  # one shard's fsync runs while the next is written
            settled = []
            for group in todo.groups:
                name = next(it)
                fd = _create(tmp / name)
                try:
                    digests.update(writer.write_checksummed(fd, {n: tensors[n] for n in group}, meta))
                except BaseException:
                    os.close(fd)
                    raise
                settled.append(syncer.submit(_settle, fd, durable))
                size, head = head_of(tmp / name)
                records[name] = [size, hashlib.sha256(head).hexdigest()]
                weight_map.update((n, name) for n in group)
                written.append(name)
            for f in settled:
                f.result()
        changed = [n for n in flat.tensors if n in digests]
        if prev is not None:
            changed = [n for n in changed if todo.before.get(n) != (*_shape_key(tensors[n]), digests[n])]
        elif frozen is not None:
            changed = [n for n in changed if n not in frozen]
        user = {manifest.META_KEY: manifest.record_of(info)}
        index_meta = {FORMAT_KEY: meta[FORMAT_KEY], TREE_KEY: flat.skeleton, USER_KEY: user, SHARDS_KEY: records}
        if prev is not None or frozen is not None:
            index_meta[CHANGED_KEY] = changed
        ordered = {n: weight_map[n] for n in flat.tensors}  # tree order, as every shard set lists it
        raw = index_bytes(ordered, sum(sizes.values()), index_meta)
        fd = _create(tmp / SHARDS_INDEX)
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if durable:
            fsync_dir(tmp)
        os.rename(tmp, final)  # the commit: the directory appears whole or not at all
        if durable:
            fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:  # what load would refuse never replaces the last checkpoint that loads
        readback.check_shards(final, written, raw, info.file)
    except CorruptCheckpointError:
        doomed = root / f".{info.file}.old-{secrets.token_hex(4)}"
        with contextlib.suppress(OSError):
            os.rename(final, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        raise
    size = sum(f.lstat().st_size for f in final.iterdir())
    return size, raw

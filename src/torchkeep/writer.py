"""The one writer: checkpoint files and shard sets, atomically, checksummed or plain.

Every file torchkeep writes goes through here: ``save``, ``convert``, ``save_model``, the
manager (local and object storage) and the distributed tree file. A file is written to a
temporary name beside its target, fsynced and renamed (:class:`~torchkeep.storage.local.AtomicFile`);
a shard set writes every shard first and its index last.

Example:
    >>> import torch, tempfile, os
    >>> from torchkeep.tree import flatten
    >>> p = save_flat(flatten({"w": torch.ones(2)}), os.path.join(tempfile.mkdtemp(), "c.safetensors"))
    >>> p.name
    'c.safetensors'
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any, Protocol

import torch

from torchkeep.dtypes import DTYPE_TO_ST, buffer_of
from torchkeep.errors import ConversionError, InvalidArgumentError
from torchkeep.format.dtypes import ITEMSIZE
from torchkeep.format.header import HashState, HeaderBuilder
from torchkeep.format.limits import MAX_RANK, check_header_size, shape_error
from torchkeep.format.meta import TREE_KEY, USER_KEY, provenance, tree_json, user_json
from torchkeep.format.shards import index_bytes, shard_names, split_shards
from torchkeep.hashing import Digests, digests_of
from torchkeep.runtime import paused_gc
from torchkeep.staging import Fetch, Segment, device_bytes, pieces
from torchkeep.storage.local import SPACE_ERRNOS, AtomicFile, fsync_dir, write_buffers
from torchkeep.storage.paths import as_path
from torchkeep.tree import Flat, flatten

__all__ = [
    "Body",
    "Streamed",
    "host_copies",
    "prepared",
    "provenance_metadata",
    "resolved",
    "save_flat",
    "save_stream",
    "save_tree",
    "sharded_paths",
    "stream_checksummed",
    "tensor_sizes",
    "writable",
    "write_checksummed",
    "write_file",
    "write_model_dir",
    "write_sharded",
    "write_torch",
]


class Streamed(Protocol):
    """Tensors whose data is read batch by batch while a file is written (a gathered distributed checkpoint).

    ``load(stand_ins)`` returns the real tensors for those names (same shapes and dtypes);
    ``batch`` is the most bytes to hold at once.
    """

    batch: int

    def load(self, stand_ins: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]: ...


def provenance_metadata() -> dict[str, str]:
    """The header metadata every torchkeep file carries: format, hash, versions, creation time."""
    return provenance(torch.__version__)


def resolved(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, with lazy conjugate / negative views materialised (what its bytes mean)."""
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t


def _cpu_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor as contiguous CPU memory ready to write (a copy only when needed).

    Accelerator tensors are copied into pinned host memory without blocking; the caller
    synchronises once (:func:`host_copies`) before the bytes are read. (The checksummed files
    of ``save`` and the manager take CUDA tensors through :func:`writable` instead: staged.)
    """
    if t.is_cpu and t.is_contiguous() and not (t.is_conj() or t.is_neg()):
        return t.detach() if t.requires_grad else t  # the common case, no copy
    t = resolved(t)
    if t.device.type != "cpu":
        pinned = t.device.type == "cuda"
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pinned)
        host.copy_(t, non_blocking=pinned)
        return host
    if not t.is_contiguous():
        t = t.contiguous()
    return t


def host_copies(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``_cpu_bytes`` of every tensor, then one synchronisation of each device copied from."""
    out = {k: _cpu_bytes(t) for k, t in tensors.items()}
    if torch.cuda.is_available():
        # each copy runs on its source device's stream: waiting for the current device alone
        # would leave the copies from a model's other GPUs in flight
        for dev in {t.device for t in tensors.values() if t.is_cuda}:
            torch.cuda.synchronize(dev)
    return out


def writable(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What :func:`write_checksummed` takes: CUDA tensors as they are (it stages them, a piece at
    a time), every other tensor as :func:`host_copies` makes it.

    Example:
        >>> w = torch.ones(2, 3, requires_grad=True)
        >>> out = writable({"w": w, "t": w.detach().t()})
        >>> out["w"].requires_grad, out["t"].is_contiguous(), out["t"].shape
        (False, True, torch.Size([3, 2]))
    """
    # no CUDA tensor is copied here, so none of these copies is asynchronous: nothing to wait for
    return {k: t if _staged(t) else _cpu_bytes(t) for k, t in tensors.items()}


def _staged(t: torch.Tensor) -> bool:
    """Whether a write brings ``t`` to the host through :class:`~torchkeep.staging.Fetch`."""
    return t.is_cuda or _stage_host


_stage_host = False  # tests set it: host tensors then go through a Fetch too (the CUDA path's logic, on a CPU)


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """A staged tensor's bytes, flat ``uint8`` on its device (resolved and contiguous: a copy only when needed)."""
    t = resolved(t)
    return device_bytes(t if t.is_contiguous() else t.contiguous())


def tensor_sizes(tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, int]]:
    """``(name, bytes)`` of each tensor, in order (for :func:`torchkeep.format.shards.split_shards`)."""
    return [(k, t.numel() * t.element_size()) for k, t in tensors.items()]


# -- torchkeep files ---------------------------------------------------------------------------


def prepared(flat: Flat, metadata: Mapping[str, Any] | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (:func:`writable`) and header metadata a file of ``flat`` holds (what every writer writes)."""
    meta = {**provenance_metadata(), TREE_KEY: tree_json(flat.skeleton)}
    if metadata:
        meta[USER_KEY] = user_json(metadata)
    return writable(flat.tensors), meta


def save_flat(
    flat: Flat, path: str | os.PathLike[str], *, metadata: Mapping[str, Any] | None = None, durable: bool = True
) -> Path:
    """Write an already flattened tree (:func:`torchkeep.tree.flatten`) atomically.

    For callers that snapshot a tree first and write it later (asynchronous saves): the
    tensors of ``flat`` may be host copies, the skeleton keeps the Stateful class names.
    """
    path = as_path(path)
    keep, meta = prepared(flat, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    with AtomicFile(path, durable=durable) as f:
        write_checksummed(f.fd, keep, meta)
        f.commit()
    return path


def save_tree(
    obj: Any, path: str | os.PathLike[str], *, metadata: Mapping[str, Any] | None = None, durable: bool = True
) -> Path:
    """Flatten a state tree and write it atomically (what :func:`torchkeep.save` does after its checks)."""
    with paused_gc():
        return save_flat(flatten(obj), path, metadata=metadata, durable=durable)


def save_stream(obj: Any, write: Callable[[memoryview], Any], *, metadata: Mapping[str, Any] | None = None) -> bytes:
    """A state tree as the bytes of a torchkeep file, front to back through ``write`` (a file object's)."""
    with paused_gc():
        tensors, meta = prepared(flatten(obj), metadata)
        return stream_checksummed(write, tensors, meta)


def write_checksummed(fd: int, tensors: Mapping[str, torch.Tensor], meta: dict[str, str]) -> dict[str, str]:
    """A checksummed torchkeep/safetensors file of ``tensors`` (see :func:`writable`) into ``fd``.

    The data goes first, hashed beside the writes; the sealed header goes last, at offset 0.
    CUDA tensors come to the host through two small page-locked buffers, a piece at a time
    (:func:`_write_staged`). Returns ``{name: xxh3-128 hex}``, the checksums the header now holds.
    """
    builder = HeaderBuilder([(k, DTYPE_TO_ST[t.dtype], tuple(t.shape)) for k, t in tensors.items()], meta)
    base = builder.header_size
    if any(_staged(t) for t in tensors.values()):
        try:
            digests = _write_staged(fd, [(s.name, base + s.start) for s in builder.specs], tensors)
        except OSError as e:  # a full disk: what the whole file needs, not the piece that failed
            if e.errno in SPACE_ERRNOS:
                e.needed_bytes = max(getattr(e, "needed_bytes", 0), base + builder.data_size)  # type: ignore[attr-defined]
            raise
        os.pwrite(fd, builder.seal(digests), 0)
        return {s.name: d for s, d in zip(builder.specs, digests, strict=True)}
    bufs = [buffer_of(tensors[s.name]) for s in builder.specs]
    with ThreadPoolExecutor(1) as pool:
        hashes = Digests(bufs, pool)  # large tensors hash beside the writes (both drop the GIL)
        write_buffers(fd, base, bufs)
        digests = hashes.result()
        os.pwrite(fd, builder.seal(digests), 0)
    return {s.name: d for s, d in zip(builder.specs, digests, strict=True)}


def _write_staged(fd: int, places: list[tuple[str, int]], tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Write each tensor at its file offset (``places``: ``(name, offset)``), hashing each; returns the digests.

    Host tensors go out as :func:`write_checksummed` writes them. Staged (CUDA) tensors come
    through a :class:`~torchkeep.staging.Fetch`: back to back, in pieces of at most
    :data:`~torchkeep.staging.STAGE` bytes; each piece is hashed (on a second thread) and written
    while the next one is copied from the device. The bytes hashed are the bytes written.
    """
    digests = [""] * len(places)
    staged = [i for i, (name, _) in enumerate(places) if _staged(tensors[name])]
    host = sorted(set(range(len(places))) - set(staged))
    with ThreadPoolExecutor(1) as pool:
        bufs = [buffer_of(tensors[places[i][0]]) for i in host]
        hashes = Digests(bufs, pool)
        _write_runs(fd, [(places[i][1], b) for i, b in zip(host, bufs, strict=True)])
        for i, h in zip(host, hashes.result(), strict=True):
            digests[i] = h
        srcs = [tensors[places[i][0]] for i in staged]
        states = [HashState() for _ in staged]
        plan = pieces([t.nbytes for t in srcs])
        fetch = Fetch(torch.device("cuda" if any(t.is_cuda for t in srcs) else "cpu"))
        # closing(): a write that fails stops the fetch, whose copies in flight then land first
        with closing(fetch.run(srcs, plan, _flat_bytes)) as fetched:
            for segs, view in zip(plan, fetched, strict=True):

                def hash_piece(segs: list[Segment] = segs, view: memoryview = view) -> None:
                    for k, _, n, at in segs:
                        states[k].update(view[at : at + n])

                hashed = pool.submit(hash_piece)
                try:
                    _write_runs(fd, [(places[staged[k]][1] + lo, view[at : at + n]) for k, lo, n, at in segs])
                finally:
                    hashed.result()  # the buffer is refilled only once its hash is done
    for k, i in enumerate(staged):
        digests[i] = states[k].hexdigest()
    return digests


def _write_runs(fd: int, parts: list[tuple[int, memoryview]]) -> None:
    """Write ``(file offset, bytes)`` parts, in file order; parts that meet go out in one ``pwritev``."""
    run: list[memoryview] = []
    start = end = 0
    for off, b in parts:
        if run and off != end:
            write_buffers(fd, start, run)
            run = []
        if not run:
            start = off
        run.append(b)
        end = off + b.nbytes
    if run:
        write_buffers(fd, start, run)


def stream_checksummed(
    write: Callable[[memoryview], Any], tensors: Mapping[str, torch.Tensor], meta: dict[str, str]
) -> bytes:
    """The same file as :func:`write_checksummed`, front to back through ``write`` (an object-store upload).

    A stream cannot seek back to the header, so the data is hashed first (one pass over
    memory, ~40 ms/GiB) and the sealed header goes out before it. Returns the header bytes
    (length prefix included).
    """
    tensors = host_copies(tensors)  # two passes over the data (hash, then send): whole host copies
    builder = HeaderBuilder([(k, DTYPE_TO_ST[t.dtype], tuple(t.shape)) for k, t in tensors.items()], meta)
    bufs = [buffer_of(tensors[s.name]) for s in builder.specs]
    head = builder.seal(digests_of(bufs))
    write(memoryview(head))
    for b in bufs:
        if b.nbytes:
            write(b)
    return head


class Body:
    """A checksummed checkpoint of host ``tensors`` with header ``meta``, ready for a
    :class:`~torchkeep.storage.runs.RunStore` to place (a local file or an upload)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], meta: dict[str, str]) -> None:
        self.tensors = tensors
        self.meta = meta

    def write_to(self, fd: int) -> None:
        write_checksummed(fd, self.tensors, self.meta)

    def stream(self, write: Callable[[memoryview], Any]) -> bytes:
        return stream_checksummed(write, self.tensors, self.meta)


# -- plain safetensors files and shard sets -----------------------------------------------------


def _plain_layout(
    tensors: Mapping[str, torch.Tensor], meta: dict[str, str]
) -> tuple[bytes, list[tuple[str, int, int]]]:
    """``(header bytes with the length prefix, [(name, data offset, nbytes)] in data order)`` of a plain file."""
    entries = [(k, DTYPE_TO_ST[t.dtype], tuple(t.shape)) for k, t in tensors.items()]
    # plain safetensors: largest element size first, so every tensor is aligned to its element size
    entries.sort(key=lambda e: -ITEMSIZE[e[1]])
    head: dict[str, Any] = {"__metadata__": meta}
    layout: list[tuple[str, int, int]] = []
    offset = 0
    for name, st, shape in entries:
        if len(shape) > MAX_RANK:  # the reader's limit, checked before writing
            raise InvalidArgumentError(
                "tensors", f"<tensor {name}>", f"{shape_error(list(shape))}; nothing was written"
            )
        end = offset + math.prod(shape) * ITEMSIZE[st]
        head[name] = {"dtype": st, "shape": list(shape), "data_offsets": [offset, end]}
        layout.append((name, offset, end - offset))
        offset = end
    raw = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    check_header_size(len(raw), len(entries), "tensors")
    return len(raw).to_bytes(8, "little") + raw, layout


def _in_batches(layout: Sequence[tuple[str, int, int]], budget: int) -> Iterator[list[tuple[str, int, int]]]:
    """Consecutive ``(name, start, nbytes)`` runs of at most ``budget`` bytes (a larger tensor alone).

    Example:
        >>> [[n for n, _, _ in b] for b in _in_batches([("a", 0, 4), ("b", 4, 4), ("c", 8, 9), ("d", 17, 1)], 8)]
        [['a', 'b'], ['c'], ['d']]
    """
    batch: list[tuple[str, int, int]] = []
    size = 0
    for item in layout:
        if batch and size + item[2] > budget:
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += item[2]
    if batch:
        yield batch


def _stream_tensors(
    fd: int, tensors: Mapping[str, torch.Tensor], meta: dict[str, str], *, checksums: bool, source: Streamed
) -> None:
    """The same file as :func:`_write_tensors`, with the data read from ``source`` batch by batch.

    The layout comes from shapes and dtypes alone; each batch is loaded, written at its
    offset, hashed beside the write and dropped before the next; the header goes last, at 0.
    """
    if checksums:
        builder = HeaderBuilder([(k, DTYPE_TO_ST[t.dtype], tuple(t.shape)) for k, t in tensors.items()], meta)
        layout = [(s.name, s.start, s.nbytes) for s in builder.specs]
        base = builder.header_size
    else:
        head, layout = _plain_layout(tensors, meta)
        base = len(head)
    digests: list[str] = []
    with ThreadPoolExecutor(1) as pool:
        for batch in _in_batches(layout, source.batch):
            loaded = source.load({name: tensors[name] for name, _, _ in batch})
            bufs = [buffer_of(loaded[name]) for name, _, _ in batch]
            del loaded
            hashes = Digests(bufs, pool) if checksums else None  # large tensors hash beside the write
            write_buffers(fd, base + batch[0][1], bufs)
            if hashes is not None:
                digests += hashes.result()
            del bufs, hashes  # the batch's memory goes back before the next is read
    os.pwrite(fd, builder.seal(digests) if checksums else head, 0)


def _write_tensors(
    fd: int,
    tensors: Mapping[str, torch.Tensor],
    meta: dict[str, str],
    *,
    checksums: bool,
    source: Streamed | None = None,
) -> None:
    """One safetensors file into ``fd``: torchkeep-checksummed when ``checksums``, else plain.

    With ``source`` ``tensors`` may hold stand-ins whose data ``source`` reads batch by batch.
    """
    for name, t in tensors.items():
        if t.dtype not in DTYPE_TO_ST:
            raise ConversionError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
    if source is not None:
        _stream_tensors(fd, tensors, meta, checksums=checksums, source=source)
        return
    if checksums:  # CUDA tensors staged a piece at a time (write_checksummed), not copied whole
        write_checksummed(fd, writable(tensors), meta)
        return
    keep = host_copies(tensors)
    head, layout = _plain_layout(keep, meta)
    os.pwrite(fd, head, 0)
    write_buffers(fd, len(head), [buffer_of(keep[name]) for name, _, _ in layout])


def write_file(
    dst: Path,
    tensors: Mapping[str, torch.Tensor],
    meta: dict[str, str],
    *,
    checksums: bool,
    source: Streamed | None = None,
) -> None:
    """One safetensors file of ``tensors`` with string ``meta``, atomically (torchkeep checksums if asked)."""
    with AtomicFile(dst) as f:
        _write_tensors(f.fd, tensors, meta, checksums=checksums, source=source)
        f.commit()


def write_torch(dst: Path, tree: Any) -> None:
    """``torch.save`` of ``tree`` to ``dst``, atomically (for tools that only read ``torch.load`` files)."""
    with AtomicFile(dst) as f:
        with os.fdopen(os.dup(f.fd), "wb") as fh:
            torch.save(tree, fh)
        f.commit()  # fsync, rename over dst, fsync the directory


def sharded_paths(dst: Path, n: int) -> tuple[list[Path], Path]:
    """``(shard paths, index path)`` for ``n`` shards of ``dst`` (see :func:`torchkeep.format.shards.shard_names`)."""
    shards, index = shard_names(dst.name, n)
    return [dst.with_name(s) for s in shards], dst.with_name(index)


def write_sharded(
    dst: Path,
    tensors: Mapping[str, torch.Tensor],
    groups: list[list[str]],
    meta: dict[str, str],
    index_meta: dict[str, Any],
    *,
    checksums: bool,
    source: Streamed | None = None,
) -> Path:
    """Every shard to a temp name (fsynced), then rename them all, then the index (atomically) last."""
    shards, index_path = sharded_paths(dst, len(groups))
    temps: list[tuple[Path, Path]] = []
    try:
        for shard, names in zip(shards, groups, strict=True):
            tmp = shard.with_name(f".{shard.name[:200]}.tmp-{secrets.token_hex(6)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            temps.append((tmp, shard))
            try:
                _write_tensors(fd, {n: tensors[n] for n in names}, meta, checksums=checksums, source=source)
                os.fsync(fd)
            finally:
                os.close(fd)
        while temps:
            tmp, shard = temps[0]
            os.replace(tmp, shard)
            temps.pop(0)
    finally:
        for tmp, _ in temps:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
    weight_map = {n: shard.name for shard, names in zip(shards, groups, strict=True) for n in names}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with AtomicFile(index_path) as f:
        os.write(f.fd, index_bytes(weight_map, total, index_meta))
        f.commit()
    fsync_dir(index_path.parent)
    return index_path


def write_model_dir(
    directory: Path,
    weights_name: str,
    flat: Flat,
    meta: dict[str, str],
    index_meta: dict[str, Any],
    *,
    max_shard_size: int | None,
    files: Mapping[str, str],
) -> Path:
    """A model folder: ``weights_name`` (or its shards + index above ``max_shard_size`` bytes) and
    the text ``files`` (``config.json``...), each written atomically; weights first, texts last.

    Shards or a single file left by an earlier save with the other layout are removed (they would
    shadow the new weights). Returns ``directory``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    groups = split_shards(tensor_sizes(flat.tensors), max_shard_size) if max_shard_size else [list(flat.tensors)]
    single = directory / weights_name
    stem = weights_name.removesuffix(".safetensors")
    old_shards = sorted(directory.glob(f"{stem}-*-of-*.safetensors"))
    if len(groups) > 1:
        written = write_sharded(single, flat.tensors, groups, meta, index_meta, checksums=True)
        keep = {p.name for p in sharded_paths(single, len(groups))[0]}
        stale = [single, *(p for p in old_shards if p.name not in keep)]
    else:
        write_file(single, flat.tensors, {**meta, TREE_KEY: tree_json(flat.skeleton)}, checksums=True)
        written = single
        stale = [directory / f"{weights_name}.index.json", *old_shards]
    for p in stale:
        if p != written:
            try:
                p.unlink()
            except FileNotFoundError:
                pass
    for name, text in files.items():
        with AtomicFile(directory / name) as f:
            os.write(f.fd, text.encode())
            f.commit()
    return directory

"""Convert checkpoints between formats: legacy ``torch.save`` -> torchkeep, torchkeep -> plain
safetensors or ``torch.save``, and sharded output with an HF-style index.

Formats (``to=``, or guessed from the output name):

- ``"torchkeep"`` (default for ``*.safetensors``): the whole state tree, checksummed.
- ``"safetensors"``: a plain safetensors file of the *weights only*, a flat
  ``{name: tensor}`` dict with string metadata, for tools that expect exactly that.
- ``"torch"`` (default for ``*.pt``, ``*.pth``, ``*.bin``, ``*.ckpt``): ``torch.save`` of
  the loaded tree, for old tools; it loads with ``torch.load(weights_only=True)``.
- ``"distributed"``: a torchkeep distributed checkpoint directory (see :mod:`torchkeep.distributed`),
  written as one rank; it restores on any number of ranks.

The input may also be a torchkeep distributed checkpoint directory: its manifest is verified
first (every file hashed), then its shards are gathered on this process. For ``"torchkeep"`` and
``"safetensors"`` output (sharded or not) this streams: the output layout comes from DCP's
metadata alone, and the tensors are read in batches of at most half of ``max_memory`` (a
larger tensor alone), each written at its offset, hashed and dropped before the next, so the
memory used stays about ``max_memory`` (twice the largest tensor if that is more), not the
model. ``"torch"`` and ``"distributed"`` output load the whole tree (each tensor read once into
its full-size buffer).

Sharded output (``max_shard_size``) writes ``name-00001-of-0000N.safetensors`` files and
``name.safetensors.index.json`` (``{"metadata": {"total_size": N}, "weight_map": {...}}``).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from torchkeep.api import host_copies, paused_gc, prepared, provenance_metadata, write_checksummed
from torchkeep.distributed.gather import Gathered, tensor_bytes
from torchkeep.errors import CheckpointNotFoundError, ConversionError, CorruptCheckpointError
from torchkeep.format.dtypes import DTYPE_TO_ST, ITEMSIZE
from torchkeep.format.header import FORMAT_KEY, HeaderBuilder
from torchkeep.hashing import Digests
from torchkeep.legacy import is_legacy
from torchkeep.reader import TREE_KEY, USER_KEY, Checkpoint
from torchkeep.storage.local import AtomicFile, buffer_of, fsync_dir, write_buffers
from torchkeep.tree import Flat, SkeletonError, flatten, unflatten

__all__ = [
    "DEFAULT_MAX_MEMORY",
    "FORMATS",
    "WEIGHT_KEYS",
    "convert",
    "input_size",
    "parse_size",
    "select_weights",
    "shard_names",
    "split_shards",
    "write_file",
    "write_sharded",
]

PathLike = str | os.PathLike[str]

FORMATS = ("torchkeep", "safetensors", "torch", "distributed")
_ALIASES = {
    "tk": "torchkeep",
    "st": "safetensors",
    "pt": "torch",
    "pth": "torch",
    "pytorch": "torch",
    "dcp": "distributed",
}
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
INDEX_SUFFIX = ".index.json"
#: Where the weights live in a state tree, tried in this order (torchkeep trees, then training-script wrappers).
WEIGHT_KEYS = ("model", "model_state_dict", "state_dict", "module", "net")
_BATCH = 64 << 20  # bytes read from the source per batch (one progress step)
#: About the most memory the tensors of a distributed checkpoint take while gathered (``convert(max_memory=)``).
DEFAULT_MAX_MEMORY = 1 << 30
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


def _format_for(dst: Path, to: str | None) -> str:
    if to is not None:
        fmt = _ALIASES.get(to.lower(), to.lower())
        if fmt not in FORMATS:
            raise ConversionError(f"unknown output format {to!r}; choose one of {', '.join(FORMATS)}")
        return fmt
    name = dst.name.lower()
    if name.endswith((".safetensors", ".safetensors" + INDEX_SUFFIX)):
        return "torchkeep"
    if name.endswith(_TORCH_SUFFIXES):
        return "torch"
    raise ConversionError(
        f"{dst}: cannot tell the output format from the name; end it in .safetensors or .pt, "
        f"or pass to= one of {', '.join(FORMATS)}"
    )


def _is_index(path: Path) -> bool:
    return path.name.endswith(INDEX_SUFFIX)


def input_size(src: PathLike) -> int:
    """Bytes of input :func:`convert` reads from ``src`` (all shards for an index file).

    A distributed checkpoint directory is read twice: every file once to verify it against the
    manifest, then the tensors (their bytes per DCP's metadata) once more to gather them.
    """
    src = Path(src)
    from torchkeep.distributed.manifest import is_torchkeep_dcp, read_manifest

    if is_torchkeep_dcp(src):
        return sum(e["bytes"] for e in read_manifest(src)["files"].values()) + tensor_bytes(src)
    if _is_index(src):
        return sum((src.parent / f).stat().st_size for f in set(_read_index(src)["weight_map"].values()))
    return src.stat().st_size


# -- reading ------------------------------------------------------------------------------------


def _read_index(path: Path) -> dict[str, Any]:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptCheckpointError(path, f"the index is not valid JSON ({e})") from None
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise CorruptCheckpointError(path, 'the index has no "weight_map" object')
    for f in index["weight_map"].values():
        if not isinstance(f, str) or "/" in f or "\\" in f or f in ("", ".", ".."):
            raise CorruptCheckpointError(path, f"the weight_map names {f!r}, not a file beside the index")
    return index


def _batches(specs: Iterable[Any]) -> list[list[str]]:
    out: list[list[str]] = []
    size = _BATCH
    for s in specs:
        if size + s.nbytes > _BATCH and (not out or out[-1]):
            out.append([])
            size = 0
        out[-1].append(s.name)
        size += s.nbytes
    return [b for b in out if b]


def _read_all(ck: Checkpoint, progress: Callable[[int], None] | None) -> dict[str, torch.Tensor]:
    """Every tensor of ``ck`` (checksums verified), read in ~64 MiB batches for progress reports."""
    out: dict[str, torch.Tensor] = {}
    for names in _batches(ck.header.tensors.values()):
        out.update(ck.read(names))
        if progress is not None:
            progress(sum(ck.header.tensors[n].nbytes for n in names))
    return out


def _build(path: Path, skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if skeleton is None:
        return tensors
    try:
        return unflatten(skeleton, tensors.__getitem__)
    except (SkeletonError, KeyError) as e:
        raise CorruptCheckpointError(path, f"the state tree does not match the tensors ({e})") from None


def read_tree(
    src: PathLike, *, trust_pickle: bool = False, progress: Callable[[int], None] | None = None
) -> tuple[Any, dict[str, Any]]:
    """``(state tree, user metadata)`` of any checkpoint, on the CPU, checksums verified.

    Reads torchkeep and plain safetensors files, ``*.safetensors.index.json`` shard sets and
    legacy ``torch.save`` files (through :func:`torchkeep.load`: ``weights_only=True``).
    """
    src = Path(os.fspath(src)).expanduser()
    if not src.exists():
        raise CheckpointNotFoundError(src)
    from torchkeep.distributed.manifest import TREE_FILE, is_torchkeep_dcp

    if is_torchkeep_dcp(src):
        from torchkeep.distributed.resume import load_tree

        tree = load_tree(src)
        if progress is not None:
            progress(input_size(src))
        with Checkpoint(src / TREE_FILE) as ck:
            return tree, ck.metadata
    if _is_index(src):
        index = _read_index(src)
        tensors: dict[str, torch.Tensor] = {}
        for shard in dict.fromkeys(index["weight_map"].values()):
            with Checkpoint(src.parent / shard) as ck:
                tensors.update(_read_all(ck, progress))
        meta = index.get("metadata") or {}
        missing = sorted(set(index["weight_map"]) - set(tensors))
        if missing:
            raise CorruptCheckpointError(src, f"tensors named in the weight_map are in no shard: {missing[:10]}")
        user = meta.get(USER_KEY) if isinstance(meta.get(USER_KEY), dict) else {}
        return _build(src, meta.get(TREE_KEY), tensors), user
    if src.is_file():
        with open(src, "rb") as fh:
            legacy = is_legacy(fh.read(8))
        if legacy:
            from torchkeep.api import load  # api imports the writer side lazily; avoid a cycle

            tree = load(src, map_location="cpu", trust_pickle=trust_pickle)
            if progress is not None:
                progress(src.stat().st_size)
            return tree, {}
    with Checkpoint(src) as ck:
        tensors = _read_all(ck, progress)
        return _build(src, ck.skeleton if ck.has_tree else None, tensors), ck.metadata


# -- writing a gathered distributed checkpoint, streaming ---------------------------------------


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
    fd: int, tensors: Mapping[str, torch.Tensor], meta: dict[str, str], *, checksums: bool, source: Gathered
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


# -- choosing the weights -----------------------------------------------------------------------


def _dotted(node: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(node, torch.Tensor):
        out[prefix] = node
    elif isinstance(node, Mapping):
        for k, v in node.items():
            _dotted(v, f"{prefix}.{k}" if prefix else str(k), out)
    # other leaves (numbers, strings, lists) are not weights


def select_weights(tree: Any, key: str | None = None) -> dict[str, torch.Tensor]:
    """The flat ``{name: tensor}`` weights of a state tree.

    The rule: ``key`` (a ``/``-separated path such as ``"ema/model"``) when given; else the
    whole tree when it is a dict of tensors; else the first of :data:`WEIGHT_KEYS`
    (``model``, ``model_state_dict``, ``state_dict``, ``module``, ``net``) that holds tensors.
    Nested dicts below it are joined with ``.``; non-tensor leaves are left out.

    Example:
        >>> import torch
        >>> sorted(select_weights({"epoch": 3, "model": {"w": torch.ones(1)}}))
        ['w']
    """
    if isinstance(tree, torch.nn.Module):
        tree = tree.state_dict()
    node = tree
    if key is not None:
        for part in [p for p in key.split("/") if p]:
            if not isinstance(node, Mapping):
                raise ConversionError(f"key {key!r}: {part!r} is inside a {type(node).__name__}, not a dict")
            match = next((k for k in node if str(k) == part), _MISSING)
            if match is _MISSING:
                raise ConversionError(f"key {key!r}: no {part!r} here; the keys are {sorted(map(str, node))[:10]}")
            node = node[match]
    elif isinstance(tree, Mapping) and not all(isinstance(v, torch.Tensor) for v in tree.values()):
        node = next(
            (tree[k] for k in WEIGHT_KEYS if k in tree and isinstance(tree[k], Mapping) and _has_tensor(tree[k])),
            _MISSING,
        )
        if node is _MISSING:
            raise ConversionError(
                "cannot tell where the weights are: the checkpoint's top-level keys are "
                f"{sorted(map(str, tree))[:10]}, none of {', '.join(WEIGHT_KEYS)}; pick the subtree with "
                "key='NAME' (CLI: --key NAME)"
            )
    weights: dict[str, torch.Tensor] = {}
    _dotted(node, "", weights)
    if not weights:
        raise ConversionError(f"no tensors at {key or '<root>'}; pick the subtree that holds the weights with key=")
    return weights


_MISSING = object()


def _has_tensor(node: Any) -> bool:
    if isinstance(node, torch.Tensor):
        return True
    if isinstance(node, Mapping):
        return any(_has_tensor(v) for v in node.values())
    return False


# -- writing ------------------------------------------------------------------------------------


def _plain_meta(user: Mapping[str, Any]) -> dict[str, str]:
    meta = {"format": "pt"}
    for k, v in user.items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
    return meta


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
        end = offset + math.prod(shape) * ITEMSIZE[st]
        head[name] = {"dtype": st, "shape": list(shape), "data_offsets": [offset, end]}
        layout.append((name, offset, end - offset))
        offset = end
    raw = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, layout


def _write_tensors(
    fd: int,
    tensors: Mapping[str, torch.Tensor],
    meta: dict[str, str],
    *,
    checksums: bool,
    source: Gathered | None = None,
) -> None:
    """One safetensors file into ``fd``: torchkeep-checksummed when ``checksums``, else plain.

    With ``source`` (a distributed checkpoint being gathered) ``tensors`` may hold its stand-ins:
    the data is then read batch by batch (:func:`_stream_tensors`).
    """
    for name, t in tensors.items():
        if t.dtype not in DTYPE_TO_ST:
            raise ConversionError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
    if source is not None:
        _stream_tensors(fd, tensors, meta, checksums=checksums, source=source)
        return
    keep = host_copies(tensors)
    if checksums:
        write_checksummed(fd, keep, meta)
        return
    head, layout = _plain_layout(keep, meta)
    os.pwrite(fd, head, 0)
    write_buffers(fd, len(head), [buffer_of(keep[name]) for name, _, _ in layout])


def write_file(
    dst: Path,
    tensors: Mapping[str, torch.Tensor],
    meta: dict[str, str],
    *,
    checksums: bool,
    source: Gathered | None = None,
) -> None:
    """One safetensors file of ``tensors`` with string ``meta``, atomically (torchkeep checksums if asked)."""
    with AtomicFile(dst) as f:
        _write_tensors(f.fd, tensors, meta, checksums=checksums, source=source)
        f.commit()


def _write_torch(dst: Path, tree: Any) -> None:
    with AtomicFile(dst) as f:
        with os.fdopen(os.dup(f.fd), "wb") as fh:
            torch.save(tree, fh)
        f.commit()  # fsync, rename over dst, fsync the directory


def shard_names(dst: Path, n: int) -> tuple[list[Path], Path]:
    """``(shard paths, index path)`` for ``n`` shards of ``dst`` (HF naming).

    Example:
        >>> shards, index = shard_names(Path("out/model.safetensors"), 2)
        >>> [p.name for p in shards], index.name
        (['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors'], 'model.safetensors.index.json')
    """
    name = dst.name[: -len(INDEX_SUFFIX)] if _is_index(dst) else dst.name
    stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else name
    shards = [dst.with_name(f"{stem}-{i:05d}-of-{n:05d}.safetensors") for i in range(1, n + 1)]
    return shards, dst.with_name(f"{stem}.safetensors{INDEX_SUFFIX}")


def split_shards(tensors: Mapping[str, torch.Tensor], limit: int) -> list[list[str]]:
    """Greedy, in order; a tensor larger than ``limit`` gets a shard of its own."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    return groups


def write_sharded(
    src: Path,
    dst: Path,
    tensors: Mapping[str, torch.Tensor],
    groups: list[list[str]],
    meta: dict[str, str],
    index_meta: dict[str, Any],
    *,
    checksums: bool,
    source: Gathered | None = None,
) -> Path:
    """Every shard to a temp name (fsynced), then rename them all, then the index (atomically) last."""
    shards, index_path = shard_names(dst, len(groups))
    _refuse_same(src, [*shards, index_path])
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
    index = {"metadata": {"total_size": total, **index_meta}, "weight_map": weight_map}
    with AtomicFile(index_path) as f:
        os.write(f.fd, json.dumps(index, indent=2, ensure_ascii=False).encode() + b"\n")
        f.commit()
    fsync_dir(index_path.parent)
    return index_path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _refuse_same(src: Path, outputs: Iterable[Path]) -> None:
    inputs = [src]
    if _is_index(src) and src.is_file():
        inputs += [src.parent / f for f in set(_read_index(src)["weight_map"].values())]
    for out in outputs:
        for inp in inputs:
            if _same_file(inp, out):
                raise ConversionError(
                    f"{out}: the output would overwrite the input {inp}; the source is never modified, "
                    "so write to another name"
                )


def convert(
    src: PathLike,
    dst: PathLike,
    *,
    to: str | None = None,
    max_shard_size: int | str | None = None,
    trust_pickle: bool = False,
    key: str | None = None,
    progress: Callable[[int], None] | None = None,
    max_memory: int | str | None = None,
) -> Path:
    """Convert a checkpoint to another format; the source is never modified.

    The input may be a legacy ``torch.save`` file (read safely, ``weights_only=True``), a
    torchkeep or plain safetensors file, a ``*.safetensors.index.json`` shard set, or a
    torchkeep distributed checkpoint directory (see :mod:`torchkeep.distributed`).
    Outputs are written atomically (temp file, fsync, rename): a failed conversion leaves
    any previous ``dst`` as it was.

    A distributed checkpoint is verified against its manifest first (nothing is written
    if a file is damaged), then, for ``"torchkeep"`` and ``"safetensors"`` output, gathered
    in bounded memory: its tensors are read through DCP in batches of at most ``max_memory``
    bytes, each written at its offset in the output and freed before the next. The output
    is byte for byte what gathering the whole tree first would write.

    Args:
        src: the checkpoint to read.
        dst: the file to write; must differ from ``src``.
        to: ``"torchkeep"`` (whole tree, checksummed; default for ``*.safetensors``),
            ``"safetensors"`` (plain flat weights only, see :func:`select_weights`),
            ``"torch"`` (``torch.save`` of the tree; default for ``*.pt``/``*.pth``/``*.bin``/``*.ckpt``)
            or ``"distributed"`` (a torchkeep distributed checkpoint directory).
        max_shard_size: split the tensors into shards of at most this many bytes
            (``5_000_000_000``, ``"5GB"``, ``"500MB"``, ``"4GiB"``): writes
            ``name-00001-of-0000N.safetensors`` and ``name.safetensors.index.json`` (returned).
            When everything fits in one shard, a single ``dst`` file is written.
            torchkeep shards carry checksums; the tree skeleton goes in the index metadata.
        trust_pickle: allow legacy pickles that need more than plain data (runs their code!).
        key: for ``to="safetensors"``: the ``/``-path of the subtree holding the weights.
        progress: called with the number of input bytes read after each batch (for progress bars);
            the calls add up to :func:`input_size` for a distributed checkpoint.
        max_memory: for a distributed checkpoint: about the most memory its tensors take while
            gathering (``"1GiB"`` default, :data:`DEFAULT_MAX_MEMORY`): batches of half of it,
            the other half for the chunks DCP reads them from. A tensor larger than half is read
            alone and takes twice its size. Ignored for other inputs.

    Returns:
        The path written (the index file for sharded output).

    Raises:
        ConversionError: ``dst`` is ``src``, unknown format, weights not found, bad shard or memory size.
        CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError: reading ``src``.

    Example:
        >>> import torch, torchkeep as tk, tempfile, os
        >>> from torchkeep.convert import convert
        >>> d = tempfile.mkdtemp()
        >>> torch.save({"epoch": 2, "model_state_dict": {"w": torch.ones(2)}}, os.path.join(d, "old.pt"))
        >>> p = convert(os.path.join(d, "old.pt"), os.path.join(d, "new.safetensors"))
        >>> tk.load(p)["epoch"]
        2
    """
    src = Path(os.fspath(src)).expanduser()
    dst = Path(os.fspath(dst)).expanduser()
    fmt = _format_for(dst, to)
    limit = parse_size(max_shard_size)
    memory = parse_size(max_memory, "max_memory") or DEFAULT_MAX_MEMORY
    if limit is not None and fmt in ("torch", "distributed"):
        raise ConversionError("max_shard_size needs a safetensors output (to='torchkeep' or 'safetensors')")
    if not src.exists():
        raise CheckpointNotFoundError(src)
    if dst.is_dir() and fmt != "distributed":
        raise ConversionError(f"{dst}: is a directory; give a file name such as {dst / 'model.safetensors'}")
    _refuse_same(src, [dst])
    from torchkeep.distributed.manifest import is_torchkeep_dcp

    if fmt in ("torchkeep", "safetensors") and is_torchkeep_dcp(src):
        source = Gathered(src, memory, progress)
        try:
            with paused_gc():
                out = _convert_tree(src, dst, fmt, limit, key, source.tree, source.user, source)
            source.finish()
            return out
        except BaseException as e:
            source.src.named(e)
            raise
        finally:
            source.close()
    tree, user = read_tree(src, trust_pickle=trust_pickle, progress=progress)
    return _convert_tree(src, dst, fmt, limit, key, tree, user, None)


def _convert_tree(
    src: Path,
    dst: Path,
    fmt: str,
    limit: int | None,
    key: str | None,
    tree: Any,
    user: dict[str, Any],
    source: Gathered | None,
) -> Path:
    """Write ``tree`` as ``fmt``; with ``source``, its tensors may be stand-ins gathered while writing."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torch":
        _write_torch(dst, tree)
        return dst
    if fmt == "distributed":
        from torchkeep.distributed.checkpoint import save as save_distributed

        return save_distributed(tree, dst, metadata=user or None)  # type: ignore[return-value]
    if fmt == "safetensors":
        tensors: Mapping[str, torch.Tensor] = select_weights(tree, key)
        meta, index_meta, checksums = _plain_meta(user), {}, False
    else:
        flat = flatten(tree)
        tensors = flat.tensors
        meta = provenance_metadata()
        index_meta = {FORMAT_KEY: meta[FORMAT_KEY], TREE_KEY: flat.skeleton}
        if user:
            index_meta[USER_KEY] = user
        checksums = True
    groups = split_shards(tensors, limit) if limit is not None else [list(tensors)]
    if len(groups) > 1:
        return write_sharded(src, dst, tensors, groups, meta, index_meta, checksums=checksums, source=source)
    if _is_index(dst):
        dst = dst.with_name(dst.name[: -len(INDEX_SUFFIX)])
        _refuse_same(src, [dst])
    if fmt == "torchkeep":
        if source is None:
            from torchkeep.api import save

            return save(tree, dst, metadata=user or None)
        # what save() writes: the same header metadata, the tensors streamed in
        _, meta = prepared(Flat(skeleton=flat.skeleton), user or None)
    write_file(dst, tensors, meta, checksums=checksums, source=source)
    return dst

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
- ``"hf"``: a Hugging Face model folder that ``from_pretrained`` loads (``config.json`` and the
  weights under the library's names, see :mod:`torchkeep.pretrained`), from the model subtree of a
  training checkpoint and the model's config (``config=``, or a ``config`` dict in the tree).

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
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from torchkeep import kinds
from torchkeep.distributed.gather import Gathered, tensor_bytes
from torchkeep.errors import ArgumentTypeError, ConversionError
from torchkeep.format.header import FORMAT_KEY
from torchkeep.format.meta import OUTPUT_FORMATS, TREE_KEY, USER_KEY
from torchkeep.format.shards import INDEX_SUFFIX, is_index_name, parse_size, split_shards
from torchkeep.headers import HeaderFile
from torchkeep.runtime import paused_gc
from torchkeep.sources import read_tree as read_source
from torchkeep.storage.dcp_manifest import TREE_FILE, read_manifest
from torchkeep.storage.paths import as_path
from torchkeep.tree import Flat, flatten
from torchkeep.writer import (
    prepared,
    provenance_metadata,
    save_flat,
    sharded_paths,
    tensor_sizes,
    write_file,
    write_sharded,
    write_torch,
)

__all__ = [
    "DEFAULT_MAX_MEMORY",
    "FORMATS",
    "WEIGHT_KEYS",
    "convert",
    "input_size",
    "parse_size",
    "read_tree",
    "select_weights",
]

PathLike = str | os.PathLike[str]

FORMATS = OUTPUT_FORMATS
_ALIASES = {
    "tk": "torchkeep",
    "st": "safetensors",
    "pt": "torch",
    "pth": "torch",
    "pytorch": "torch",
    "dcp": "distributed",
    "huggingface": "hf",
    "transformers": "hf",
    "diffusers": "hf",
}
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
#: Where the weights live in a state tree, tried in this order (torchkeep trees, then training-script wrappers).
WEIGHT_KEYS = ("model", "model_state_dict", "state_dict", "module", "net")
#: About the most memory the tensors of a distributed checkpoint take while gathered (``convert(max_memory=)``).
DEFAULT_MAX_MEMORY = 1 << 30


def _format_for(dst: Path, to: str | None) -> str:
    if to is not None:
        if not isinstance(to, str):
            raise ArgumentTypeError(
                "to", to, f"a format name, one of {', '.join(FORMATS)}, or None to pick it from dst"
            )
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


def input_size(src: PathLike) -> int:
    """Bytes of input :func:`convert` reads from ``src`` (all shards of a sharded checkpoint).

    A distributed checkpoint directory is read twice: every file once to verify it against the
    manifest, then the tensors (their bytes per DCP's metadata) once more to gather them.
    """
    found = kinds.detect(src, operation="convert")
    if found.kind == kinds.TORCHKEEP_DCP:
        return sum(e["bytes"] for e in read_manifest(found.path)["files"].values()) + tensor_bytes(found.path)
    if found.kind == kinds.DCP:
        return sum(f.stat().st_size for f in found.path.iterdir() if f.is_file())
    return sum(f.stat().st_size for f in found.shards)


# -- reading ------------------------------------------------------------------------------------


def read_tree(
    src: PathLike,
    *,
    trust_pickle: bool = False,
    progress: Callable[[int], None] | None = None,
    allow_globals: Any = None,
) -> tuple[Any, dict[str, Any]]:
    """``(state tree, user metadata)`` of any checkpoint, on the CPU, checksums verified.

    Any kind :func:`torchkeep.kinds.detect` knows; a torchkeep distributed checkpoint comes back
    as its whole tree (through :func:`torchkeep.distributed.load_tree`), legacy ``torch.save``
    files through ``torch.load(weights_only=True)``.
    """
    return _read(kinds.detect(src, operation="convert"), trust_pickle, progress, allow_globals)


def _read(
    found: kinds.Detected, trust_pickle: bool, progress: Callable[[int], None] | None, allow_globals: Any = None
) -> tuple[Any, dict[str, Any]]:
    if found.kind == kinds.TORCHKEEP_DCP:
        from torchkeep.distributed.resume import load_tree  # torch.distributed: only for this kind

        tree = load_tree(found.path)
        if progress is not None:
            progress(input_size(found.path))
        with HeaderFile(found.path / TREE_FILE) as hf:
            return tree, hf.metadata
    return read_source(found, trust_pickle=trust_pickle, progress=progress, allow_globals=allow_globals)


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


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _refuse_same(found: kinds.Detected, outputs: Iterable[Path]) -> None:
    inputs = [found.path, *found.shards]
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
    allow_globals: Any = None,
    max_memory: int | str | None = None,
    config: Any = None,
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
            ``"distributed"`` (a torchkeep distributed checkpoint directory) or ``"hf"`` (a
            Hugging Face model folder, ``dst`` a directory: needs ``config``).
        max_shard_size: split the tensors into shards of at most this many bytes
            (``5_000_000_000``, ``"5GB"``, ``"500MB"``, ``"4GiB"``): writes
            ``name-00001-of-0000N.safetensors`` and ``name.safetensors.index.json`` (returned).
            When everything fits in one shard, a single ``dst`` file is written.
            torchkeep shards carry checksums; the tree skeleton goes in the index metadata.
        trust_pickle: allow legacy pickles that need more than plain data (runs their code!).
        allow_globals: extra globals a legacy pickle may use, as in :func:`torchkeep.load`.
        key: for ``to="safetensors"`` and ``"hf"``: the ``/``-path of the subtree holding the weights.
        progress: called with the number of input bytes read after each batch (for progress bars);
            the calls add up to :func:`input_size` for a distributed checkpoint.
        max_memory: for a distributed checkpoint: about the most memory its tensors take while
            gathering (``"1GiB"`` default, :data:`DEFAULT_MAX_MEMORY`): batches of half of it,
            the other half for the chunks DCP reads them from. A tensor larger than half is read
            alone and takes twice its size. Ignored for other inputs.
        config: for ``to="hf"``: the model's config (a ``transformers``/``diffusers`` config, its
            dict, or the path of a ``config.json`` or of the folder holding one). Default: the
            tree's top-level ``config`` when it is such a dict. The model is built from it and
            the weights are loaded into it strictly before anything is written (the checkpoint
            and the config must agree); memory: the weights twice.

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
    src = as_path(src, "src")
    dst = as_path(dst, "dst")
    fmt = _format_for(dst, to)
    limit = parse_size(max_shard_size)
    memory = parse_size(max_memory, "max_memory") or DEFAULT_MAX_MEMORY
    if limit is not None and fmt in ("torch", "distributed"):
        raise ConversionError("max_shard_size needs a safetensors output (to='torchkeep' or 'safetensors')")
    found = kinds.detect(src, operation="convert")
    if fmt == "hf":
        _refuse_inside(found, dst)
        tree, user = _read(found, trust_pickle, progress, allow_globals)
        return _to_hf(tree, user, dst, key, config, max_shard_size)
    if dst.is_dir() and fmt != "distributed":
        raise ConversionError(f"{dst}: is a directory; give a file name such as {dst / 'model.safetensors'}")
    _refuse_same(found, [dst])
    if fmt in ("torchkeep", "safetensors") and found.kind == kinds.TORCHKEEP_DCP:
        source = Gathered(found.path, memory, progress)
        try:
            with paused_gc():
                out = _convert_tree(found, dst, fmt, limit, key, source.tree, source.user, source)
            source.finish()
            return out
        except BaseException as e:
            source.src.named(e)
            raise
        finally:
            source.close()
    tree, user = _read(found, trust_pickle, progress, allow_globals)
    return _convert_tree(found, dst, fmt, limit, key, tree, user, None)


def _refuse_inside(found: kinds.Detected, dst: Path) -> None:
    for inp in [found.path, *found.shards]:
        if _same_file(inp.parent, dst) or _same_file(inp, dst):
            raise ConversionError(
                f"{dst}: the output folder holds the input {inp}; the source is never modified, so write to another folder"
            )


def _to_hf(tree: Any, user: dict[str, Any], dst: Path, key: str | None, config: Any, limit: Any) -> Path:
    from torchkeep import pretrained

    if config is None:
        found = tree.get("config") if isinstance(tree, Mapping) else None
        if not (isinstance(found, Mapping) and ("model_type" in found or "_class_name" in found)):
            raise ConversionError(
                "to='hf' needs the model's config to build the model from: pass config= (a transformers config, "
                "its dict, or the path of its config.json); the checkpoint has no 'config' dict with a 'model_type'"
            )
        config = found
    model = pretrained.model_for_weights(config, select_weights(tree, key))
    return pretrained.save(model, dst, metadata=user or None, max_shard_size="5GB" if limit is None else limit)


def _convert_tree(
    src: kinds.Detected,
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
        write_torch(dst, tree)
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
    groups = split_shards(tensor_sizes(tensors), limit) if limit is not None else [list(tensors)]
    if len(groups) > 1:
        shards, index = sharded_paths(dst, len(groups))
        _refuse_same(src, [*shards, index])
        return write_sharded(dst, tensors, groups, meta, index_meta, checksums=checksums, source=source)
    if is_index_name(dst.name):
        dst = dst.with_name(dst.name[: -len(INDEX_SUFFIX)])
        _refuse_same(src, [dst])
    if fmt == "torchkeep":
        if source is None:
            return save_flat(flat, dst, metadata=user or None)
        # what save() writes: the same header metadata, the tensors streamed in
        _, meta = prepared(Flat(skeleton=flat.skeleton), user or None)
    write_file(dst, tensors, meta, checksums=checksums, source=source)
    return dst

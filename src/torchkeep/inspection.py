"""Read-only looks at a checkpoint file: :func:`inspect` (header only) and :func:`verify` (checksums).

Both are what ``torchkeep inspect`` and ``torchkeep verify`` print; they return plain,
JSON-able dicts so scripts can use them directly.

Example:
    >>> import torch, torchkeep as tk, tempfile, os
    >>> p = tk.save({"w": torch.zeros(2, 3), "step": 5}, os.path.join(tempfile.mkdtemp(), "c.safetensors"))
    >>> tk.inspect(p)["elements"], tk.verify(p)["ok"]
    (6, True)
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from torchkeep import kinds, pickle_view
from torchkeep.container import read_zip
from torchkeep.errors import ChecksumMismatchError, CorruptCheckpointError, MissingShardError
from torchkeep.format.dtypes import ST_TO_NAME
from torchkeep.format.header import FORMAT_KEY, TensorSpec
from torchkeep.format.meta import MODEL_KEY, TREE_KEY, USER_KEY
from torchkeep.headers import HeaderFile
from torchkeep.runtime import paused_gc
from torchkeep.storage.dcp_manifest import TREE_FILE, read_manifest, verify_all
from torchkeep.storage.paths import as_path
from torchkeep.summary import summarise

__all__ = ["inspect", "verify"]

_STORAGE_ENTRY = re.compile(r"^data/\d+$")
_DTYPE_NAMES = ST_TO_NAME


def _convert_hint(path: Path) -> str:
    target = path.with_suffix(".safetensors")
    return f"Convert it once, if you trust its source: torchkeep convert {path} {target} (Python: tk.convert)"


def _legacy_summary(path: Path, kind: str, depth: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "path": str(path),
        "file_size": path.stat().st_size,
        "format": kind,
        "legacy": True,
        "hint": "a legacy pickle-based file, inspected without unpickling it. " + _convert_hint(path),
    }
    if kind == kinds.LEGACY_ZIP:
        # The zip directory, read as torch's reader reads it (an ambiguous archive is refused), lists
        # one entry per tensor storage; reading it runs no pickle code.
        archive = read_zip(path)
        storages = [e for e, r in zip(archive.entries, archive.records(), strict=True) if _STORAGE_ENTRY.match(r)]
        out["storages"] = len(storages)
        out["storage_bytes"] = sum(e.size for e in storages)
        seen = pickle_view.view(path)  # keys, dtypes and shapes from the pickle's opcodes, nothing run
        if seen is not None:
            skeleton, specs = seen
            tree, params = summarise(skeleton, specs, depth)
            out.update(_counts(specs, params), tree=tree)
            if isinstance(skeleton, dict) and "S" in skeleton:
                out["hint"] = (
                    f"a whole pickled object ({skeleton['S']}), inspected without unpickling it; loading it runs "
                    "code from the file. If you trust its source, keep its weights: "
                    f"torchkeep convert {path} {path.with_suffix('.safetensors')} --trust-pickle"
                )
    return out


def _counts(specs: dict[str, TensorSpec], params: int | None) -> dict[str, Any]:
    """``tensors``, ``elements``, ``parameters`` and the ``dtypes`` table of a set of tensors."""
    dtypes: dict[str, dict[str, int]] = {}
    for s in specs.values():
        d = dtypes.setdefault(_DTYPE_NAMES[s.dtype], {"tensors": 0, "elements": 0, "bytes": 0})
        d["tensors"] += 1
        d["elements"] += math.prod(s.shape)
        d["bytes"] += s.nbytes
    elements = sum(d["elements"] for d in dtypes.values())
    return {
        "tensors": len(specs),
        "elements": elements,
        "parameters": elements if params is None else params,
        "dtypes": dict(sorted(dtypes.items(), key=lambda kv: (-kv[1]["bytes"], kv[0]))),
    }


def inspect(path: str | os.PathLike[str], *, depth: int | None = None) -> dict[str, Any]:
    """Summarise a checkpoint from its header alone; no tensor data is read.

    Works on torchkeep files, plain safetensors files, torchkeep distributed checkpoint
    directories (adding ``world_size`` and ``files``; entries held in the shards have kind
    ``sharded`` and counts only) and (without unpickling them) legacy ``torch.save`` files,
    for which it reports the format, how to convert and, for a ``torch.save`` zip, the keys,
    dtypes and shapes read from its pickle's opcodes (:mod:`torchkeep.pickle_view`; nothing in
    the file runs).

    Args:
        path: the file.
        depth: keep tree nodes down to this many levels (deeper ones keep their
            counts and ``children_omitted``); ``None`` keeps the whole tree.

    Returns:
        A JSON-able dict: ``path``, ``file_size``, ``header_size``, ``format``
        (``"torchkeep/1"``, ``"safetensors"``, or ``"torch.save (zip)"`` with
        ``legacy: True`` and a ``hint``), ``torchkeep_version``, ``torch_version``,
        ``created``, ``metadata`` (user metadata), ``tensors`` (stored tensors),
        ``elements`` (their total element count), ``parameters`` (elements held in
        module state dicts, or all elements when the file holds no module), ``bytes``
        (data section), ``dtypes`` (``{name: {tensors, elements, bytes}}``, largest
        first) and ``tree``: one node per top-level entry with ``name``, ``kind``
        (``module``, ``optimizer``, ``scheduler``, ``rng_state``, ``dict``, ``int``, ...),
        ``class`` for Stateful leaves, ``tensors``/``elements``/``bytes`` (each stored
        tensor counted once per subtree) and ``children`` or ``value``. Tensor nodes add
        ``key`` (the stored name), ``dtype``, ``shape``, and ``tied`` when they share
        storage with another leaf.

    Raises:
        CheckpointNotFoundError: no such file.
        CorruptCheckpointError: not a readable checkpoint (ChecksumMismatchError for a damaged header).

    Example:
        >>> import torch, torchkeep as tk, tempfile, os
        >>> model = torch.nn.Linear(4, 2)
        >>> p = os.path.join(tempfile.mkdtemp(), "c.safetensors")
        >>> _ = tk.save({"model": model, "epoch": 3}, p, metadata={"run": "a"})
        >>> info = tk.inspect(p)
        >>> info["format"], info["tensors"], info["parameters"], info["metadata"]
        ('torchkeep/1', 2, 10, {'run': 'a'})
        >>> [(n["name"], n["kind"], n["elements"]) for n in info["tree"]]
        [('model', 'module', 10), ('epoch', 'int', 0)]
    """
    found = kinds.detect(path, operation="inspect")
    if found.kind == kinds.TORCHKEEP_DCP:
        return _distributed_summary(found.path, depth)
    if found.kind == kinds.DCP:
        return _dcp_summary(found.path)
    if found.legacy:
        assert found.file is not None
        return _legacy_summary(found.file, found.kind, depth)
    files = found.shards
    if any(kinds.is_legacy_kind(k) for k in found.shard_kinds.values()):
        return _legacy_shards_summary(found)
    with paused_gc(), ExitStack() as stack:
        opened = [stack.enter_context(HeaderFile(f, verify=False)) for f in files]
        specs: dict[str, TensorSpec] = {}
        for hf in opened:
            specs.update(hf.header.tensors)
        first = opened[0]
        meta = dict(first.header.metadata)
        if found.index is not None:  # the shard set's tree, user metadata and model record live in the index
            imeta = found.index.metadata
            skeleton = imeta.get(TREE_KEY)
            user = imeta[USER_KEY] if isinstance(imeta.get(USER_KEY), dict) else {}
            meta.update((k, v if isinstance(v, str) else json.dumps(v)) for k, v in imeta.items() if k == MODEL_KEY)
            specs = {n: specs[n] for n in found.index.weight_map if n in specs}
        else:
            skeleton = first.skeleton
            user = first.metadata
        where = found.target
        try:
            tree, params = summarise(skeleton, specs, depth)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError) as e:
            raise CorruptCheckpointError(where, f"the state tree in the header is malformed ({e!r})") from None
        file_size = sum(hf.header.file_size for hf in opened)
        header_size = sum(hf.header.size for hf in opened)
        data = sum(hf.header.file_size - hf.header.size for hf in opened)
        checksums = all(hf.header.checksums is not None for hf in opened)
    out = {
        "path": str(where),
        "file_size": file_size,
        "header_size": header_size,
        "format": meta.get(FORMAT_KEY) or "safetensors",
        "torchkeep_version": meta.get("torchkeep.library"),
        "torch_version": meta.get("torchkeep.torch"),
        "created": meta.get("torchkeep.created"),
        "checksums": checksums,
        "metadata": user,
        **_counts(specs, params),
        "bytes": data,
        "tree": tree,
        **_model_record(meta),
    }
    if found.index is not None:
        out["shards"] = len(files)
        out["files"] = [f.name for f in files]
    return out


def _legacy_shards_summary(found: kinds.Detected) -> dict[str, Any]:
    """:func:`inspect` of shards written by ``torch.save`` (``pytorch_model.bin.index.json``): the index and the zip directories."""
    assert found.index is not None
    shards = [_legacy_summary(f, found.shard_kinds[f.name]) for f in found.shards]
    return {
        "path": str(found.target),
        "file_size": sum(s["file_size"] for s in shards),
        "format": f"sharded {found.shard_kinds[found.index.shards[0]]}",
        "legacy": True,
        "shards": len(shards),
        "files": [f.name for f in found.shards],
        "tensors": len(found.index.weight_map),
        "storage_bytes": sum(s.get("storage_bytes", 0) for s in shards),
        "metadata": {k: v for k, v in found.index.metadata.items() if k != "total_size"},
        "hint": "legacy pickle-based shards, inspected without unpickling them. Convert them once, if you trust "
        f"their source: torchkeep convert {found.target} model.safetensors",
    }


def _dcp_summary(path: Path) -> dict[str, Any]:
    """:func:`inspect` of a plain ``torch.distributed.checkpoint`` directory, from its metadata (allowlist unpickler)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from torchkeep.dcp import read_metadata

    md = read_metadata(path)
    dtypes: dict[str, dict[str, int]] = {}
    nodes = []
    for key, m in md.state_dict_metadata.items():
        if not isinstance(m, TensorStorageMetadata):
            nodes.append({"name": key, "kind": "object", "tensors": 0, "elements": 0, "bytes": 0})
            continue
        n = math.prod(m.size)
        name = str(m.properties.dtype).removeprefix("torch.")
        nbytes = n * m.properties.dtype.itemsize
        d = dtypes.setdefault(name, {"tensors": 0, "elements": 0, "bytes": 0})
        d["tensors"] += 1
        d["elements"] += n
        d["bytes"] += nbytes
        nodes.append(
            {
                "name": key,
                "kind": "tensor",
                "dtype": name,
                "shape": list(m.size),
                "tensors": 1,
                "elements": n,
                "bytes": nbytes,
            }
        )
    elements = sum(d["elements"] for d in dtypes.values())
    return {
        "path": str(path),
        "file_size": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        "format": kinds.DCP,
        "checksums": False,
        "metadata": {},
        "tensors": sum(d["tensors"] for d in dtypes.values()),
        "elements": elements,
        "parameters": elements,
        "bytes": sum(d["bytes"] for d in dtypes.values()),
        "dtypes": dict(sorted(dtypes.items(), key=lambda kv: (-kv[1]["bytes"], kv[0]))),
        "tree": nodes,
        "hint": "a plain torch.distributed.checkpoint directory: no checksums, and its .metadata is a pickle "
        "(read here by an allowlist unpickler). torchkeep.distributed.save writes one with a manifest.",
    }


def _distributed_summary(path: Path, depth: int | None) -> dict[str, Any]:
    """:func:`inspect` of a torchkeep distributed checkpoint: the manifest, DCP's tensor metadata
    (read by the allowlist unpickler) and the tree file; no tensor data is read."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from torchkeep.dcp import read_metadata

    manifest = read_manifest(path)
    info = inspect(path / TREE_FILE, depth=depth)
    md = read_metadata(path)
    sizes: dict[str, tuple[str, int, int]] = {}
    for key, m in md.state_dict_metadata.items():
        if isinstance(m, TensorStorageMetadata):
            n = math.prod(m.size)
            sizes[key] = (str(m.properties.dtype).removeprefix("torch."), n, n * m.properties.dtype.itemsize)
    dtypes: dict[str, dict[str, int]] = {}
    for name, n, nbytes in sizes.values():
        d = dtypes.setdefault(name, {"tensors": 0, "elements": 0, "bytes": 0})
        d["tensors"] += 1
        d["elements"] += n
        d["bytes"] += nbytes
    top: dict[str, list[tuple[int, int]]] = {}
    modules = [list(m) for m in manifest.get("modules", [])]
    params = 0
    for p, key in manifest.get("tensors", []):
        if key in sizes and p:
            top.setdefault(str(p[0]), []).append(sizes[key][1:])
            if any(list(p[: len(m)]) == m for m in modules):
                params += sizes[key][1]
    per_rank = {str(p[0]) for p in manifest.get("per_rank", []) if len(p) == 1}
    for node in info["tree"]:
        held = top.get(node["name"])
        if held:  # tensors held in the shards, not in the tree file: counts only
            node.update(kind="sharded", tensors=len(held), elements=sum(e for e, _ in held))
            node["bytes"] = sum(b for _, b in held)
            node.pop("value", None)
            node.pop("children", None)
        elif node["name"] in per_rank:  # in the per-rank files, one per saving rank
            node.update(kind="per rank", value=f"one per rank, in {manifest['world_size']} rank file(s)")
    elements = sum(n for _, n, _ in sizes.values())
    info.update(
        path=str(path),
        format=manifest["format"],
        world_size=manifest["world_size"],
        files=len(manifest["files"]),
        file_size=sum(e["bytes"] for e in manifest["files"].values()),
        tensors=len(sizes),
        elements=elements,
        # module tensors only (optimizer state is not parameters); older manifests did not record modules
        parameters=params if "modules" in manifest else elements,
        bytes=sum(b for _, _, b in sizes.values()),
        dtypes=dict(sorted(dtypes.items(), key=lambda kv: (-kv[1]["bytes"], kv[0]))),
        created=manifest.get("created"),
        torchkeep_version=manifest.get("torchkeep"),
        torch_version=manifest.get("torch"),
    )
    return info


def _model_record(meta: dict[str, str]) -> dict[str, Any]:
    """``{"model": {name, version, class, training, config}}`` for files written by ``save_model``, else ``{}``."""
    raw = meta.get("torchkeep.model")
    if not raw:
        return {}
    try:
        record = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(record, dict):
        return {}
    return {"model": {k: record.get(k) for k in ("name", "version", "class", "training", "config")}}


def verify(path: str | os.PathLike[str], *, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Check every checksum of a checkpoint without loading it.

    Damage is reported, not raised: a flipped bit gives ``ok: False`` with the error
    message and the damaged tensor's name (``"<header>"`` for the header) in ``key``.

    Args:
        path: the file.
        progress: called with the number of bytes just checked, after each chunk.

    Returns:
        A JSON-able dict: ``path``, ``format``, ``ok``, ``checksums`` (whether the
        file carries any: plain safetensors files do not, so only their structure is
        checked), ``tensors``, ``bytes_checked``, ``error`` and ``key`` (``None`` when ok).
        Legacy ``torch.save`` files give ``ok: False``: they have nothing to verify.
        A torchkeep distributed checkpoint directory has every file checked against its
        manifest (``key`` names a damaged file).

    Raises:
        CheckpointNotFoundError: no such file.

    Example:
        >>> import torch, torchkeep as tk, tempfile, os
        >>> p = tk.save({"w": torch.ones(4)}, os.path.join(tempfile.mkdtemp(), "c.safetensors"))
        >>> r = tk.verify(p)
        >>> r["ok"], r["tensors"], r["bytes_checked"]
        (True, 1, 16)
        >>> with open(p, "r+b") as f:
        ...     _ = f.seek(-1, 2); _ = f.write(b"\\x01")
        >>> r = tk.verify(p)
        >>> r["ok"], r["key"]
        (False, 'w')
    """
    path = as_path(path)
    result: dict[str, Any] = {
        "path": str(path),
        "format": None,
        "ok": False,
        "checksums": False,
        "tensors": 0,
        "bytes_checked": 0,
        "error": None,
        "key": None,
    }
    try:
        found = kinds.detect(path, operation="verify")
    except ChecksumMismatchError as e:  # a damaged header: reported, like damaged data
        result.update(error=str(e), key=e.key)
        return result
    except (CorruptCheckpointError, MissingShardError) as e:  # unreadable, or a shard set missing a shard
        result["error"] = str(e)
        return result
    result["path"] = str(found.target)
    if found.kind == kinds.TORCHKEEP_DCP:
        try:
            manifest, checked = verify_all(found.path, progress=progress)
        except ChecksumMismatchError as e:
            result.update(format="torchkeep-dcp/1", checksums=True, error=str(e), key=e.key)
            return result
        except (CorruptCheckpointError, FileNotFoundError) as e:
            result.update(format="torchkeep-dcp/1", error=str(e))
            return result
        result.update(format=manifest["format"], ok=True, checksums=True, bytes_checked=checked)
        result["tensors"] = len(manifest.get("tensors", []))
        result["files"] = len(manifest["files"])
        return result
    if found.kind == kinds.DCP:
        result["format"] = kinds.DCP
        result["error"] = (
            f"{found.path}: a plain torch.distributed.checkpoint directory has no checksums to verify; "
            "torchkeep.distributed.save writes one with a manifest that can be verified"
        )
        return result
    if found.legacy:
        result["format"] = found.kind
        result["error"] = (
            f"{found.target}: a legacy torch.save file has no checksums to verify. {_convert_hint(found.target)}"
        )
        return result
    if found.index is not None:
        result["shards"] = len(found.shards)
        legacy = [f for f, k in found.shard_kinds.items() if kinds.is_legacy_kind(k)]
        if legacy:
            result["format"] = f"sharded {found.shard_kinds[legacy[0]]}"
            result["error"] = (
                f"{found.target}: shards written by torch.save have no checksums to verify. "
                f"Convert them once, if you trust their source: torchkeep convert {found.target} model.safetensors"
            )
            return result
    sums = []
    for f in found.shards:
        try:
            with HeaderFile(f, verify=True) as ck:
                if result["format"] is None:
                    result["format"] = ck.header.metadata.get(FORMAT_KEY) or "safetensors"
                sums.append(ck.header.checksums is not None)
                if found.index is not None:
                    lacking = sorted(set(found.index.names_in(f.name)) - set(ck.keys()))
                    if lacking:
                        raise CorruptCheckpointError(
                            f,
                            f"the index {found.target.name} places {len(lacking)} tensor(s) here that it lacks: {lacking[:5]}",
                        )
                result["tensors"] += len(ck.header.tensors)
                result["bytes_checked"] += ck.verify_all(progress=progress)
        except ChecksumMismatchError as e:
            result.update(error=str(e), key=e.key, checksums=True)
            if found.index is not None:
                result["shard"] = f.name
            return result
        except CorruptCheckpointError as e:
            result["error"] = str(e)
            if found.index is not None:
                result["shard"] = f.name
            return result
    result["checksums"] = all(sums)
    result["ok"] = True
    return result

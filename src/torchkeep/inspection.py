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
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torchkeep.api import paused_gc
from torchkeep.distributed.manifest import TREE_FILE, is_torchkeep_dcp, read_manifest, verify_all
from torchkeep.errors import CheckpointNotFoundError, ChecksumMismatchError, CorruptCheckpointError
from torchkeep.format.dtypes import ST_TO_DTYPE, dtype_name
from torchkeep.format.header import FORMAT_KEY, TensorSpec
from torchkeep.legacy import is_legacy
from torchkeep.reader import Checkpoint

__all__ = ["inspect", "verify"]

LEGACY_ZIP = "torch.save (zip)"
LEGACY_PICKLE = "torch.save (raw pickle, torch < 1.6)"
_STORAGE_ENTRY = re.compile(r"^[^/]+/data/\d+$")
_DTYPE_NAMES = {st: dtype_name(dt) for st, dt in ST_TO_DTYPE.items()}


def _convert_hint(path: Path) -> str:
    target = path.with_suffix(".safetensors").name
    return f"Convert it once, if you trust its source: tk.save(tk.load({str(path)!r}), {target!r})"


def _file_of(path: Path) -> Path:
    """For a model directory (``save_model(model, "dir/")`` or a hub download), the file to
    summarise: ``model.safetensors``, the only ``*.safetensors``, or the first shard named by
    the index (each shard of a ``save_model`` directory carries the model record)."""
    if not path.is_dir():
        return path
    if (path / "model.safetensors").is_file():
        return path / "model.safetensors"
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return files[0]
    for index in sorted(path.glob("*.safetensors.index.json")):
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise CorruptCheckpointError(index, "not a shard index (no weight_map)") from None
        if shards:
            return path / shards[0]
    raise CorruptCheckpointError(path, "a directory without model.safetensors, a single .safetensors or a shard index")


def _sniff(path: Path) -> bytes:
    """The first 8 bytes, raising the typed errors for a missing path or a directory."""
    try:
        with open(path, "rb") as fh:
            return fh.read(8)
    except FileNotFoundError:
        raise CheckpointNotFoundError(path) from None
    except IsADirectoryError:
        raise CorruptCheckpointError(path, "it is a directory, not a file") from None


def _legacy_summary(path: Path, head: bytes) -> dict[str, Any]:
    out: dict[str, Any] = {
        "path": str(path),
        "file_size": path.stat().st_size,
        "format": LEGACY_ZIP if head.startswith(b"PK") else LEGACY_PICKLE,
        "legacy": True,
        "hint": "a legacy pickle-based file, inspected without unpickling it. " + _convert_hint(path),
    }
    if head.startswith(b"PK"):
        # The zip directory lists one entry per tensor storage; reading it runs no pickle code.
        try:
            with zipfile.ZipFile(path) as z:
                storages = [i for i in z.infolist() if _STORAGE_ENTRY.match(i.filename)]
        except (zipfile.BadZipFile, OSError) as e:
            raise CorruptCheckpointError(path, f"a damaged torch.save zip archive ({e})") from None
        out["storages"] = len(storages)
        out["storage_bytes"] = sum(i.file_size for i in storages)
    return out


# -- tree summary -----------------------------------------------------------------------------


def _stateful_kind(cls: str, value: Any) -> str:
    if _is_module_sd(value):
        return "module"
    if "lr_scheduler" in cls or cls.endswith("SWALR"):
        return "scheduler"
    if cls.startswith("torch.optim.") or (
        isinstance(value, dict) and isinstance(value.get("d"), dict) and {"state", "param_groups"} <= set(value["d"])
    ):
        return "optimizer"
    if cls.endswith("GradScaler"):
        return "grad_scaler"
    if cls == "torchkeep.rng.RNGState":
        return "rng_state"
    return "stateful"


def _is_module_sd(n: Any) -> bool:
    # module.state_dict() is an OrderedDict carrying ``_metadata``; flatten() keeps it as "m".
    return isinstance(n, dict) and "o" in n and "m" in n


def _key_label(k: Any) -> str:
    """A display name for a dict key node (ints, tuples, ... as Python would print them)."""
    if isinstance(k, str):
        return k
    if k is None or isinstance(k, (bool, int, float)):
        return repr(k)
    if isinstance(k, dict) and "t" in k:
        inner = [_key_label(v) if not isinstance(v, str) else repr(v) for v in k["t"]]
        return "(" + ", ".join(inner) + ("," if len(inner) == 1 else "") + ")"
    if isinstance(k, dict) and "f" in k:
        return str(k["f"])
    return json.dumps(k)


class _Trie:
    __slots__ = ("children", "leaf")

    def __init__(self) -> None:
        self.children: dict[str, _Trie] = {}
        self.leaf: tuple[Any] | None = None


class _Summariser:
    """Turns skeleton nodes into summary nodes; counts each stored tensor once per subtree."""

    def __init__(self, specs: dict[str, TensorSpec], depth: int | None) -> None:
        self.specs = specs
        self.elements = {k: math.prod(s.shape) for k, s in specs.items()}
        self.depth = depth
        self.seen: set[str] = set()
        self.module_keys: set[str] | None = None  # stored tensors inside module state dicts

    def stats(self, node: dict[str, Any], keys: set[str]) -> dict[str, Any]:
        node["tensors"] = len(keys)
        node["elements"] = sum(self.elements[k] for k in keys)
        node["bytes"] = sum(self.specs[k].nbytes for k in keys)
        return node

    def finish(
        self, node: dict[str, Any], children: list[tuple[dict[str, Any], set[str]]], level: int
    ) -> tuple[dict[str, Any], set[str]]:
        keys: set[str] = set().union(*(k for _, k in children))
        if len(keys) == sum(len(k) for _, k in children):  # disjoint (the usual case): add up
            node["tensors"] = len(keys)
            node["elements"] = sum(c["elements"] for c, _ in children)
            node["bytes"] = sum(c["bytes"] for c, _ in children)
        else:  # tied weights: count each stored tensor once
            self.stats(node, keys)
        if self.depth is not None and level >= self.depth:
            node["children_omitted"] = len(children)
        else:
            node["children"] = [c for c, _ in children]
        return node, keys

    def container(self, node: dict[str, Any], items: list[tuple[str, Any]], level: int):
        return self.finish(node, [self.node(name, child, level + 1) for name, child in items], level)

    def dotted(self, node: dict[str, Any], items: list[tuple[str, Any]], level: int):
        """Group dotted names (``encoder.layers.0.weight``) into nested nodes, one per prefix."""
        root = _Trie()
        for full, child in items:
            cur = root
            for part in full.split("."):
                cur = cur.children.setdefault(part, _Trie())
            cur.leaf = (child,)
        if node["kind"] != "module":
            return self._branch(node, root, "group", level)
        node, keys = self._branch(node, root, "submodule", level)
        self.module_keys = (self.module_keys or set()) | keys
        return node, keys

    def _branch(self, node: dict[str, Any], trie: _Trie, sub_kind: str, level: int):
        children = []
        if trie.leaf is not None:  # a name that is also a prefix of other names (only in foreign files)
            children.append(self.node("(self)", trie.leaf[0], level + 1))
        for part, sub in trie.children.items():
            if not sub.children:
                children.append(self.node(part, sub.leaf[0] if sub.leaf else None, level + 1))
            else:
                children.append(self._branch({"name": part, "kind": sub_kind}, sub, sub_kind, level + 1))
        return self.finish(node, children, level)

    def tensor(self, name: str, n: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
        key = n.get("T")
        spec = self.specs.get(key) if isinstance(key, str) else None
        node: dict[str, Any] = {"name": name, "kind": "ndarray" if n.get("np") else "tensor", "key": key}
        if spec is None:
            node["missing"] = True  # the skeleton names a tensor the header lacks (damaged file)
            return self.stats(node, set()), set()
        view = n.get("v")
        shape = list(view[1]) if isinstance(view, list) and len(view) == 3 else list(spec.shape)
        node["dtype"] = _DTYPE_NAMES[spec.dtype]
        node["shape"] = shape
        if view is not None or key in self.seen:
            node["tied"] = True  # shares storage with another leaf (tied weights, a view): stored once
        self.seen.add(key)
        if "dev" in n:
            node["device"] = n["dev"]
        node["tensors"] = 1
        node["elements"] = self.elements[key]
        node["bytes"] = spec.nbytes
        return node, {key}

    def node(self, name: str, n: Any, level: int) -> tuple[dict[str, Any], set[str]]:
        if n is None or isinstance(n, (bool, int, float, str)):
            kind = "none" if n is None else type(n).__name__
            return {"name": name, "kind": kind, "value": n, "tensors": 0, "elements": 0, "bytes": 0}, set()
        if not isinstance(n, dict):
            return {"name": name, "kind": "unknown", "tensors": 0, "elements": 0, "bytes": 0}, set()
        if "T" in n:
            return self.tensor(name, n)
        if "S" in n:
            cls, v = str(n["S"]), n.get("v")
            kind = _stateful_kind(cls, v)
            if kind == "module":
                return self.dotted({"name": name, "kind": kind, "class": cls}, [(str(k), c) for k, c in v["o"]], level)
            inner, keys = self.node(name, v, level)
            node = {"name": name, "kind": kind, "class": cls}
            node.update((k, x) for k, x in inner.items() if k not in node)
            return node, keys
        if _is_module_sd(n):
            return self.dotted({"name": name, "kind": "module"}, [(_key_label(k), c) for k, c in n["o"]], level)
        if "d" in n and isinstance(n["d"], dict):
            return self.container({"name": name, "kind": "dict"}, list(n["d"].items()), level)
        if "D" in n or "o" in n:
            pairs = n.get("D", n.get("o")) or []
            return self.container({"name": name, "kind": "dict"}, [(_key_label(k), c) for k, c in pairs], level)
        if "l" in n or "t" in n:
            kind = "list" if "l" in n else "tuple"
            items = [(str(i), c) for i, c in enumerate(n[kind[0]])]
            return self.container({"name": name, "kind": kind}, items, level)
        if "G" in n:
            s = n.get("s")
            keys = {s["T"]} if isinstance(s, dict) and s.get("T") in self.specs else set()
            node = {"name": name, "kind": "generator", "device": n["G"]}
            return self.stats(node, keys), keys
        if "f" in n:
            kind, value = "float", n["f"]  # nan / inf / -inf, as text (JSON has no nan)
        elif "dt" in n:
            kind, value = "dtype", f"torch.{n['dt']}"
        elif "sz" in n:
            kind, value = "size", n["sz"]
        elif "dev" in n:
            kind, value = "device", n["dev"]
        elif "ns" in n:
            kind, value = f"numpy.{n['ns']}", n.get("v")
        else:
            kind, value = "unknown", None
        leaf = {"name": name, "kind": kind, "value": value, "tensors": 0, "elements": 0, "bytes": 0}
        return leaf, set()


def _tree(skeleton: Any, specs: dict[str, TensorSpec], depth: int | None) -> tuple[list[dict[str, Any]], int | None]:
    """Top-level summary nodes, and the element count held in module state dicts (None: no module)."""
    s = _Summariser(specs, depth)
    if skeleton is None:  # plain safetensors: group the flat names by their dots, as module names are
        root, _ = s.dotted({"name": "", "kind": "group"}, [(k, {"T": k}) for k in specs], 0)
    elif isinstance(skeleton, dict) and isinstance(skeleton.get("d"), dict):
        root, _ = s.container({"name": "", "kind": "dict"}, list(skeleton["d"].items()), 0)
    else:
        node, _ = s.node("(root)", skeleton, 1)
        root = {"children": [node]}
    params = None if s.module_keys is None else sum(s.elements[k] for k in s.module_keys)
    return root.get("children", []), params


def inspect(path: str | os.PathLike[str], *, depth: int | None = None) -> dict[str, Any]:
    """Summarise a checkpoint from its header alone; no tensor data is read.

    Works on torchkeep files, plain safetensors files, torchkeep distributed checkpoint
    directories (adding ``world_size`` and ``files``; entries held in the shards have kind
    ``sharded`` and counts only) and (without unpickling them) legacy ``torch.save`` files,
    for which it reports the format and how to convert.

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
    path = Path(os.fspath(path)).expanduser()
    if is_torchkeep_dcp(path):
        return _distributed_summary(path, depth)
    path = _file_of(path)
    head = _sniff(path)
    if is_legacy(head):
        return _legacy_summary(path, head)
    with paused_gc(), Checkpoint(path, verify=False) as ck:
        header = ck.header
        meta = header.metadata
        specs = header.tensors
        try:
            tree, params = _tree(ck.skeleton, specs, depth)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError) as e:
            raise CorruptCheckpointError(path, f"the state tree in the header is malformed ({e!r})") from None
        user = ck.metadata
    dtypes: dict[str, dict[str, int]] = {}
    for s in specs.values():
        d = dtypes.setdefault(_DTYPE_NAMES[s.dtype], {"tensors": 0, "elements": 0, "bytes": 0})
        d["tensors"] += 1
        d["elements"] += math.prod(s.shape)
        d["bytes"] += s.nbytes
    elements = sum(d["elements"] for d in dtypes.values())
    return {
        "path": str(path),
        "file_size": header.file_size,
        "header_size": header.size,
        "format": meta.get(FORMAT_KEY) or "safetensors",
        "torchkeep_version": meta.get("torchkeep.library"),
        "torch_version": meta.get("torchkeep.torch"),
        "created": meta.get("torchkeep.created"),
        "checksums": header.checksums is not None,
        "metadata": user,
        "tensors": len(specs),
        "elements": elements,
        "parameters": elements if params is None else params,
        "bytes": header.file_size - header.size,
        "dtypes": dict(sorted(dtypes.items(), key=lambda kv: (-kv[1]["bytes"], kv[0]))),
        "tree": tree,
        **_model_record(meta),
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
            sizes[key] = (dtype_name(m.properties.dtype), n, n * m.properties.dtype.itemsize)
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
    path = Path(os.fspath(path)).expanduser()
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
    if is_torchkeep_dcp(path):
        try:
            manifest, checked = verify_all(path, progress=progress)
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
    head = _sniff(path)
    if is_legacy(head):
        result["format"] = LEGACY_ZIP if head.startswith(b"PK") else LEGACY_PICKLE
        result["error"] = f"{path}: a legacy torch.save file has no checksums to verify. {_convert_hint(path)}"
        return result
    try:
        with Checkpoint(path, verify=True) as ck:
            result["format"] = ck.header.metadata.get(FORMAT_KEY) or "safetensors"
            result["checksums"] = ck.header.checksums is not None
            result["tensors"] = len(ck.header.tensors)
            result["bytes_checked"] = ck.verify_all(progress=progress)
    except ChecksumMismatchError as e:
        result.update(error=str(e), key=e.key)
        return result
    except CheckpointNotFoundError:
        raise
    except CorruptCheckpointError as e:
        result["error"] = str(e)
        return result
    result["ok"] = True
    return result

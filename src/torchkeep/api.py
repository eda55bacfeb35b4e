"""save / load / restore: the three calls a training loop needs."""

from __future__ import annotations

import copy
import gc
import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from torchkeep._version import __version__
from torchkeep.dcp import is_dcp_dir, read_dcp
from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DeviceUnavailableError,
    KeyMismatchError,
    TorchkeepError,
    UnsupportedObjectError,
)
from torchkeep.format.dtypes import DTYPE_TO_ST
from torchkeep.format.header import FORMAT_KEY, FORMAT_NAME, FORMAT_VERSION, HASH_NAME, HeaderBuilder
from torchkeep.hashing import Digests
from torchkeep.legacy import is_legacy, load_legacy
from torchkeep.loading import copy_plan, plan_into
from torchkeep.mapped import MappedCheckpoint, adopt
from torchkeep.reader import TREE_KEY, USER_KEY, Checkpoint
from torchkeep.storage.local import AtomicFile, buffer_of, write_buffers
from torchkeep.tree import Flat, SkeletonError, flatten, format_path, is_stateful, unflatten

__all__ = ["load", "restore", "save"]

PathLike = str | os.PathLike[str]
MapLocation = str | torch.device | Mapping[str, Any] | Callable[[torch.Tensor, str], torch.Tensor] | None


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
    synchronises once (:func:`host_copies`) before the bytes are read.
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
    """``_cpu_bytes`` of every tensor, with one synchronisation for all device-to-host copies."""
    out = {k: _cpu_bytes(t) for k, t in tensors.items()}
    if torch.cuda.is_available() and any(t.is_cuda for t in tensors.values()):
        torch.cuda.synchronize()
    return out


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector: a tree of 20,000 tensors allocates enough small
    objects to trigger dozens of full collections, which cost more than the I/O."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def save(
    obj: Any,
    path: PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    durable: bool = True,
) -> Path:
    """Save a state tree atomically as a torchkeep (safetensors) file.

    Stateful leaves (modules, optimizers, schedulers, ``GradScaler``, :class:`RNGState`,
    anything with ``state_dict``/``load_state_dict``) are saved through ``state_dict()``.
    Nothing is pickled; a leaf that cannot be represented raises an error naming its path.

    Args:
        obj: the state tree.
        path: target file; its parent directory is created if needed.
        metadata: JSON-serialisable user metadata, read back with ``tk.open(path).metadata``.
        durable: fsync the file and its directory (default). ``False`` keeps the atomic
            rename but skips the fsyncs: for scratch files, tmpfs, or files uploaded at once.

    Returns:
        The path written.

    Raises:
        UnsupportedObjectError: a leaf is neither data nor Stateful (message names its path).
        UnsupportedDtypeError: a tensor dtype that safetensors cannot hold.

    Example:
        >>> import torch, torchkeep as tk, tempfile, os
        >>> model = torch.nn.Linear(2, 2)
        >>> p = tk.save({"model": model, "epoch": 3}, os.path.join(tempfile.mkdtemp(), "ckpt.safetensors"))
        >>> tk.load(p)["epoch"]
        3
    """
    with paused_gc():
        return _save(obj, path, metadata=metadata, durable=durable)


def _save(obj: Any, path: PathLike, *, metadata: Mapping[str, Any] | None, durable: bool) -> Path:
    path = Path(os.fspath(path)).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory; give a file name such as {path / 'ckpt.safetensors'}")
    return save_flat(flatten(obj), path, metadata=metadata, durable=durable)


def save_flat(flat: Flat, path: PathLike, *, metadata: Mapping[str, Any] | None = None, durable: bool = True) -> Path:
    """Write an already flattened tree (:func:`torchkeep.tree.flatten`) atomically.

    For callers that snapshot a tree first and write it later (asynchronous saves): the
    tensors of ``flat`` may be host copies, the skeleton keeps the Stateful class names.
    """
    path = Path(os.fspath(path)).expanduser()
    keep, meta = prepared(flat, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    with AtomicFile(path, durable=durable) as f:
        write_checksummed(f.fd, keep, meta)
        f.commit()
    return path


def prepared(flat: Flat, metadata: Mapping[str, Any] | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The host tensors and header metadata a file of ``flat`` holds (what every writer writes)."""
    meta = {
        **provenance_metadata(),
        TREE_KEY: json.dumps(flat.skeleton, separators=(",", ":"), ensure_ascii=False, allow_nan=False),
    }
    if metadata:
        meta[USER_KEY] = _metadata_json(metadata)
    return host_copies(flat.tensors), meta


def write_checksummed(fd: int, tensors: Mapping[str, torch.Tensor], meta: dict[str, str]) -> None:
    """A checksummed torchkeep/safetensors file of host ``tensors`` (see :func:`host_copies`) into ``fd``.

    The data goes first, hashed beside the writes; the sealed header goes last, at offset 0.
    """
    builder = HeaderBuilder([(k, DTYPE_TO_ST[t.dtype], tuple(t.shape)) for k, t in tensors.items()], meta)
    bufs = [buffer_of(tensors[s.name]) for s in builder.specs]
    with ThreadPoolExecutor(1) as pool:
        hashes = Digests(bufs, pool)  # large tensors hash beside the writes (both drop the GIL)
        write_buffers(fd, builder.header_size, bufs)
        os.pwrite(fd, builder.seal(hashes.result()), 0)


def stream_checksummed(
    write: Callable[[memoryview], Any], tensors: Mapping[str, torch.Tensor], meta: dict[str, str]
) -> bytes:
    """The same file as :func:`write_checksummed`, front to back through ``write`` (an object-store upload).

    A stream cannot seek back to the header, so the data is hashed first (one pass over
    memory, ~40 ms/GiB) and the sealed header goes out before it. Returns the header bytes
    (length prefix included).
    """
    builder = HeaderBuilder([(k, DTYPE_TO_ST[t.dtype], tuple(t.shape)) for k, t in tensors.items()], meta)
    bufs = [buffer_of(tensors[s.name]) for s in builder.specs]
    with ThreadPoolExecutor(1) as pool:
        head = builder.seal(Digests(bufs, pool).result())
    write(memoryview(head))
    for b in bufs:
        if b.nbytes:
            write(b)
    return head


def provenance_metadata() -> dict[str, str]:
    """The header metadata every torchkeep file carries: format, hash, versions, creation time."""
    return {
        "format": "pt",
        FORMAT_KEY: f"{FORMAT_NAME}/{FORMAT_VERSION}",
        "torchkeep.hash": HASH_NAME,
        "torchkeep.library": __version__,
        "torchkeep.torch": torch.__version__.split("+")[0],
        "torchkeep.created": _created(),
    }


def _created() -> str:
    """Creation time, UTC; ``SOURCE_DATE_EPOCH`` pins it for reproducible files."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch and epoch.isdigit() else datetime.now(timezone.utc)
    return when.isoformat(timespec="seconds")


def _metadata_json(metadata: Mapping[str, Any]) -> str:
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
        raise UnsupportedObjectError("metadata", metadata, "metadata must be a dict with string keys.")
    try:
        return json.dumps(dict(metadata), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UnsupportedObjectError("metadata", metadata, f"metadata must be JSON-serialisable ({e}).") from None


@contextmanager
def _still_there(path: Path) -> Iterator[None]:
    """A file deleted between the existence check and a read (retention, a cleanup job) gives
    the same typed error as one that never existed, not a bare ``FileNotFoundError``."""
    try:
        yield
    except FileNotFoundError as e:
        if isinstance(e, TorchkeepError) or (e.filename is not None and Path(e.filename) != path):
            raise
        raise CheckpointNotFoundError(path) from None


def _placer(map_location: MapLocation) -> Callable[[torch.Tensor, str | None], torch.Tensor] | None:
    """Turn a ``map_location`` into ``place(tensor, original_device)`` (None: leave on CPU)."""
    if map_location is None:
        return lambda t, dev: t if dev is None else t.to(dev)
    if isinstance(map_location, (str, torch.device)):
        target = torch.device(map_location)
        return None if target.type == "cpu" else (lambda t, dev: t.to(target))
    if isinstance(map_location, Mapping):
        table = {str(k): v for k, v in map_location.items()}
        return lambda t, dev: t.to(table.get(dev or "cpu", dev or "cpu"))
    if callable(map_location):
        return lambda t, dev: map_location(t, dev or "cpu")
    raise TypeError(f"map_location must be a device, a string, a dict or a callable, not {type(map_location).__name__}")


def _checked_placer(path: Path, map_location: MapLocation) -> Callable[[torch.Tensor, str | None], torch.Tensor] | None:
    place = _placer(map_location)
    if place is None:
        return None

    def run(t: torch.Tensor, dev: str | None) -> torch.Tensor:
        try:
            return place(t, dev)
        except (RuntimeError, AssertionError) as e:
            raise DeviceUnavailableError(path, dev or "cpu", map_location, str(e).splitlines()[0]) from None

    return run


def load(
    path: PathLike,
    *,
    map_location: MapLocation = "cpu",
    verify: bool = True,
    trust_pickle: bool = False,
) -> Any:
    """Load a checkpoint and return its state tree (Stateful leaves come back as state dicts).

    The format is detected from the content, not the extension: torchkeep files, plain
    safetensors files (a flat ``{name: tensor}`` dict), legacy ``torch.save`` files, and
    ``torch.distributed.checkpoint`` directories (a flat ``{fqn: tensor}`` dict; their pickled
    ``.metadata`` is read by an allowlist unpickler, see :mod:`torchkeep.dcp`).

    Args:
        path: the file.
        map_location: where tensors go: ``"cpu"`` (default), a device, ``None`` for the
            device each tensor was saved from, a dict like ``{"cuda:1": "cuda:0"}``, or
            ``fn(tensor, saved_device) -> tensor``.
        verify: check every checksum before returning (any flipped bit raises).
        trust_pickle: allow legacy pickles that hold more than tensors (runs their code!).

    Raises:
        CheckpointNotFoundError, CorruptCheckpointError, ChecksumMismatchError,
        UnsafeCheckpointError, DeviceUnavailableError.

    Example:
        >>> import torch, torchkeep as tk, tempfile, os
        >>> p = tk.save({"w": torch.arange(3), "cfg": {"lr": 0.1}}, os.path.join(tempfile.mkdtemp(), "c.safetensors"))
        >>> tk.load(p)["cfg"]
        {'lr': 0.1}
    """
    path = Path(os.fspath(path)).expanduser()
    with _still_there(path):
        return _load(path, map_location=map_location, verify=verify, trust_pickle=trust_pickle)


def _load(path: Path, *, map_location: MapLocation, verify: bool, trust_pickle: bool) -> Any:
    if not path.exists():
        raise CheckpointNotFoundError(path)
    if path.is_file():
        with open(path, "rb") as fh:
            head = fh.read(8)
        if is_legacy(head):
            return load_legacy(path, map_location=map_location, trust_pickle=trust_pickle)
    elif is_dcp_dir(path):
        place = _checked_placer(path, map_location)
        flat = read_dcp(path)
        return flat if place is None else {k: place(t, None) for k, t in flat.items()}
    with paused_gc(), Checkpoint(path, verify=verify) as ck:
        return ck.tree(place=_checked_placer(path, map_location))


def _targets(targets: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Any]]:
    """``(path, target)`` for every Stateful / Generator leaf of a nested dict of targets."""
    if is_stateful(targets) or isinstance(targets, torch.Generator):
        return [(prefix, targets)]
    if isinstance(targets, Mapping):
        out: list[tuple[tuple[Any, ...], Any]] = []
        for k, v in targets.items():
            out.extend(_targets(v, (*prefix, k)))
        return out
    raise TypeError(
        f"restore target {format_path(prefix) or '<root>'} is a {type(targets).__name__}; targets are objects with "
        "load_state_dict() (modules, optimizers, schedulers, tk.RNGState()), torch.Generators, or dicts of them"
    )


def _lookup(tree: Any, path: tuple[Any, ...]) -> tuple[bool, Any]:
    node = tree
    for p in path:
        if not isinstance(node, Mapping) or p not in node:
            return False, None
        node = node[p]
    return True, node


def _check_optimizer(where: str, opt: torch.optim.Optimizer, sd: Any) -> None:
    groups = sd.get("param_groups") if isinstance(sd, Mapping) else None
    if not isinstance(groups, list):
        raise KeyMismatchError(where, fix="the checkpoint holds no optimizer state dict here")
    saved = [len(g.get("params", ())) for g in groups]
    have = [len(g["params"]) for g in opt.param_groups]
    if saved != have:
        raise KeyMismatchError(
            where,
            fix=f"the optimizer has param groups of sizes {have}, the checkpoint {saved}; "
            "build the optimizer over the same parameters as when it was saved",
        )


def restore(
    path: PathLike,
    targets: Mapping[str, Any],
    *,
    strict: bool = True,
    map_location: MapLocation = "cpu",
    verify: bool = True,
    trust_pickle: bool = False,
) -> Any:
    """Load a checkpoint and ``load_state_dict`` it into each target, in place.

    Checksums are verified and every target is checked (keys, shapes, optimizer
    groups) before any is modified, so a failed restore leaves your objects as they
    were. The data is copied straight from the file's pages into the targets' existing
    memory (model parameters, an optimizer's existing state), without staging the
    whole checkpoint in fresh memory.

    Args:
        path: the checkpoint.
        targets: a dict (possibly nested) mirroring the saved tree, whose leaves are
            modules, optimizers, schedulers, scalers, :class:`RNGState`, generators or
            any object with ``load_state_dict``.
        strict: missing targets or module keys / shapes that differ raise
            :class:`~torchkeep.errors.KeyMismatchError`; ``False`` loads what matches
            and warns about the rest.
        map_location: where the tensors of the returned tree that were not restored
            into a target go (targets keep their own devices). As in :func:`load`.
        verify, trust_pickle: as in :func:`load`.

    Returns:
        The loaded tree, e.g. to read ``state["epoch"]``. Entries restored into a target
        are that target's ``state_dict()`` after loading (sharing its memory).

    Example:
        >>> import torch, torchkeep as tk, tempfile, os
        >>> model = torch.nn.Linear(2, 2)
        >>> p = tk.save({"model": model, "epoch": 4}, os.path.join(tempfile.mkdtemp(), "c.safetensors"))
        >>> fresh = torch.nn.Linear(2, 2)
        >>> tk.restore(p, {"model": fresh})["epoch"]
        4
        >>> torch.equal(fresh.weight, model.weight)
        True
    """
    plan = _targets(targets)
    path = Path(os.fspath(path)).expanduser()
    with _still_there(path):
        return _restore(path, plan, strict=strict, map_location=map_location, verify=verify, trust_pickle=trust_pickle)


def _restore(
    path: Path,
    plan: list[tuple[tuple[Any, ...], Any]],
    *,
    strict: bool,
    map_location: MapLocation,
    verify: bool,
    trust_pickle: bool,
) -> Any:
    if not path.exists():
        raise CheckpointNotFoundError(path)
    if path.is_file():
        with open(path, "rb") as fh:
            legacy = is_legacy(fh.read(8))
        if legacy:
            tree = load_legacy(path, map_location="cpu", trust_pickle=trust_pickle)
            found = _match_targets(path, tree, plan, strict)
            for tpath, target, sub in found:
                _assign(tree, tpath, _apply(target, sub, lambda t: t))
            return tree
    place = _checked_placer(path, map_location)
    with paused_gc(), Checkpoint(path, verify=verify) as ck:
        mapped = MappedCheckpoint(ck)
        if verify:
            mapped.verify()
        skeleton = ck.skeleton
        try:
            views = unflatten(skeleton, mapped.view) if ck.has_tree else {k: mapped.view(k) for k in ck.keys()}
        except SkeletonError as e:
            raise CorruptCheckpointError(path, str(e)) from None
        found = _match_targets(path, views, plan, strict)
        # targets torchkeep cannot pre-check (schedulers, user objects) go first, so that if
        # one of them raises, the pre-checked modules and optimizers are still untouched
        found.sort(key=lambda f: isinstance(f[1], (torch.nn.Module, torch.optim.Optimizer)))
        results = [(tpath, _apply(target, sub, _clone)) for tpath, target, sub in found]
        # the rest of the tree, in memory of its own: restored subtrees are not copied again
        owned: dict[str, torch.Tensor] = {}

        def get(key: str) -> torch.Tensor:
            if key not in owned:
                owned[key] = _clone(mapped.view(key))
            return owned[key]

        if not ck.has_tree:
            done = {tp[0] for tp, _ in results}
            tree: Any = {k: (place(get(k), None) if place else get(k)) for k in ck.keys() if k not in done}
        else:
            pruned = skeleton
            for tpath, _ in results:
                pruned = _replace_at(pruned, tpath)
            tree = unflatten(pruned, get, place)
    for tpath, value in results:
        _assign(tree, tpath, value)
    return tree


def _clone(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype)
    out.copy_(t)
    return out


def _match_targets(
    path: Path, tree: Any, plan: list[tuple[tuple[Any, ...], Any]], strict: bool
) -> list[tuple[tuple[Any, ...], Any, Any]]:
    """Pair each target with its subtree and validate all of them before anything is loaded."""
    found: list[tuple[tuple[Any, ...], Any, Any]] = []
    absent: list[str] = []
    for tpath, target in plan:
        ok, sub = _lookup(tree, tpath)
        where = format_path(tpath)
        if not ok:
            absent.append(where)
            continue
        if isinstance(target, torch.nn.Module):
            if not isinstance(sub, Mapping):
                raise KeyMismatchError(where, fix=f"the checkpoint holds a {type(sub).__name__} here, not a state dict")
            # load_into's planning: prefix repair ('module.', '_orig_mod.'), keys, shapes; nothing copied yet
            sub = plan_into(target, sub, strict=strict, skip_mismatched=not strict, label=f"{path}", key=where)
        elif isinstance(target, torch.optim.Optimizer):
            _check_optimizer(where, target, sub)
        elif isinstance(target, torch.Generator) and not isinstance(sub, torch.Generator):
            raise KeyMismatchError(where, fix="the checkpoint holds no torch.Generator here")
        found.append((tpath, target, sub))
    if absent:
        available = sorted(map(str, tree)) if isinstance(tree, Mapping) else []
        if strict:
            raise KeyMismatchError(
                str(path),
                missing=absent,
                fix=f"the checkpoint's top-level keys are {available}; rename the targets, "
                "or pass strict=False to restore only those present",
            )
        warnings.warn(f"{path}: not in the checkpoint, left unchanged: {', '.join(sorted(absent))}", stacklevel=3)
    return found


def _apply(target: Any, sub: Any, own: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Load ``sub`` into ``target``; returns what the returned tree shows for it."""
    if isinstance(target, torch.Generator):
        target.set_state(sub.get_state())
        return target
    if isinstance(target, torch.nn.Module):
        plan, report = sub
        copy_plan(plan)  # validated above; copies straight from the mapped file into the parameters
        if not report.ok:
            warnings.warn(f"loaded what matched (strict=False): {report}", stacklevel=3)
        return target.state_dict()
    if isinstance(target, torch.optim.Optimizer):
        sub = adopt(target.state_dict(), sub, own)  # reuse the optimizer's existing state memory
        target.load_state_dict(sub)
        return target.state_dict()
    sub = adopt({}, sub, own)
    # schedulers pop keys from the dict they get: hand them a copy, keep ours intact
    target.load_state_dict(copy.copy(sub) if isinstance(sub, dict) else sub)
    return sub


def _replace_at(skeleton: Any, path: tuple[Any, ...]) -> Any:
    """A copy of ``skeleton`` with the node at ``path`` replaced by ``null``."""
    if not path:
        return None
    if isinstance(skeleton, dict):
        if "S" in skeleton:
            return {**skeleton, "v": _replace_at(skeleton["v"], path)}
        if "d" in skeleton and path[0] in skeleton["d"]:
            return {"d": {**skeleton["d"], path[0]: _replace_at(skeleton["d"][path[0]], path[1:])}}
        for tag in ("D", "o"):
            if tag in skeleton:
                pairs = [
                    [k, _replace_at(v, path[1:])] if unflatten(k, _no_tensor) == path[0] else [k, v]
                    for k, v in skeleton[tag]
                ]
                return {**skeleton, tag: pairs}
    return skeleton


def _no_tensor(key: str) -> torch.Tensor:
    raise SkeletonError(f"a dict key refers to tensor {key!r}")


def _assign(tree: Any, path: tuple[Any, ...], value: Any) -> None:
    node = tree
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value

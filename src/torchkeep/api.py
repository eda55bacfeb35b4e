"""save / load / restore: the three calls a training loop needs."""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch

from torchkeep import kinds
from torchkeep.errors import (
    ArgumentTypeError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidArgumentError,
    KeyMismatchError,
    TargetIsDirectoryError,
    TorchkeepError,
)
from torchkeep.loading import MIN_MATCHED, copy_plan, plan_into
from torchkeep.mapped import adopt, disjoint, partly_overwritten, readable_into, tensor_items
from torchkeep.placement import MapLocation, checked_placer
from torchkeep.runtime import paused_gc
from torchkeep.sources import read_buffer, read_tree
from torchkeep.storage.paths import as_path
from torchkeep.stored import StoredSet, can_open
from torchkeep.targets import restore_targets
from torchkeep.tree import SkeletonError, format_path, generator_keys, unflatten
from torchkeep.writer import save_stream, save_tree

__all__ = ["load", "restore", "save"]

PathLike = str | os.PathLike[str]


def save(
    obj: Any,
    path: PathLike | BinaryIO,
    *,
    metadata: Mapping[str, Any] | None = None,
    durable: bool = True,
) -> Path | BinaryIO:
    """Save a state tree atomically as a torchkeep (safetensors) file.

    Stateful leaves (modules, optimizers, schedulers, ``GradScaler``, :class:`RNGState`,
    anything with ``state_dict``/``load_state_dict``) are saved through ``state_dict()``.
    Nothing is pickled; a leaf that cannot be represented raises an error naming its path.

    Args:
        obj: the state tree.
        path: target file; its parent directory is created if needed. A writable binary file
            object (``io.BytesIO``, an open file, an upload stream) gets the same bytes front to
            back, as ``torch.save`` allows; atomicity is then the caller's (nothing is renamed).
        metadata: JSON-serialisable user metadata, read back with ``tk.open(path).metadata``.
        durable: fsync the file and its directory (default). ``False`` keeps the atomic
            rename but skips the fsyncs: for scratch files, tmpfs, or files uploaded at once.

    Returns:
        The path written (the file object for a file object).

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
    if _is_file_object(path, "write"):
        save_stream(obj, path.write, metadata=metadata)  # type: ignore[union-attr]
        return path  # type: ignore[return-value]
    path = as_path(path)
    if path.is_dir():
        raise TargetIsDirectoryError(path, str(path / "ckpt.safetensors"))
    _warn_hub_name(obj, path)
    return save_tree(obj, path, metadata=metadata, durable=durable)


def _warn_hub_name(obj: Any, path: Path) -> None:
    """A state tree saved where ``from_pretrained`` looks for a model's weights matches none of its names."""
    if not isinstance(obj, Mapping) or all(isinstance(v, torch.Tensor) for v in obj.values()):
        return  # a flat {name: tensor} dict keeps its names
    from torchkeep.pretrained import LIBRARIES, folder_library

    if path.name not in {v[2] for v in LIBRARIES.values()} and folder_library(path.parent) is None:
        return
    first = next(iter(obj), "model")
    warnings.warn(
        f"{path}: Hugging Face from_pretrained reads this file by parameter name, and the names in this tree start "
        f"with '{first}/' where the model's own parameter names are expected, so it would match none of them and "
        "return a randomly initialised model. Write the model with tk.save_model(model, folder) (a folder from_pretrained "
        "loads), and training state under another name such as ckpt.safetensors.",
        UserWarning,
        stacklevel=3,
    )


def _is_file_object(value: Any, method: str) -> bool:
    return not isinstance(value, (str, bytes, os.PathLike)) and callable(getattr(value, method, None))


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


def load(
    path: PathLike | BinaryIO,
    *,
    map_location: MapLocation = "cpu",
    verify: bool = True,
    trust_pickle: bool = False,
    weights_only: bool | None = None,
    allow_globals: Sequence[str] | None = None,
    mmap: bool | None = False,
) -> Any:
    """Load a checkpoint and return its state tree (Stateful leaves come back as state dicts).

    The format is detected from the content, not the extension: torchkeep files, plain
    safetensors files (a flat ``{name: tensor}`` dict), legacy ``torch.save`` files, and
    ``torch.distributed.checkpoint`` directories (a flat ``{fqn: tensor}`` dict; their pickled
    ``.metadata`` is read by an allowlist unpickler, see :mod:`torchkeep.dcp`).

    Args:
        path: the file or directory; or a readable binary file object holding a torchkeep or
            safetensors file (``io.BytesIO``, as ``torch.load`` allows).
        map_location: where tensors go: ``"cpu"`` (default), a device, ``None`` for the
            device each tensor was saved from, a dict like ``{"cuda:1": "cuda:0"}``, or
            ``fn(tensor, saved_device) -> tensor``.
        verify: check every checksum before returning (any flipped bit raises).
        trust_pickle: allow legacy pickles that hold more than tensors (runs their code!).
        allow_globals: ``["mypkg.models.*", "argparse.Namespace"]``: legacy pickles may also use
            these globals, still through torch's weights-only unpickler (for this load only);
            anything else is refused, named. Never the dangerous ones (see docs/safety.md).
        weights_only: accepted for drop-in migration from ``torch.load``. ``True`` (or ``None``)
            is what torchkeep always does. ``False`` alone is refused: pass ``trust_pickle=True``
            (with or without it) to unpickle a legacy file fully.
        mmap: zero-copy load of a torchkeep or safetensors file (or shard set): tensors are views of
            a private, copy-on-write memory map of the file, every checksum checked over the mapped
            bytes before anything is returned. Writes to them never reach the file, and a file
            replaced by rename leaves them as loaded; but a file another tool rewrites *in place*
            shows through, and truncating it crashes on access (SIGBUS): keep the default copying
            load for files that may change under you. Other kinds raise ``InvalidArgumentError``;
            with a ``map_location`` off the CPU the verified map is copied to the device.
            ``None`` (``torch.load``'s default) is ``False``.

    Raises:
        CheckpointNotFoundError, CorruptCheckpointError, ChecksumMismatchError,
        UnsafeCheckpointError, DeviceUnavailableError,
        InvalidArgumentError: ``weights_only=False`` without ``trust_pickle=True``; ``mmap=True``
            for a file object or a checkpoint that is not a torchkeep/safetensors file or shard set.

    Example:
        >>> import torch, torchkeep as tk, tempfile, os
        >>> p = tk.save({"w": torch.arange(3), "cfg": {"lr": 0.1}}, os.path.join(tempfile.mkdtemp(), "c.safetensors"))
        >>> tk.load(p)["cfg"]
        {'lr': 0.1}
    """
    if weights_only is False and not trust_pickle:
        raise InvalidArgumentError(
            "weights_only",
            False,
            "torchkeep never unpickles arbitrary objects on that flag alone; if, and only if, you trust the file, "
            "pass trust_pickle=True",
        )
    if mmap is not None and mmap not in (True, False):  # 0/1 and numpy bools pass; a string would map silently
        raise ArgumentTypeError("mmap", mmap, "True or False")
    mmap = bool(mmap)
    if _is_file_object(path, "read"):
        label = str(getattr(path, "name", "<file object>"))
        if mmap:
            raise InvalidArgumentError("mmap", True, f"{label} is a file object, which cannot be mapped: pass its path")
        data = path.read()  # type: ignore[union-attr]
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ArgumentTypeError("path", path, "a path or a binary file object (opened with 'rb')")
        with paused_gc():
            return read_buffer(data, label, place=checked_placer(label, map_location), verify=verify)
    path = as_path(path)
    with _still_there(path):
        return _load(
            path,
            map_location=map_location,
            verify=verify,
            trust_pickle=trust_pickle,
            allow_globals=allow_globals,
            mmap=mmap,
        )


def _load(
    path: Path,
    *,
    map_location: MapLocation,
    verify: bool,
    trust_pickle: bool,
    allow_globals: Any = None,
    mmap: bool = False,
) -> Any:
    found = kinds.detect(path, operation="tk.load")
    tree, _ = read_tree(
        found,
        place=checked_placer(found.target, map_location),
        verify=verify,
        trust_pickle=trust_pickle,
        allow_globals=allow_globals,
        mmap=mmap,
    )
    return tree


def _nested(plan: list[tuple[tuple[Any, ...], Any]]) -> dict[Any, Any]:
    """The targets of ``plan`` as the nested dict they came from."""
    out: dict[Any, Any] = {}
    for tpath, target in plan:
        node = out
        for p in tpath[:-1]:
            node = node.setdefault(p, {})
        node[tpath[-1]] = target
    return out


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
    min_matched: int | float = MIN_MATCHED,
    allow_globals: Sequence[str] | None = None,
) -> Any:
    """Load a checkpoint and ``load_state_dict`` it into each target, in place.

    Every target is checked (keys, shapes, dtypes, optimizer groups) before any is
    modified, so a mismatch leaves your objects as they were. Tensors are then read
    straight into the targets' existing contiguous CPU or CUDA tensors (model parameters
    and buffers, an optimizer's existing state; CUDA through small page-locked buffers),
    each chunk hashed right after it lands, so a restore costs about one copy of the data.
    Everything else (tensors no target takes, state of schedulers and other objects,
    targets on other devices) is read into memory of its own and verified before any
    target is touched; untargeted tensors are returned in that memory.

    A checksum mismatch (a damaged file, or one rewritten in place while it is read) is
    always raised before ``restore`` returns; when it is found while reading into the
    targets, they hold part of the file's bytes, and the error says "the targets were
    partly overwritten; restore another checkpoint" (:meth:`CheckpointManager.restore`
    falls back to the newest checkpoint that verifies, which overwrites them fully).

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
        verify, trust_pickle, allow_globals: as in :func:`load`.
        min_matched: the fewest tensors each module target may receive, as in
            :func:`~torchkeep.load_into` (a count, or a fraction of the smaller side; ``0``: any).
            A PEFT model target takes an adapter checkpoint, also as in ``load_into``.

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
    plan = restore_targets(targets)
    path = as_path(path)
    with _still_there(path):
        return _restore(
            path,
            plan,
            strict=strict,
            map_location=map_location,
            verify=verify,
            trust_pickle=trust_pickle,
            min_matched=min_matched,
            allow_globals=allow_globals,
        )


def _restore(
    path: Path,
    plan: list[tuple[tuple[Any, ...], Any]],
    *,
    strict: bool,
    map_location: MapLocation,
    verify: bool,
    trust_pickle: bool,
    min_matched: int | float = MIN_MATCHED,
    allow_globals: Any = None,
) -> Any:
    detected = kinds.detect(path, operation="tk.restore")
    if detected.kind == kinds.TORCHKEEP_DCP:
        # torch.distributed is imported only for this kind: DCP reads the shards into the targets
        from torchkeep.distributed.resume import restore as restore_distributed

        targets = plan[0][1] if len(plan) == 1 and plan[0][0] == () else _nested(plan)
        return restore_distributed(detected.path, targets, strict=strict, verify=verify, trust_pickle=trust_pickle)
    if not can_open(detected):
        # read whole (legacy pickles, shard sets holding legacy shards), then load into the targets
        tree, _ = read_tree(detected, verify=verify, trust_pickle=trust_pickle, allow_globals=allow_globals)
        found = _match_targets(path, tree, plan, strict, min_matched)
        for tpath, target, sub in found:
            _assign(tree, tpath, _apply(target, sub))
        return tree
    place = checked_placer(detected.target, map_location)
    with paused_gc(), StoredSet(detected, verify=verify) as stored:
        label, skeleton, fresh = stored.label, stored.skeleton, stored.fresh
        gen = generator_keys(skeleton)
        stored.read(gen)  # generator states are set while the tree is built: read (and verified) first
        try:
            # the tree over unread placeholders: shapes, dtypes and views, to check the targets against
            views = unflatten(skeleton, fresh.__getitem__) if skeleton is not None else dict(fresh)
        except (SkeletonError, KeyError) as e:
            raise CorruptCheckpointError(label, f"the state tree does not match the tensors ({e})") from None
        found = _match_targets(label, views, plan, strict, min_matched)
        # targets torchkeep cannot pre-check (schedulers, user objects) go first, so that if
        # one of them raises, the pre-checked modules and optimizers are still untouched
        found.sort(key=lambda f: isinstance(f[1], (torch.nn.Module, torch.optim.Optimizer)))
        live = _live_destinations(views, fresh, found, exclude=set(gen))
        # everything not read into a target: into memory of its own, verified, before any target is touched
        stored.read([k for k in fresh if k not in live and k not in gen])
        results = [(tpath, _apply(target, sub)) for tpath, target, sub in found if not _prechecked(target)]
        try:
            # straight into the targets' tensors, each chunk hashed as it lands (no second copy)
            stored.read(list(live), into=live)
        except CorruptCheckpointError as e:  # damaged, truncated or rewritten in place while read
            raise partly_overwritten(e) from None
        read = {id(t) for t in live.values()}
        results += [(tpath, _apply(target, sub, read=read)) for tpath, target, sub in found if _prechecked(target)]
        if place is None:
            tree: Any = views  # the placeholders now hold the verified bytes (or share the targets' memory)
        elif skeleton is None:
            done = {tp[0] for tp, _ in results}
            tree = {k: place(t, None) for k, t in fresh.items() if k not in done}
        else:
            pruned = skeleton
            for tpath, _ in results:
                pruned = _replace_at(pruned, tpath)
            tree = unflatten(pruned, fresh.__getitem__, place)
    for tpath, value in results:
        _assign(tree, tpath, value)
    return tree


def _prechecked(target: Any) -> bool:
    return isinstance(target, (torch.nn.Module, torch.optim.Optimizer))


def _live_destinations(
    views: Any, fresh: dict[str, torch.Tensor], found: list[tuple[tuple[Any, ...], Any, Any]], exclude: set[str]
) -> dict[str, torch.Tensor]:
    """``{stored name: target tensor}`` for stored tensors that restore can read straight into a target.

    A stored tensor qualifies when the tree uses it whole (no view of it anywhere) and a module
    parameter/buffer or an optimizer's existing state tensor takes it unchanged (a contiguous
    CPU or CUDA tensor of its shape and dtype, not overlapping another). Each placeholder taken is
    re-pointed at the target's memory, so the tree checked above now shows the target's tensor.
    """
    by_storage = {t.untyped_storage().data_ptr(): k for k, t in fresh.items() if t.numel() > 0}
    whole = {id(t): k for k, t in fresh.items()}
    items = tensor_items(views)
    viewed = {by_storage.get(t.untyped_storage().data_ptr()) for _, t in items if id(t) not in whole}
    # a stored tensor also used outside the modules and optimizers (another object's state, an
    # untargeted entry of the tree) must be read into memory of its own: those users see it before
    # the direct read, or keep it after restore returns
    pre = {tp for tp, target, _ in found if _prechecked(target)}
    depths = {len(tp) for tp in pre}
    elsewhere = {whole.get(id(t)) for p, t in items if not any(p[:n] in pre for n in depths)}
    chosen: dict[str, torch.Tensor] = {}
    taken: set[int] = set()

    def offer(dst: Any, src: Any) -> None:
        key = whole.get(id(src))
        if key is None or key in chosen or key in viewed or key in elsewhere or key in exclude or id(dst) in taken:
            return
        if readable_into(dst, src):
            chosen[key] = dst
            taken.add(id(dst))

    for _, target, sub in found:
        if isinstance(target, torch.nn.Module):
            for _, dst, src in sub[0].copies:
                offer(dst, src)
        elif isinstance(target, torch.optim.Optimizer):
            current = dict(tensor_items(target.state_dict()))
            for p, src in tensor_items(sub):
                offer(current.get(p), src)
    chosen = disjoint(chosen)  # two targets sharing memory would race: those keep the copying path
    for k, dst in chosen.items():
        # a shallow swap: the placeholder now shows dst's memory (on any device; set_() cannot cross
        # devices). It keeps its own requires_grad and version counter: no detach() needed (5x faster)
        fresh[k].data = dst
    return chosen


def _match_targets(
    path: Path, tree: Any, plan: list[tuple[tuple[Any, ...], Any]], strict: bool, min_matched: int | float
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
            sub = plan_into(
                target,
                sub,
                strict=strict,
                skip_mismatched=not strict,
                label=f"{path}",
                key=where,
                caller="restore",
                min_matched=min_matched,
            )
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


def _apply(target: Any, sub: Any, *, read: set[int] | None = None) -> Any:
    """Load ``sub`` (tensors in memory of their own) into ``target``; returns what the returned tree shows for it.

    ``read``: ``id``s of the target's own tensors (parameters, buffers, optimizer state) the
    checkpoint was read straight into; ``None`` when nothing was (they are not copied again).
    """
    if isinstance(target, torch.Generator):
        target.set_state(sub.get_state())
        return target
    if isinstance(target, torch.nn.Module):
        plan, report = sub
        copy_plan(plan, skip=read)  # validated above; what restore read straight into a parameter is not copied again
        if not report.ok:
            warnings.warn(f"loaded what matched (strict=False): {report}", stacklevel=3)
        return target.state_dict()
    if isinstance(target, torch.optim.Optimizer):
        # the loaded tensors are memory of their own: the optimizer keeps them, no copy into its old state
        target.load_state_dict(adopt(target.state_dict(), sub, read) if read is not None else adopt({}, sub))
        return target.state_dict()
    sub = adopt({}, sub)
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

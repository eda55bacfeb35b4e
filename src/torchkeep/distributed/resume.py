"""Restore of a distributed checkpoint on any number of ranks: manifest first, then DCP reads the shards."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from torchkeep import kinds
from torchkeep.dcp import check_chunks, check_complete, dcp_errors, is_dcp_dir, read_metadata, safe_reader
from torchkeep.distributed import comm
from torchkeep.distributed.common import Path_, PathLike, RankStateWarning, owner_of, quiet, tensor_key, wait
from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidArgumentError,
    KeyMismatchError,
    UnverifiedCheckpointError,
)
from torchkeep.sources import read_tree
from torchkeep.storage.dcp_manifest import (
    MANIFEST,
    TREE_FILE,
    check_files,
    is_torchkeep_dcp,
    raise_for,
    rank_file,
    read_manifest,
    share,
)
from torchkeep.storage.paths import is_url
from torchkeep.targets import restore_targets
from torchkeep.tree import format_path

__all__ = ["load_tree", "restore"]

_POLICIES = ("skip", "reuse", "error")


# -- restore ------------------------------------------------------------------------------------


class Local:
    """What :func:`restore` reads from a local checkpoint directory.

    :meth:`pin` makes every later read go through a descriptor of the directory as it is then
    (``/proc/self/fd/N``, Linux): a save that swaps another checkpoint into the path while a
    restore runs makes that restore fail cleanly (the old files are gone) instead of reading
    half of each. Error messages still name the real path.
    """

    def __init__(self, root: Path) -> None:
        self.root = self.label = root
        self._fd = -1

    def pin(self) -> None:
        if self._fd >= 0 or not os.path.isdir("/proc/self/fd"):
            return
        try:
            self._fd = os.open(self.label, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return
        self.root = Path(f"/proc/self/fd/{self._fd}")

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        self.root = self.label

    def named(self, e: BaseException) -> BaseException:
        """``e`` with the pinned path replaced by the real one in its message and attributes."""
        pinned, real = str(self.root), str(self.label)
        if pinned == real:
            return e
        e.args = tuple(a.replace(pinned, real) if isinstance(a, str) else a for a in e.args)
        for attr in ("path", "index", "directory", "filename"):
            v = getattr(e, attr, None)
            if isinstance(v, str) and pinned in v:
                setattr(e, attr, v.replace(pinned, real))
        return e

    def exists(self) -> bool:
        return self.root.exists()

    def is_ours(self) -> bool:
        return is_torchkeep_dcp(self.root)

    def is_dcp(self) -> bool:
        return is_dcp_dir(self.root)

    def not_checkpoint(self) -> str:
        return f"not a distributed checkpoint (no {MANIFEST}, no DCP .metadata)"

    def unverified(self) -> str:
        return f"a DCP directory without a torchkeep manifest ({MANIFEST})"

    def manifest(self) -> dict[str, Any]:
        return read_manifest(self.root)

    def check(self, manifest: dict[str, Any], names: list[str], verify: bool) -> list[dict[str, Any]]:
        return check_files(self.root, manifest, names, verify=verify)

    def metadata(self, manifest: Any, verify: bool = True) -> Any:
        md = read_metadata(self.root)
        check_complete(self.root, md)
        check_chunks(self.root, md)  # every tensor covered exactly, before anything is allocated
        return md

    @contextmanager
    def local(self, name: str, manifest: Any, verify: bool) -> Iterator[Path]:
        yield self.root / name

    def reader(self, md: Any) -> Any:
        return safe_reader(self.root, md)

    def foreign(self) -> dict[str, Any]:
        return {"checkpoint_id": str(self.root)}


def _source(path: PathLike, storage_options: Mapping[str, Any] | None) -> Any:
    if is_url(path):
        from torchkeep.distributed.remote import RemoteSource

        return RemoteSource(str(path), storage_options or {})
    return Local(Path(os.fspath(path)).expanduser().absolute())


def _verify(src: Any, manifest: dict[str, Any], group: Any, verify: bool) -> None:
    """Every file checked by exactly one rank (split by size); every rank raises the same error."""
    mine = share(manifest, comm.rank(group), comm.world_size(group))
    try:
        found = src.check(manifest, mine, verify)
    except Exception as e:  # reported, not raised here: the other ranks would wait in the gather forever
        found = [{"file": ", ".join(mine) or "?", "kind": "error", "detail": f"{type(e).__name__}: {e}"}]
    problems = [p for ps in comm.all_gather_json(found, group) for p in ps]
    raise_for(src.label, problems)


def _get(tree: Any, path: Path_) -> tuple[bool, Any]:
    node = tree
    for p in path:
        in_dict = isinstance(node, Mapping) and p in node
        in_seq = isinstance(node, (list, tuple)) and isinstance(p, int) and 0 <= p < len(node)
        if not (in_dict or in_seq):
            return False, None
        node = node[p]
    return True, node


def set_at(tree: Any, path: Path_, value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(tree, tuple):
        items = list(tree)
        items[head] = set_at(items[head], rest, value)
        return tuple(items)
    tree[head] = set_at(tree[head], rest, value)
    return tree


class _Filler:
    """Puts a tensor at every placeholder: the target's own (sharded) tensor where it has one, else a
    fresh full-size tensor; collects them into the flat dict DCP loads into."""

    def __init__(self, md: Any, placeholders: dict[Path_, str], templates: dict[Path_, Any]) -> None:
        self.md = md.state_dict_metadata
        self.placeholders = placeholders
        self.templates = templates
        self.load: dict[str, torch.Tensor] = {}

    def fill(self, node: Any, path: Path_, tmpl: Any = None) -> Any:
        tmpl = self.templates.get(path, tmpl)
        key = self.placeholders.get(path)
        if key is not None:
            meta = self.md.get(key)
            if meta is None or not hasattr(meta, "size"):
                raise CorruptCheckpointError(key, "the manifest names a tensor DCP's metadata lacks")
            if isinstance(tmpl, torch.Tensor) and tuple(tmpl.shape) == tuple(meta.size):
                t = tmpl
            else:
                t = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
            self.load[key] = t
            return t
        sub = (lambda k: tmpl.get(k) if isinstance(tmpl, Mapping) else None) if tmpl is not None else (lambda k: None)
        if isinstance(node, Mapping):
            return {k: self.fill(v, (*path, k), sub(k)) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            seq = tmpl if isinstance(tmpl, (list, tuple)) else None
            items = [self.fill(v, (*path, i), seq[i] if seq and i < len(seq) else None) for i, v in enumerate(node)]
            return items if isinstance(node, list) else tuple(items)
        return node


def _check_module(where: str, key_prefix: Path_, template: Mapping[str, Any], saved: Any, md: Any, strict: bool):
    if not isinstance(saved, Mapping):
        raise KeyMismatchError(where, fix=f"the checkpoint holds a {type(saved).__name__} here, not a state dict")
    missing = sorted(set(template) - set(saved))
    unexpected = sorted(set(saved) - set(template))
    mismatched = []
    for k in sorted(set(template) & set(saved)):
        t = template[k]
        meta = md.state_dict_metadata.get(tensor_key((*key_prefix, k)))
        if isinstance(t, torch.Tensor) and meta is not None and tuple(t.shape) != tuple(meta.size):
            mismatched.append((k, tuple(meta.size), tuple(t.shape)))
    if (missing or unexpected or mismatched) and strict:
        raise KeyMismatchError(where, missing, unexpected, mismatched, fix="pass strict=False to load what matches")
    if missing or unexpected or mismatched:
        warnings.warn(f"{where}: loading what matches (missing {missing}, unexpected {unexpected})", stacklevel=4)
    return {k: v for k, v in saved.items() if k in template and k not in {m[0] for m in mismatched}}


def restore(
    path: PathLike,
    targets: Mapping[str, Any],
    *,
    strict: bool = True,
    verify: bool = True,
    trust_pickle: bool = False,
    per_rank_policy: str = "skip",
    process_group: Any = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Any:
    """Restore a checkpoint written by :func:`save` into ``targets``, on any number of ranks; call it on every rank.

    The manifest is checked first (each file hashed by one rank), then DCP reads each
    rank's shards straight into the targets' own (possibly sharded) tensors: a checkpoint
    saved on N ranks restores on M. Per-rank entries (RNG states) are restored from the
    same rank's file when the world size is unchanged; otherwise ``per_rank_policy``
    decides: ``"skip"`` (default: they keep their current state, with a
    :class:`RankStateWarning`), ``"reuse"`` (rank r takes saved rank ``r % N``, warned: ranks may
    then share random streams) or ``"error"``.

    ``path`` may be an fsspec URL (``s3://bucket/run/step-10``): a prefix without a valid
    manifest was never committed and is refused; every object is hashed (one rank each,
    streaming reads) before DCP reads the shards from the store.

    Args:
        path: the checkpoint directory, or an fsspec URL prefix.
        targets: dict (possibly nested) of modules, optimizers (their model must be among
            the targets), schedulers, ``RNGState`` and other objects with ``load_state_dict``.
        strict: raise :class:`~torchkeep.errors.KeyMismatchError` on missing targets or module keys.
        verify: hash every file against the manifest (``False``: sizes only).
        trust_pickle: allow a plain DCP directory without a torchkeep manifest (its
            ``.metadata`` is unpickled by DCP and nothing checks its completeness).
        per_rank_policy: ``"skip"``, ``"reuse"`` or ``"error"``, as above.
        process_group: the group to restore with (default: the default group).
        storage_options: fsspec options for a URL ``path``; unused for a local path.

    Returns:
        The whole tree (epoch, config, ...), with restored entries as loaded.

    Raises:
        UnverifiedCheckpointError: a DCP directory without a valid torchkeep manifest.
        FileChecksumError, MissingShardError, CorruptCheckpointError, KeyMismatchError.

    Example:
        >>> import torch, tempfile, os, torchkeep.distributed as tkd
        >>> model = torch.nn.Linear(2, 2)
        >>> p = tkd.save({"model": model, "epoch": 3}, os.path.join(tempfile.mkdtemp(), "ck"))
        >>> fresh = torch.nn.Linear(2, 2)
        >>> tkd.restore(p, {"model": fresh})["epoch"], torch.equal(fresh.weight, model.weight)
        (3, True)
    """
    if per_rank_policy not in _POLICIES:
        raise InvalidArgumentError(
            "per_rank_policy",
            per_rank_policy,
            f"pass one of {', '.join(repr(p) for p in _POLICIES)}: for per-rank entries (RNG states) of a checkpoint "
            "saved on another number of ranks, 'skip' (the default) keeps their current state, 'reuse' gives rank r "
            "saved rank r % N, 'error' raises",
        )
    wait()
    src = _source(path, storage_options)
    if not src.exists():
        raise CheckpointNotFoundError(src.label, _interrupted(src.label))
    plan = restore_targets(targets)
    getattr(src, "pin", lambda: None)()
    try:
        return _restore(src, plan, strict, verify, trust_pickle, per_rank_policy, process_group)
    except Exception as e:
        getattr(src, "named", lambda x: x)(e)  # the real path in the message, not the pinned one
        raise
    finally:
        getattr(src, "close", lambda: None)()


def _interrupted(final: Any) -> str:
    """A hint naming complete copies a save interrupted while replacing ``final`` left hidden beside it."""
    if not isinstance(final, Path) or not final.parent.is_dir():
        return ""
    prefix = f".{final.name}."
    copies = sorted(
        p.name
        for p in final.parent.iterdir()
        if p.name.startswith(prefix) and (".tmp-" in p.name or ".old-" in p.name) and is_torchkeep_dcp(p)
    )
    if not copies:
        return ""
    return (
        f"A save was interrupted while replacing it; complete checkpoints are left beside it: {', '.join(copies)} "
        f"(.tmp-: the new one, .old-: the previous one). Rename the one you want to {final.name}."
    )


def _restore(
    src: Any, plan: list, strict: bool, verify: bool, trust_pickle: bool, per_rank_policy: str, process_group: Any
) -> Any:
    root = src.label
    if not src.is_ours():
        if not src.is_dcp():
            raise CorruptCheckpointError(root, src.not_checkpoint())
        if not trust_pickle:
            raise UnverifiedCheckpointError(root, src.unverified())
        return _restore_foreign(src, plan, strict=strict, group=process_group)
    manifest = src.manifest()
    _verify(src, manifest, process_group, verify)
    md = src.metadata(manifest, verify)
    with src.local(TREE_FILE, manifest, verify) as tree_file:
        tree = read_tree(kinds.detect(tree_file), verify=verify)[0]
    placeholders = {tuple(p): k for p, k in manifest.get("tensors", [])}
    rank_paths = [tuple(p) for p in manifest.get("per_rank", [])]
    modules = [t for _, t in plan if isinstance(t, torch.nn.Module)]
    templates: dict[Path_, Any] = {}
    apply: list[tuple[Path_, Any, Any]] = []
    absent = []
    for tpath, target in plan:
        where = format_path(tpath)
        if tpath in rank_paths:
            continue
        ok, saved = _get(tree, tpath)
        if not ok:
            absent.append(where)
            continue
        owner = None
        if isinstance(target, torch.nn.Module):
            templates[tpath] = get_model_state_dict(target)
            tree = set_at(tree, tpath, _check_module(where, tpath, templates[tpath], saved, md, strict))
        elif isinstance(target, torch.optim.Optimizer):
            owner = owner_of(target, modules, where)
            templates[tpath] = get_optimizer_state_dict(owner, target)
        apply.append((tpath, target, owner))
    if absent:
        if strict:
            raise KeyMismatchError(str(root), missing=absent, fix="rename the targets, or pass strict=False")
        warnings.warn(f"{root}: not in the checkpoint, left unchanged: {', '.join(sorted(absent))}", stacklevel=2)
    filler = _Filler(md, placeholders, templates)
    tree = filler.fill(tree, ())
    with quiet(), dcp_errors(root):
        dcp.load(
            filler.load,
            storage_reader=src.reader(md),
            process_group=process_group,
            no_dist=not comm.is_distributed(),
        )
    opts = StateDictOptions(strict=strict)
    for tpath, target, owner in apply:
        _, sub = _get(tree, tpath)
        if isinstance(target, torch.nn.Module):
            set_model_state_dict(target, sub, options=opts)
        elif isinstance(target, torch.optim.Optimizer):
            set_optimizer_state_dict(owner, target, sub, options=opts)
        else:
            target.load_state_dict(sub)
    if rank_paths:
        tree = _restore_per_rank(src, tree, plan, rank_paths, manifest, per_rank_policy, process_group, verify)
    return tree


def _restore_per_rank(
    src: Any, tree: Any, plan: list, rank_paths: list[Path_], manifest: dict, policy: str, group: Any, verify: bool
) -> Any:
    root = src.label
    me, world = comm.rank(group), comm.world_size(group)
    saved = int(manifest["world_size"])
    if world == saved:
        source = me
    else:
        msg = f"{root}: saved on {saved} ranks, restored on {world}: per-rank entries ({len(rank_paths)}, e.g. RNG states)"
        if policy == "error":
            raise KeyMismatchError(
                str(root), fix=f"{msg} cannot map one-to-one; pass per_rank_policy='skip' or 'reuse'"
            )
        if policy == "skip":
            warnings.warn(f"{msg} were not restored; they keep their current state", RankStateWarning, stacklevel=3)
            return tree
        source = me % saved
        warnings.warn(f"{msg}: rank {me} takes saved rank {source}'s", RankStateWarning, stacklevel=3)
    with src.local(rank_file(source), manifest, verify) as rank_path:
        values = read_tree(kinds.detect(rank_path), verify=verify)[0]
    wanted = {tp: t for tp, t in plan}
    for rp, value in zip(rank_paths, values, strict=True):
        target = wanted.get(rp)
        if target is None and len(rp) == 1 and rp[0] in (tree if isinstance(tree, Mapping) else ()):
            pass  # no target: the returned tree shows the saved value
        if isinstance(target, torch.Generator):
            target.set_state(value.get_state())
        elif target is not None:
            target.load_state_dict(value)
        tree = set_at(tree, rp, value)
    return tree


def _restore_foreign(src: Any, plan: list, *, strict: bool, group: Any) -> Any:
    """A plain DCP directory, trusted by the caller: DCP reads it (its pickle included) with its own key layout."""
    modules = [t for _, t in plan if isinstance(t, torch.nn.Module)]
    state: dict[str, Any] = {}
    setters = []
    for tpath, target in plan:
        if isinstance(target, torch.nn.Module):
            value: Any = get_model_state_dict(target)
            setters.append(lambda v, t=target: set_model_state_dict(t, v, options=StateDictOptions(strict=strict)))
        elif isinstance(target, torch.optim.Optimizer):
            owner = owner_of(target, modules, format_path(tpath))
            value = get_optimizer_state_dict(owner, target)
            setters.append(lambda v, t=target, o=owner: set_optimizer_state_dict(o, t, v))
        else:
            value = target  # DCP calls state_dict()/load_state_dict() on Stateful values itself
            setters.append(None)
        node = state
        for p in tpath[:-1]:
            node = node.setdefault(p, {})
        node[tpath[-1]] = value
    with dcp_errors(src.label):
        dcp.load(state, **src.foreign(), process_group=group, no_dist=not comm.is_distributed())
    for (tpath, _), setter in zip(plan, setters, strict=True):
        if setter is not None:
            setter(_get(state, tpath)[1])
    return state


def load_tree(path: PathLike, *, verify: bool = True, storage_options: Mapping[str, Any] | None = None) -> Any:
    """The whole tree of a distributed checkpoint on this one process, tensors gathered at full size.

    For conversion and inspection on a laptop: run it without a process group. Per-rank
    entries come from rank 0. ``path`` may be an fsspec URL (with ``storage_options``). Each tensor is allocated once, at its full size, and read in place.

    Example:
        >>> import torch, tempfile, os, torchkeep.distributed as tkd
        >>> from torchkeep.distributed.resume import load_tree
        >>> p = tkd.save({"w": torch.ones(3), "step": 4}, os.path.join(tempfile.mkdtemp(), "ck"))
        >>> load_tree(p)["w"].tolist()
        [1.0, 1.0, 1.0]
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankStateWarning)
        return restore(path, {}, verify=verify, per_rank_policy="reuse", storage_options=storage_options)

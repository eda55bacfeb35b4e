"""Sharded save of a state tree on ``torch.distributed.checkpoint``, committed atomically.

Every rank calls :func:`save` / :func:`restore` with the same tree. Modules and optimizers go
through ``get_state_dict`` / ``set_state_dict`` (canonical keys, DDP and FSDP2 shards), every
tensor goes to DCP (each rank writes its own shard, in parallel), the rest of the tree goes to a
small torchkeep file written by rank 0, and per-rank entries (``RNGState``, generators) to one
torchkeep file per rank. The directory is written under a temporary name; rank 0 writes the
manifest last, after every rank has finished, and renames the directory into place.
"""

from __future__ import annotations

import copy
import os
import secrets
import shutil
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
)

from torchkeep import api
from torchkeep.dcp import first_failure
from torchkeep.distributed import _comm
from torchkeep.distributed._tap import TappedWriter
from torchkeep.distributed.manifest import (
    TREE_FILE,
    hash_file,
    is_torchkeep_dcp,
    is_url,
    rank_file,
    write_manifest,
)
from torchkeep.errors import (
    DistributedSaveError,
    InsufficientSpaceError,
    UnsupportedObjectError,
)
from torchkeep.rng import RNGState
from torchkeep.tree import format_path, is_stateful

__all__ = ["AsyncSave", "RankStateWarning", "save", "wait"]

PathLike = str | os.PathLike[str]
Path_ = tuple[Any, ...]
_POLICIES = ("skip", "reuse", "error")


class RankStateWarning(UserWarning):
    """Per-rank entries (RNG states) could not be restored one-to-one: the world size changed.

    Example:
        >>> import warnings
        >>> warnings.simplefilter("error", RankStateWarning)  # make a changed world size an error
        >>> warnings.resetwarnings()
    """


# -- splitting a tree ---------------------------------------------------------------------------


def _walk_modules(node: Any, out: list[torch.nn.Module]) -> None:
    if isinstance(node, torch.nn.Module):
        out.append(node)
    elif isinstance(node, Mapping):
        for v in node.values():
            _walk_modules(v, out)
    elif isinstance(node, (list, tuple)):
        for v in node:
            _walk_modules(v, out)


def _owner(opt: torch.optim.Optimizer, modules: list[torch.nn.Module], where: str) -> torch.nn.Module:
    """The module whose parameters ``opt`` optimises (``get_optimizer_state_dict`` needs it for FQNs)."""
    wanted = {id(p) for g in opt.param_groups for p in g["params"]}
    for m in modules:
        if wanted <= {id(p) for p in m.parameters()}:
            return m
    raise UnsupportedObjectError(
        where,
        opt,
        "A distributed checkpoint stores optimizer state by parameter name, so the model it optimises must be "
        "in the same tree (save) or in the same targets (restore), e.g. {'model': model, 'optimizer': opt}.",
    )


def _key(path: Path_) -> str:
    for p in path:
        if not isinstance(p, (str, int)) or isinstance(p, bool):
            raise UnsupportedObjectError(
                format_path(path), p, "tensors in a distributed checkpoint live under str or int keys only."
            )
    return "/".join(map(str, path))


class _Split:
    """A state tree taken apart: DCP tensors, the plain rest, per-rank entries."""

    def __init__(self, per_rank: tuple[str, ...]) -> None:
        self.per_rank = per_rank
        self.tensors: dict[str, torch.Tensor] = {}
        self.placeholders: list[list[Any]] = []  # [[path components], dcp key]
        self.rank_paths: list[list[Any]] = []
        self.rank_values: list[Any] = []
        self.modules: list[torch.nn.Module] = []
        self.module_paths: list[list[Any]] = []  # where modules were: their tensors are the parameters

    def run(self, state: Any) -> Any:
        _walk_modules(state, self.modules)
        return self.node(state, ())

    def node(self, obj: Any, path: Path_) -> Any:
        if isinstance(obj, (RNGState, torch.Generator)) or (len(path) == 1 and path[0] in self.per_rank):
            self.rank_paths.append(list(path))
            self.rank_values.append(obj)
            return None
        if isinstance(obj, torch.nn.Module):
            self.module_paths.append(list(path))
            return self.node(get_model_state_dict(obj), path)
        if isinstance(obj, torch.optim.Optimizer):
            owner = _owner(obj, self.modules, format_path(path))
            return self.node(get_optimizer_state_dict(owner, obj), path)
        if isinstance(obj, torch.Tensor):
            key = _key(path)
            if key in self.tensors:
                raise UnsupportedObjectError(format_path(path), obj, f"another tensor already has the name {key!r}.")
            self.tensors[key] = obj.detach()
            self.placeholders.append([list(path), key])
            return None
        if is_stateful(obj):
            return self.node(obj.state_dict(), path)
        if isinstance(obj, Mapping):
            return {k: self.node(v, (*path, k)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            items = [self.node(v, (*path, i)) for i, v in enumerate(obj)]
            return items if isinstance(obj, list) else tuple(items)
        return obj  # scalars; anything unsavable is refused by the tree file's save, naming its path


# -- committing ---------------------------------------------------------------------------------


class _Writer(TappedWriter, FileSystemWriter):
    """DCP's file writer that hashes what it writes and remembers which data files this rank wrote."""

    def __init__(self, path: Path, **kwargs: Any) -> None:
        super().__init__(str(path), **kwargs)
        self.tap()


def _publish(tmp: Path, final: Path, durable: bool) -> None:
    """Rename the finished directory into place; an old checkpoint there is replaced, then deleted.

    The replacement is one atomic swap where the file system allows it (Linux
    ``renameat2(RENAME_EXCHANGE)``): a crash leaves the old or the new checkpoint at ``final``,
    never neither. Elsewhere it takes two renames; a crash between them leaves both complete
    copies hidden beside ``final``, and ``restore`` names them in its error.
    """
    from torchkeep.storage.local import exchange, fsync_dir

    if final.exists() and exchange(tmp, final):
        old = tmp  # the swap left the previous checkpoint under the temporary name
    else:
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{secrets.token_hex(4)}")
            os.rename(final, old)
        os.rename(tmp, final)
    if durable:
        fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _replaceable(final: Path) -> None:
    """Refuse to replace a directory that is not a torchkeep checkpoint (a save would delete it)."""
    if not final.exists():
        return
    if not final.is_dir():
        raise IsADirectoryError(f"{final}: is a file; a distributed checkpoint is a directory, give another path")
    if is_torchkeep_dcp(final):
        return
    held = sorted(p.name for p in final.iterdir())
    if held:
        shown = ", ".join(held[:10]) + (f", ... ({len(held)} entries)" if len(held) > 10 else "")
        raise FileExistsError(
            f"{final}: exists and is not a torchkeep checkpoint (it holds {shown}); a save replaces only a "
            "checkpoint, never other data. Give another path, or move that directory away first."
        )


def _commit(
    tmp: Path,
    final: Path,
    own: list[str],
    group: Any,
    *,
    durable: bool,
    extra: dict[str, Any],
    world: int,
    before: Any = None,
    known: Mapping[str, dict[str, Any]] | None = None,
) -> Path:
    """Hash this rank's files, gather on rank 0, write the manifest last, rename; every rank learns the outcome.

    ``known`` holds the entries of files hashed as they were written (no second read).
    """
    report: dict[str, Any] = {"files": {}, "error": None}
    try:
        if before is not None:
            own = [*own, *before()]
        known = known or {}
        report["files"] = {name: known.get(name) or hash_file(tmp / name) for name in own}
    except Exception as e:  # reported to rank 0, which then commits nothing
        report["error"] = f"{type(e).__name__}: {e}"
    reports = _comm.all_gather_json(report, group)
    me = _comm.rank(group)
    failure: BaseException | None = None
    status: dict[str, Any] | None = None
    if me == 0:
        try:
            bad = [(r, x["error"]) for r, x in enumerate(reports) if x["error"]]
            if bad:
                raise DistributedSaveError(final, bad[0][0], bad[0][1])
            for r, x in enumerate(reports):
                for name, entry in x["files"].items():
                    _visible(tmp, final, r, name, entry["bytes"])
            files = {name: entry for x in reports for name, entry in x["files"].items()}
            files[".metadata"] = hash_file(tmp / ".metadata")
            write_manifest(tmp, files, world_size=world, durable=durable, extra=extra)
            _publish(tmp, final, durable)
            status = {"ok": True}
        except Exception as e:  # every rank must hear of it, or they would wait forever
            failure = e
            status = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            shutil.rmtree(tmp, ignore_errors=True)
    outcome = _comm.all_gather_json(status, group)[0]
    if failure is not None:
        raise failure
    if not outcome["ok"]:
        raise DistributedSaveError(final, 0, outcome["error"])
    return final


def _bytes_to_write(tensors: Mapping[str, torch.Tensor], me: int) -> int:
    """Bytes this rank's part of a save writes: its local shards, and replicated tensors on rank 0
    (DCP writes each replicated tensor once, so counting them on every rank would overestimate)."""
    from torch.distributed.tensor import DTensor

    n = 0
    for t in tensors.values():
        if isinstance(t, DTensor):
            local = t.to_local()
            n += local.numel() * local.element_size()
        elif me == 0:
            n += t.numel() * t.element_size()
    return n


_SLACK = 1 << 20  # the tree file, DCP's .metadata, the manifest: small beside the data
_PER_TENSOR = 512  # metadata bytes per tensor (DCP's .metadata, headers)


def _check_space(directory: Path, data: int, tensors: int) -> None:
    """Refuse a save that cannot fit before any rank writes (checked on rank 0, for every rank's bytes)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return  # unknown: let the write decide
    available = int(st.f_bavail) * int(st.f_frsize)
    needed = data + _SLACK + _PER_TENSOR * tensors
    if available < needed:
        raise InsufficientSpaceError(directory, needed, available)


def _visible(tmp: Path, final: Path, rank: int, name: str, size: int) -> None:
    """Rank 0 commits only files it can see whole: ranks on disks it does not share are caught here."""
    try:
        seen = (tmp / name).stat().st_size
    except FileNotFoundError:
        seen = -1
    if seen != size:
        what = "missing" if seen < 0 else f"{seen} bytes instead of {size}"
        raise DistributedSaveError(
            final,
            rank,
            f"its file {name} is {what} as seen from rank 0: the checkpoint path must be on a file system every "
            "rank shares (a shared mount, or an s3:// URL), not a node-local disk",
        )


class AsyncSave:
    """A save running in the background: ``result()`` waits and returns the path or raises its error.

    Example:
        >>> import torch, tempfile, os, torchkeep.distributed as tkd
        >>> job = tkd.save({"w": torch.ones(2)}, os.path.join(tempfile.mkdtemp(), "ck"), async_save=True)
        >>> job.result().name
        'ck'
    """

    def __init__(self, path: Path, future: Future[Path]) -> None:
        self.path = path
        self._future = future

    def done(self) -> bool:
        """True once the checkpoint is committed or has failed."""
        return self._future.done()

    def result(self, timeout: float | None = None) -> Path:
        """Wait for the commit; returns the path, or raises the error that stopped the save.

        Once this returns or raises, :func:`wait` and the next ``save`` no longer report this save.
        """
        global _pending
        try:
            return self._future.result(timeout)
        finally:
            if _pending is self and self._future.done():
                _pending = None

    def __repr__(self) -> str:
        return f"AsyncSave({str(self.path)!r}, done={self.done()})"


_pending: AsyncSave | None = None
# weak: once destroy_process_group() drops a group, no reference here keeps its C++ object (and its
# threads) alive until interpreter teardown
_async_groups: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


def wait() -> Path | None:
    """Wait for this process's background save, if any; returns its path or raises its error.

    Example:
        >>> import torchkeep.distributed as tkd
        >>> print(tkd.wait())  # no save in flight
        None
    """
    global _pending
    job, _pending = _pending, None
    return None if job is None else job.result()


def _set_pending(job: AsyncSave) -> None:
    global _pending
    _pending = job


def _async_group(group: Any) -> Any:
    """A gloo group for the background thread's collectives, so they never interleave with training's."""
    if group is not None or not _comm.is_distributed():
        return group
    default = dist.distributed_c10d._get_default_group()
    bg = _async_groups.get(id(default))
    if bg is None:
        bg = _async_groups[id(default)] = dist.new_group(backend="gloo")
    return bg


# -- save ---------------------------------------------------------------------------------------


def _failed(final: Path, tmp: Path, me: int, e: BaseException) -> BaseException:
    """DCP's ``CheckpointException`` (a BaseException naming the failed ranks) as a typed error; rank 0 cleans up."""
    if me == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    return _as_save_error(final, e)


def _as_save_error(final: Any, e: BaseException) -> BaseException:
    """DCP's ``CheckpointException`` as a :class:`DistributedSaveError` naming the first failed rank."""
    failed = None if isinstance(e, KeyboardInterrupt) else first_failure(e)
    if failed is None:
        return e
    rank, cause = failed
    return DistributedSaveError(final, rank, f"{type(cause).__name__}: {cause}")


def _snapshot(value: Any) -> Any:
    """A copy of a per-rank entry as it is now (an async save writes it later): tensors cloned,
    containers copied, a Stateful's state dict, a generator's state in a new generator."""
    if isinstance(value, torch.Generator):
        g = torch.Generator(device=value.device)
        g.set_state(value.get_state())
        return g
    if is_stateful(value):
        value = value.state_dict()
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if type(value) is dict:
        return {k: _snapshot(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_snapshot(v) for v in value)
    return copy.deepcopy(value)


@contextmanager
def _quiet() -> Iterator[None]:
    """Without a process group DCP warns that it assumes a single process: that is the intent here."""
    if _comm.is_distributed():
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to", category=UserWarning)
        yield


def save(
    state: Any,
    path: PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    durable: bool = True,
    async_save: bool = False,
    per_rank: tuple[str, ...] | list[str] = (),
    process_group: Any = None,
    thread_count: int = 1,
    storage_options: Mapping[str, Any] | None = None,
) -> Path | str | AsyncSave:
    """Save a state tree as a sharded, checksummed checkpoint directory; call it on every rank.

    Modules (plain, DDP, FSDP2 ``fully_shard``) and optimizers are saved through
    ``get_model_state_dict`` / ``get_optimizer_state_dict``: keys are canonical (no
    ``module.`` / ``_orig_mod.``) and each rank writes only its shards. Other tensors are
    assumed replicated (DCP writes them once). Non-tensor leaves (epoch, config) are taken
    from rank 0. ``RNGState`` and ``torch.Generator`` leaves, and the top-level keys named in
    ``per_rank``, are saved per rank. The checkpoint appears at ``path`` only once every rank has
    finished and rank 0 has written the manifest; an existing checkpoint there is replaced by one
    atomic swap where the file system allows it. A directory there that is not a torchkeep
    checkpoint is refused, never replaced.

    Without a process group it saves as a single rank (same layout).

    ``path`` may be an fsspec URL (``s3://bucket/run/step-10``, ``gs://...``, ``memory://...``):
    each save writes its objects under its own ``PREFIX/.data-<token>/`` and commits by an
    exclusive create of ``PREFIX/torchkeep-manifest.json`` (on S3 a conditional PUT) naming it;
    a prefix that already holds a committed checkpoint is refused
    (:class:`~torchkeep.errors.CheckpointExistsError`), and a racing save never touches the
    winner's objects.

    Args:
        state: the state tree (the same structure on every rank).
        path: the checkpoint directory to create.
        metadata: JSON-serialisable user metadata (from rank 0).
        durable: fsync files and directories (default).
        async_save: return at once with an :class:`AsyncSave` once tensors are staged in
            host memory (mutating the model afterwards does not change the checkpoint); the
            write and commit continue in the background. A later ``save`` waits for it.
        per_rank: top-level keys whose whole subtree differs by rank (besides RNG states).
        process_group: the group to save with (default: the default group).
        thread_count: writer threads per rank for DCP.
        storage_options: fsspec options for a URL ``path`` (for s3: ``key``, ``secret``,
            ``client_kwargs={"endpoint_url": ...}``); unused for a local path.

    Returns:
        The path (the URL for object storage), or an :class:`AsyncSave` when ``async_save``.

    Raises:
        UnsupportedObjectError: a leaf cannot be saved (names its path), or an optimizer whose
            model is not in the tree.
        DistributedSaveError: another rank failed; nothing was committed.
        CheckpointExistsError: a URL prefix that already holds a committed checkpoint.
        FileExistsError: a directory at ``path`` that is not a torchkeep checkpoint (raised as
            itself on rank 0, as a ``DistributedSaveError`` on the other ranks).

    Example:
        >>> import torch, tempfile, os, torchkeep.distributed as tkd
        >>> model = torch.nn.Linear(2, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> p = tkd.save({"model": model, "optimizer": opt, "epoch": 3}, os.path.join(tempfile.mkdtemp(), "ck"))
        >>> sorted(f.name for f in p.iterdir())[-2:]
        ['torchkeep-manifest.json', 'tree.safetensors']
    """
    wait()  # one save at a time: the previous one's error surfaces here rather than being lost
    if is_url(path):
        from torchkeep.distributed import remote

        return remote.save(
            state,
            str(path),
            storage_options=storage_options or {},
            metadata=metadata,
            async_save=async_save,
            per_rank=tuple(per_rank),
            process_group=process_group,
            thread_count=thread_count,
        )
    final = Path(os.fspath(path)).expanduser().absolute()
    split = _Split(tuple(per_rank))
    tree = split.run(state)
    group = process_group
    me, world = _comm.rank(group), _comm.world_size(group)
    # per-rank entries are snapshotted now (an async save returns before they are written)
    rank_values = [_snapshot(v) for v in split.rank_values]
    start: dict[str, Any] = {}
    token = secrets.token_hex(6)
    sizes = _comm.all_gather_json(_bytes_to_write(split.tensors, me), group)
    if me == 0:
        try:
            _replaceable(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            _check_space(final.parent, sum(sizes), len(split.tensors))
            (final.parent / f".{final.name}.tmp-{token}").mkdir()
            start["token"] = token
            api.save(tree, final.parent / f".{final.name}.tmp-{token}" / TREE_FILE, metadata=metadata, durable=durable)
        except Exception as e:  # tell the other ranks before they start writing, then raise here
            failure: Exception | None = e
            start = {"error": f"{type(e).__name__}: {e}"}
        else:
            failure = None
    start = _comm.all_gather_json(start, group)[0]
    if me == 0 and failure is not None:
        shutil.rmtree(final.parent / f".{final.name}.tmp-{token}", ignore_errors=True)
        raise failure
    if "error" in start:
        raise DistributedSaveError(final, 0, start["error"])
    tmp = final.parent / f".{final.name}.tmp-{start['token']}"
    own = [TREE_FILE] if me == 0 else []

    def write_rank_file() -> list[str]:
        if not split.rank_paths:
            return []
        api.save(rank_values, tmp / rank_file(me), durable=durable)
        return [rank_file(me)]

    extra = {"tensors": split.placeholders, "per_rank": split.rank_paths, "modules": split.module_paths}
    writer = _Writer(tmp, sync_files=durable, thread_count=thread_count)
    dist_kw: dict[str, Any] = {"no_dist": not _comm.is_distributed()}

    def commit(grp: Any) -> Path:
        files = [*own, *sorted(writer.written)]
        return _commit(
            tmp,
            final,
            files,
            grp,
            durable=durable,
            extra=extra,
            world=world,
            before=write_rank_file,
            known=writer.digests,
        )

    if not async_save:
        try:
            with _quiet():
                dcp.save(split.tensors, storage_writer=writer, process_group=group, **dist_kw)
        except BaseException as e:
            raise _failed(final, tmp, me, e) from e
        return commit(group)
    bg = _async_group(group)
    response = dcp.async_save(split.tensors, storage_writer=writer, process_group=bg, **dist_kw)
    return in_background(response, lambda e: _failed(final, tmp, me, e), lambda: commit(bg), final)


def in_background(
    response: Any, failed: Callable[[BaseException], BaseException], commit: Callable[[], Any], where: Any
) -> AsyncSave:
    """Finish an ``async_save``: wait for DCP's upload, then ``commit()``, in a thread; the pending save."""
    upload = getattr(response, "upload_completion", response)
    future: Future[Any] = Future()

    def finish() -> None:
        try:
            try:
                upload.result()
            except BaseException as e:
                raise failed(e) from e
            done = commit()
        except BaseException as e:
            future.set_exception(e)
        else:
            future.set_result(done)

    threading.Thread(target=finish, name="torchkeep-distributed-save", daemon=True).start()
    job = AsyncSave(where, future)
    _set_pending(job)
    return job

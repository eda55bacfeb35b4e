"""Sharded save of a state tree on ``torch.distributed.checkpoint``, committed atomically.

Every rank calls :func:`save` / :func:`restore` with the same tree. Modules and optimizers go
through ``get_state_dict`` / ``set_state_dict`` (canonical keys, DDP and FSDP2 shards), every
tensor goes to DCP (each rank writes its own shard, in parallel), the rest of the tree goes to a
small torchkeep file written by rank 0, and per-rank entries (``RNGState``, generators) to one
torchkeep file per rank. The directory is written under a temporary name; rank 0 writes the
manifest last, after every rank has finished, and renames the directory into place.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from torchkeep.distributed import comm
from torchkeep.distributed.common import (
    AsyncSave,
    PathLike,
    RankStateWarning,
    Split,
    as_save_error,
    async_group,
    in_background,
    quiet,
    snapshot,
    wait,
)
from torchkeep.distributed.tap import TappedWriter
from torchkeep.errors import (
    DistributedSaveError,
    InsufficientSpaceError,
    TargetExistsError,
)
from torchkeep.storage.dcp_manifest import (
    TREE_FILE,
    hash_file,
    is_torchkeep_dcp,
    rank_file,
    write_manifest,
)
from torchkeep.storage.paths import is_url
from torchkeep.writer import save_tree

__all__ = ["AsyncSave", "RankStateWarning", "save", "wait"]


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
        raise TargetExistsError(
            final,
            "is a file, and a distributed checkpoint is a directory; a save never replaces a file with one",
            f"Give another path, e.g. {final.with_suffix('.dcp').name!r} beside it, or move that file away first.",
        )
    if is_torchkeep_dcp(final):
        return
    held = sorted(p.name for p in final.iterdir())
    if held:
        shown = ", ".join(held[:10]) + (f", ... ({len(held)} entries)" if len(held) > 10 else "")
        raise TargetExistsError(
            final,
            f"exists and is not a torchkeep checkpoint (it holds {shown}); a save replaces only a checkpoint, "
            "never other data",
            "Give another path, or move that directory away first.",
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
    reports = comm.all_gather_json(report, group)
    me = comm.rank(group)
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
    outcome = comm.all_gather_json(status, group)[0]
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


# -- save ---------------------------------------------------------------------------------------


def _failed(final: Path, tmp: Path, me: int, e: BaseException) -> BaseException:
    """DCP's ``CheckpointException`` (a BaseException naming the failed ranks) as a typed error; rank 0 cleans up."""
    if me == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    return as_save_error(final, e)


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
        TargetExistsError: a file, or a directory that is not a torchkeep checkpoint, at ``path``
            (a ``FileExistsError``; raised as itself on rank 0, as a ``DistributedSaveError`` on the
            other ranks).

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
    split = Split(tuple(per_rank))
    tree = split.run(state)
    group = process_group
    me, world = comm.rank(group), comm.world_size(group)
    # per-rank entries are snapshotted now (an async save returns before they are written)
    rank_values = [snapshot(v) for v in split.rank_values]
    start: dict[str, Any] = {}
    token = secrets.token_hex(6)
    sizes = comm.all_gather_json(_bytes_to_write(split.tensors, me), group)
    if me == 0:
        try:
            _replaceable(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            _check_space(final.parent, sum(sizes), len(split.tensors))
            (final.parent / f".{final.name}.tmp-{token}").mkdir()
            start["token"] = token
            save_tree(tree, final.parent / f".{final.name}.tmp-{token}" / TREE_FILE, metadata=metadata, durable=durable)
        except Exception as e:  # tell the other ranks before they start writing, then raise here
            failure: Exception | None = e
            start = {"error": f"{type(e).__name__}: {e}"}
        else:
            failure = None
    start = comm.all_gather_json(start, group)[0]
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
        save_tree(rank_values, tmp / rank_file(me), durable=durable)
        return [rank_file(me)]

    extra = {"tensors": split.placeholders, "per_rank": split.rank_paths, "modules": split.module_paths}
    writer = _Writer(tmp, sync_files=durable, thread_count=thread_count)
    dist_kw: dict[str, Any] = {"no_dist": not comm.is_distributed()}

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
            with quiet():
                dcp.save(split.tensors, storage_writer=writer, process_group=group, **dist_kw)
        except BaseException as e:
            raise _failed(final, tmp, me, e) from e
        return commit(group)
    bg = async_group(group)
    with quiet():  # one process without a process group is the intent, not a warning
        response = dcp.async_save(split.tensors, storage_writer=writer, process_group=bg, **dist_kw)
    return in_background(response, lambda e: _failed(final, tmp, me, e), lambda: commit(bg), final)

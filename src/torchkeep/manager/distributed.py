"""The collective side of :class:`~torchkeep.CheckpointManager` in a multi-process (``torch.distributed``) run.

Every rank holds a manager on the same run directory (a local or shared file system) and
calls the same methods in the same order. Rank 0 alone takes the lock, cleans up, names
checkpoints, writes the manifest and deletes what retention drops; it then sends its list of
checkpoints to every rank, so ``latest()``, ``best()`` and ``checkpoints()`` agree everywhere.
Checkpoints are :mod:`torchkeep.distributed` directories (``NAME.dcp``): each rank writes its own
shards, and the directory appears whole or not at all. Every message is JSON (never pickle).

A failure on rank 0 is raised there as itself and on the other ranks as
:class:`~torchkeep.errors.DistributedManagerError`, so no rank waits forever for the others.

Without a process group every helper here runs as a single rank (rank 0 of 1).

Example:
    >>> on_rank0(lambda: {"file": "ckpt_000001.dcp"}, path="/run", action="save")
    {'file': 'ckpt_000001.dcp'}
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DistributedManagerError,
    InvalidArgumentError,
    MissingShardError,
    UnverifiedCheckpointError,
)
from torchkeep.manager import naming

__all__ = ["FALLBACK", "agree", "is_dir_checkpoint", "multi_rank", "on_rank0", "rank", "resolve", "wait_for"]

T = TypeVar("T")

#: what ``restore`` treats as "this checkpoint does not verify, try an older one"
FALLBACK: tuple[type[BaseException], ...] = (
    CorruptCheckpointError,
    CheckpointNotFoundError,
    MissingShardError,
    UnverifiedCheckpointError,
)


def multi_rank() -> bool:
    """True when a default process group with more than one rank is initialised.

    Example:
        >>> multi_rank()  # a plain Python process
        False
    """
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def resolve(distributed: bool | None, store: Any) -> bool:
    """Whether a manager saves distributed checkpoints: ``None`` means "when the run has more than one rank".

    Raises:
        InvalidArgumentError: distributed checkpoints on object storage (an fsspec URL), not supported yet
            (a ``ValueError``).

    Example:
        >>> resolve(None, object()), resolve(True, type("S", (), {"adopts": True})())
        (False, True)
    """
    on = multi_rank() if distributed is None else bool(distributed)
    if on and not getattr(store, "adopts", False):
        raise InvalidArgumentError(
            "distributed",
            distributed,
            f"{getattr(store, 'location', store)}: a CheckpointManager cannot save distributed (sharded) "
            "checkpoints on object storage yet. Use a run directory on a local or shared file system that "
            "every rank can reach, or pass distributed=False and create the manager on rank 0 only "
            "(it then saves single files of what rank 0 holds).",
        )
    return on


def is_dir_checkpoint(name: str) -> bool:
    """Whether a run's entry ``name`` is a distributed checkpoint directory (``NAME.dcp``).

    Example:
        >>> is_dir_checkpoint("ckpt_000003.dcp"), is_dir_checkpoint("ckpt_000003.safetensors")
        (True, False)
    """
    return name.endswith(naming.DIR_SUFFIX)


def _all_gather(obj: Any) -> list[Any]:
    from torchkeep.distributed.comm import all_gather_json

    return all_gather_json(obj)


def on_rank0(fn: Callable[[], T], *, path: str | os.PathLike[str], action: str) -> T:
    """Run ``fn`` on rank 0 and return its JSON-able result on every rank; call it on every rank.

    Raises:
        DistributedManagerError: on the other ranks, when ``fn`` failed on rank 0 (which raises
            the original error).
    """
    failure: BaseException | None = None
    message: dict[str, Any] | None = None
    if rank() == 0:
        try:
            message = {"ok": fn()}
        except Exception as e:  # the other ranks must hear of it, or they would wait forever
            failure = e
            message = {"error": f"{type(e).__name__}: {e}"}
    got = _all_gather(message)[0]
    if failure is not None:
        raise failure
    if "error" in got:
        raise DistributedManagerError(path, 0, action, got["error"])
    return got["ok"]


def agree(error: BaseException | None, path: str | os.PathLike[str]) -> BaseException | None:
    """This rank's restore error, or, when this rank succeeded but another failed, an error naming that rank.

    Every rank then falls back to the same older checkpoint (or raises) together.
    """
    reports = _all_gather(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        return error
    for r, report in enumerate(reports):
        if report:
            return CorruptCheckpointError(Path(path), f"rank {r} could not restore it ({report})")
    return None


def wait_for(job: Any) -> None:
    """Wait for a background :func:`torchkeep.distributed.save`; re-raise its error (every rank gets one)."""
    job.result()  # also clears the engine's record of it, so its error is not raised twice

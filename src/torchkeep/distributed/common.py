"""What the distributed save, restore and gather share: splitting a tree, per-rank values and background saves.

The background save is one per process (:func:`wait` reports it); its gloo group for the
finishing collectives is kept per default process group.
"""

from __future__ import annotations

import copy
import os
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
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from torchkeep.dcp import first_failure
from torchkeep.distributed import comm
from torchkeep.errors import DistributedSaveError, UnsupportedObjectError
from torchkeep.rng import RNGState
from torchkeep.tree import format_path, is_stateful

__all__ = [
    "AsyncSave",
    "PathLike",
    "Path_",
    "RankStateWarning",
    "Split",
    "as_save_error",
    "async_group",
    "in_background",
    "owner_of",
    "quiet",
    "snapshot",
    "tensor_key",
    "wait",
]

PathLike = str | os.PathLike[str]
Path_ = tuple[Any, ...]


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


def owner_of(opt: torch.optim.Optimizer, modules: list[torch.nn.Module], where: str) -> torch.nn.Module:
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


def tensor_key(path: Path_) -> str:
    for p in path:
        if not isinstance(p, (str, int)) or isinstance(p, bool):
            raise UnsupportedObjectError(
                format_path(path), p, "tensors in a distributed checkpoint live under str or int keys only."
            )
    return "/".join(map(str, path))


class Split:
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
            owner = owner_of(obj, self.modules, format_path(path))
            return self.node(get_optimizer_state_dict(owner, obj), path)
        if isinstance(obj, torch.Tensor):
            key = tensor_key(path)
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


def async_group(group: Any) -> Any:
    """A gloo group for the background thread's collectives, so they never interleave with training's."""
    if group is not None or not comm.is_distributed():
        return group
    default = dist.distributed_c10d._get_default_group()
    bg = _async_groups.get(id(default))
    if bg is None:
        bg = _async_groups[id(default)] = dist.new_group(backend="gloo")
    return bg


def as_save_error(final: Any, e: BaseException) -> BaseException:
    """DCP's ``CheckpointException`` as a :class:`DistributedSaveError` naming the first failed rank."""
    failed = None if isinstance(e, KeyboardInterrupt) else first_failure(e)
    if failed is None:
        return e
    rank, cause = failed
    return DistributedSaveError(final, rank, f"{type(cause).__name__}: {cause}")


def snapshot(value: Any) -> Any:
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
        return {k: snapshot(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(snapshot(v) for v in value)
    return copy.deepcopy(value)


@contextmanager
def quiet() -> Iterator[None]:
    """Without a process group DCP warns that it assumes a single process: that is the intent here."""
    if comm.is_distributed():
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to", category=UserWarning)
        yield


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

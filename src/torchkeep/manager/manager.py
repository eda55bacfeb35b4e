"""CheckpointManager: a run directory of checkpoints with naming, retention, best/latest and crash safety.

Write order for one save (each step durable before the next)::

    free-space check -> checkpoint (temp file, fsync, rename, fsync dir) -> read it back (header,
    checksums: :mod:`.readback`) -> manifest.json (same way) -> delete what retention no longer keeps

so a crash at any point leaves the previous checkpoints and a manifest that names only
complete files; a checkpoint committed just before a crash is adopted on the next open.
With ``incremental=True`` a checkpoint is a shard-set directory whose unchanged shards are
hard links to the previous checkpoint's (:mod:`torchkeep.manager.incremental`).

On object storage (an fsspec URL, :mod:`torchkeep.storage.remote`) there is no rename: the
manifest write is the commit, and checkpoint objects no manifest names are never shown.
Storage (files, locking, listing) goes through a :class:`~torchkeep.storage.runs.RunStore`.

In a multi-process run every rank calls the same methods; checkpoints are then sharded
:mod:`torchkeep.distributed` directories and rank 0 alone keeps the index
(:mod:`torchkeep.manager.distributed`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
import warnings
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from torchkeep import api
from torchkeep.errors import (
    ArgumentTypeError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidArgumentError,
    ManagerClosedError,
    UnsupportedObjectError,
)
from torchkeep.manager import distributed as coll
from torchkeep.manager import incremental, manifest, naming, retention, writing
from torchkeep.manager.manifest import CheckpointInfo
from torchkeep.snapshot import AsyncWriter
from torchkeep.storage import open_run
from torchkeep.storage.runs import RunStore
from torchkeep.tree import Flat, flatten

__all__ = ["CheckpointManager", "CheckpointSkippedWarning"]


class CheckpointSkippedWarning(UserWarning):
    """``restore`` skipped a checkpoint that did not verify and fell back to an older one."""


def _metric(name: str, v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise UnsupportedObjectError(f"metrics/{name}", v, "a metric must be a number (a one-element tensor).")
        v = v.item()
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if hasattr(v, "__float__"):
        return float(v)
    raise UnsupportedObjectError(f"metrics/{name}", v, "a metric must be a number, a string, a bool or None.")


class CheckpointManager:
    """Saves a training state into a run directory, keeps what the retention options say, restores the newest.

    Args:
        directory: the run directory (created if missing), or an fsspec URL (``s3://bucket/run``,
            ``memory://run``; needs ``pip install 'torchkeep[remote]'``). One manager at a time per run.
        keep_last: keep the N most recent checkpoints.
        keep_best: keep the K best by ``monitor``.
        monitor: the metric name ``best()`` and ``keep_best`` use.
        mode: ``"max"`` or ``"min"``: which direction of ``monitor`` is better. NaN is never best.
        keep_every: keep checkpoints whose step is a multiple of N.
        keep_within: keep checkpoints younger than this (seconds or a ``timedelta``).
        filename: template for file names, with ``{name}``/``{name:fmt}`` fields from ``step``,
            ``metrics`` and ``context`` (see :mod:`torchkeep.manager.naming`).
        durable: fsync checkpoints and the manifest (default).
        async_save: ``save()`` returns once the state is copied into host memory (buffers reused
            across saves, pinned under CUDA) and writes it in a background thread; at most one
            save is in flight, and an error in the background is raised, as itself, by the
            next ``save()``, ``wait()``, ``restore()`` or ``close()``. The returned info then has
            no size or digest yet (``latest()`` has them once committed).
        storage_options: for URLs, passed to fsspec (s3: ``key``, ``secret``,
            ``client_kwargs={"endpoint_url": ...}``, ...).
        distributed: save sharded :mod:`torchkeep.distributed` checkpoint directories
            (``NAME.dcp``), every rank calling every method (see "Distributed runs" in the docs).
            ``None`` (default): when ``torch.distributed`` is initialised with more than one rank.
            Checkpoints of either kind are listed and restored whatever this is.
        incremental: save each checkpoint as an ordinary sharded checkpoint directory (``NAME.shards``)
            whose shards that did not change since the previous save are hard links, not writes
            (:mod:`torchkeep.manager.incremental`; a copy where links fail). Local runs only: on
            object storage every save is a full file (a warning says so).

    A checkpoint is kept when any ``keep_*`` rule keeps it; the newest is always kept, and with
    no rule at all nothing is deleted. Only files listed in the manifest are ever deleted.

    Raises:
        CheckpointLockedError: another manager (in any process) has the directory open.
        InvalidArgumentError: a bad ``mode``, ``keep_*`` value, or ``keep_best`` without ``monitor``
            (a ``ValueError``); raised before the directory is touched.
        ManagerClosedError: ``save``/``prune`` after ``close()`` (a ``RuntimeError``).

    Example:
        >>> import tempfile, torch, torchkeep as tk
        >>> run = tempfile.mkdtemp()
        >>> model = torch.nn.Linear(2, 2)
        >>> with tk.CheckpointManager(run, keep_last=2, keep_best=1, monitor="acc") as mgr:
        ...     for epoch, acc in enumerate([0.5, 0.9, 0.6, 0.7]):
        ...         _ = mgr.save({"model": model}, step=epoch, metrics={"acc": acc})
        ...     [c.step for c in mgr.checkpoints()], mgr.best().step, mgr.latest().file
        ([1, 2, 3], 1, 'ckpt_000003.safetensors')
        >>> with tk.CheckpointManager(run) as mgr:
        ...     mgr.restore({"model": model}).step
        3
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        monitor: str | None = None,
        mode: str = "max",
        keep_every: int | None = None,
        keep_within: float | timedelta | None = None,
        filename: str = "ckpt_{step:06d}",
        durable: bool = True,
        async_save: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        distributed: bool | None = None,
        incremental: bool = False,
    ) -> None:
        if mode not in ("min", "max"):
            raise InvalidArgumentError(
                "mode", mode, "pass 'max' (the default: a higher monitor value is better) or 'min' (e.g. for a loss)"
            )
        if keep_best is not None and not monitor:
            raise InvalidArgumentError(
                "monitor",
                monitor,
                "keep_best needs monitor=, the metric to rank by, e.g. "
                "CheckpointManager(..., keep_best=2, monitor='val_acc')",
            )
        for name, v in (("keep_last", keep_last), ("keep_best", keep_best), ("keep_every", keep_every)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise InvalidArgumentError(
                    name, v, f"{name} must be a non-negative int or None, e.g. {name}=3; None turns the rule off"
                )
        if keep_within is not None:
            seconds = keep_within.total_seconds() if isinstance(keep_within, timedelta) else keep_within
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
                raise InvalidArgumentError(
                    "keep_within",
                    keep_within,
                    "pass a non-negative number of seconds or a datetime.timedelta, e.g. keep_within=timedelta(days=1)",
                )
        naming.parse(filename)  # fail now on a malformed template, not at the first save
        self._store: RunStore = open_run(directory, storage_options)
        self._open = False
        #: the run directory: a ``Path``, or the URL (``str``) of a run on object storage
        self.directory: Path | str = getattr(self._store, "directory", self._store.location)
        self.keep_last, self.keep_best, self.keep_every = keep_last, keep_best, keep_every
        self.keep_within = keep_within.total_seconds() if isinstance(keep_within, timedelta) else keep_within
        self.monitor, self.mode, self.filename, self.durable = monitor, mode, filename, durable
        self._pattern = naming.template_pattern(filename)
        self._mutex = threading.RLock()
        self._dist = coll.resolve(distributed, self._store)
        self._async = AsyncWriter() if async_save and not self._dist else None
        self._dist_async = async_save and self._dist
        self._incremental = incremental and self._incremental_ok(incremental)
        self._pending: tuple[Any, CheckpointInfo] | None = None  # distributed async save, indexed on next call
        self._entries: list[CheckpointInfo] = []
        if self._dist:
            self._open = True  # rank 0 alone locks, cleans and reads the run; every rank gets its list
            try:
                self._set_entries(coll.on_rank0(self._open_run, path=self.directory, action="open"))
            except BaseException:
                self.close()
                raise
            return
        self._store.lock()
        self._open = True
        try:
            self._store.clean(lambda name: name == manifest.MANIFEST or bool(self._pattern.fullmatch(name)))
            self._load()
        except BaseException:
            self.close()
            raise

    def _open_run(self) -> list[dict[str, Any]]:
        self._store.lock()
        self._store.clean(lambda name: name == manifest.MANIFEST or bool(self._pattern.fullmatch(name)))
        self._load()
        return [e.to_json() for e in self._entries]

    def _set_entries(self, data: list[dict[str, Any]]) -> None:
        with self._mutex:
            self._entries = [CheckpointInfo.from_json(self._store.path_of, d) for d in data]

    # -- opening ---------------------------------------------------------------------------------
    def _load(self) -> None:
        store = self._store
        entries, reason = manifest.parse(store.read(manifest.MANIFEST), store.path_of)
        names = set(store.names())
        ours = sorted(n for n in names if n.endswith(naming.SUFFIXES))
        changed = entries is None
        if entries is None:
            if reason != "missing":
                warnings.warn(
                    f"{store.path_of(manifest.MANIFEST)}: {reason}; rebuilding it from the checkpoint files",
                    stacklevel=3,
                )
            entries = manifest.rebuild(self._store, ours)
        else:
            # entries whose file is gone (deleted by hand) drop out
            present = [e for e in entries if e.file in names]
            known = {e.file for e in entries}
            extra = manifest.rebuild(self._store, [n for n in ours if n not in known])
            changed = len(present) != len(entries)
            if store.adopts and extra:
                # a file renamed into place but not indexed (a crash in between) is whole: adopt it
                # where its save time puts it (the sort is stable)
                entries, changed = manifest.ordered(present + extra), True
            else:
                # an object store has no rename: an object no manifest names is a killed save's
                # leftover. It carries our record, so it is ours to remove; nothing else is touched.
                entries = present
                for e in extra:
                    store.delete(e.file)
        self._entries = entries
        if changed:
            self._write_manifest()
        else:
            self._point_last()  # a save killed between its manifest and its link

    # -- queries ---------------------------------------------------------------------------------
    def checkpoints(self) -> list[CheckpointInfo]:
        """Every checkpoint in the run, oldest first."""
        with self._mutex:
            return list(self._entries)

    def latest(self) -> CheckpointInfo | None:
        """The most recently saved checkpoint, or ``None``."""
        with self._mutex:
            return self._entries[-1] if self._entries else None

    def best(self) -> CheckpointInfo | None:
        """The best checkpoint by ``monitor`` (``None`` without a monitor or a usable value)."""
        with self._mutex:
            if not self.monitor:
                return None
            i = retention.best_index(self._entries, self.monitor, self.mode)
            return None if i is None else self._entries[i]

    def _policy(self) -> Any:
        return retention.policy_of(
            keep_last=self.keep_last,
            keep_best=self.keep_best,
            monitor=self.monitor,
            mode=self.mode,
            keep_every=self.keep_every,
            keep_within=self.keep_within,
        )

    # -- saving ----------------------------------------------------------------------------------
    def save(
        self,
        state: Any,
        *,
        step: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> CheckpointInfo:
        """Save ``state`` as a new checkpoint, update the manifest, then apply retention.

        Args:
            state: the tree to save, as for :func:`torchkeep.save`.
            step: the step or epoch (default: the latest step + 1, or 0).
            metrics: numbers to record (``monitor`` is read from here); usable in ``filename``.
            context: extra values for the ``filename`` template only (e.g. ``{"model": "vgg16"}``).

        Returns:
            The new checkpoint's :class:`CheckpointInfo`.

        Raises:
            InsufficientSpaceError: it does not fit (checked before writing), or the write hit
                ENOSPC/EFBIG; nothing was written and earlier checkpoints are intact.
            MissingFilenameFieldError: the template names a field none of step/metrics/context has.
            CorruptCheckpointError: the file just written does not read back (it is removed, nothing
                older is deleted).
        """
        self._check_open()
        if self._dist:
            return self._save_distributed(state, step, metrics, context)
        if self._async is not None:
            self._async.wait()  # one save in flight; a background error is raised here, as itself
        with self._mutex:
            info = self._decide(step, metrics, context, naming.SHARDS_SUFFIX if self._incremental else naming.SUFFIX)
            flat = flatten(state) if self._async is None else None
            hint = self._hint(state, flat)
            if flat is not None:
                return self._commit(flat, info, hint)
        # async: returns once the state is copied to host memory; _commit runs in the background
        # (space check, write, manifest, then retention: nothing is deleted before it is committed)
        self._async.submit(state, lambda flat: self._commit(flat, info, hint))
        return info

    def _incremental_ok(self, incremental: bool) -> bool:
        if self._dist:
            raise InvalidArgumentError(
                "incremental", incremental, "a distributed run saves .dcp directories; pass incremental=False"
            )
        if not isinstance(self.directory, Path):
            warnings.warn(f"{self.directory}: incremental=True needs a local run; saving full files", stacklevel=3)
            return False
        return True

    def _hint(self, state: Any, flat: Flat | None) -> set[str] | None:
        """The first incremental save's frozen parameters (later saves compare with the previous one)."""
        if not self._incremental or any(e.file.endswith(naming.SHARDS_SUFFIX) for e in self._entries):
            return None
        return incremental.frozen_names(state, flat)

    def _decide(
        self, step: int | None, metrics: Mapping[str, Any] | None, context: Mapping[str, Any] | None, suffix: str
    ) -> CheckpointInfo:
        """The new checkpoint's record: its step, metrics and a name no file of the run has."""
        if step is None:
            last = self.latest()
            step = 0 if last is None or last.step is None else last.step + 1
        if isinstance(step, bool) or not isinstance(step, int):
            raise ArgumentTypeError("step", step, "an int (the training step), or None to count on from the latest")
        metrics = {str(k): _metric(str(k), v) for k, v in (metrics or {}).items()}
        values = {"step": step, **metrics, **{str(k): v for k, v in (context or {}).items()}}
        stem = naming.fill(self.filename, values)
        with self._mutex:
            taken = set(self._store.names()) | {e.file for e in self._entries}
            name = naming.unique_name(stem, taken, suffix)
            return CheckpointInfo(name, self._store.path_of(name), step, metrics, 0, time.time(), "")

    def _save_distributed(
        self, state: Any, step: int | None, metrics: Mapping[str, Any] | None, context: Mapping[str, Any] | None
    ) -> CheckpointInfo:
        """Every rank: rank 0 names it, all write their shards, rank 0 indexes it and shares the list."""
        import torchkeep.distributed as tkd

        self.wait()  # one save in flight; its error is raised here, on every rank
        chosen = coll.on_rank0(
            lambda: self._decide(step, metrics, context, naming.DIR_SUFFIX).to_json(),
            path=self.directory,
            action="save",
        )
        info = CheckpointInfo.from_json(self._store.path_of, chosen)
        job = tkd.save(
            state,
            info.path,
            metadata={manifest.META_KEY: manifest.record_of(info)},
            durable=self.durable,
            async_save=self._dist_async,
        )
        if self._dist_async:
            self._pending = (job, info)  # indexed by the next save/wait/restore/prune/close
            return info
        return self._index(info)

    def _index(self, info: CheckpointInfo) -> CheckpointInfo:
        """Every rank: rank 0 adds the committed directory ``info`` to the manifest, applies retention,
        and every rank takes rank 0's list."""

        def add() -> list[dict[str, Any]]:
            got = self._store.header(info.file)
            if got is None:
                raise CorruptCheckpointError(info.path, "committed, but its tree file or manifest cannot be read")
            size, head = got
            digest = hashlib.sha256(head).hexdigest()
            with self._mutex:
                self._entries = [
                    *self._entries,
                    CheckpointInfo(info.file, info.path, info.step, info.metrics, size, info.created, digest),
                ]
                self._apply_retention(always_write=True)
                return [e.to_json() for e in self._entries]

        self._set_entries(coll.on_rank0(add, path=self.directory, action="save"))
        with self._mutex:
            return next((e for e in reversed(self._entries) if e.file == info.file), info)

    def wait(self) -> None:
        """Block until an asynchronous save in flight is committed; re-raise its error, if any.

        In a distributed run, call it on every rank: it also indexes that save.
        """
        if self._dist:
            pending, self._pending = self._pending, None
            if pending is not None:
                coll.wait_for(pending[0])  # every rank raises when the save failed on any
                self._index(pending[1])
        elif self._async is not None:
            self._async.wait()

    def _commit(self, flat: Flat, info: CheckpointInfo, hint: set[str] | None = None) -> CheckpointInfo:
        """Write ``flat`` as ``info``'s file, index it, then delete what retention drops. The one write path."""
        with self._mutex:
            self._check_open()
            if info.file.endswith(naming.SHARDS_SUFFIX):  # space check, write, read back (:mod:`.writing`)
                size, head = writing.write_shards(
                    self._store, flat, info, self._entries, durable=self.durable, frozen=hint
                )
            else:
                size, head = writing.write_file(self._store, flat, info, durable=self.durable)
            digest = hashlib.sha256(head).hexdigest()
            info = CheckpointInfo(info.file, info.path, info.step, info.metrics, size, info.created, digest)
            prev = self._entries
            self._entries = [*prev, info]
            try:
                self._apply_retention(always_write=True)
            except BaseException:
                if not self._store.adopts:  # on an object store the manifest write is the commit: none happened
                    self._entries = prev
                    with contextlib.suppress(Exception):
                        self._store.delete(info.file)
                raise
            return info

    def _apply_retention(self, *, always_write: bool = False) -> list[CheckpointInfo]:
        """Drop what the policy does not keep: manifest first, then the files. Returns the dropped."""
        with self._mutex:
            entries = list(self._entries)
            kept = self._policy().keep(entries)
            drop = [e for i, e in enumerate(entries) if i not in kept]
            if not drop and not always_write:
                return []
            self._entries = [e for i, e in enumerate(entries) if i in kept]
            try:
                self._write_manifest()
            except BaseException:
                # the checkpoints are committed and carry their records: the next open adopts them
                self._entries = entries
                raise
            for e in drop:  # only after the manifest that no longer lists these
                self._store.delete(e.file)
            return drop

    def prune(self, *, dry_run: bool = False) -> list[CheckpointInfo]:
        """Apply this manager's ``keep_*`` options to the checkpoints already in the directory.

        Args:
            dry_run: only report what would be deleted.

        Returns:
            The checkpoints deleted (or that would be, with ``dry_run``). The newest is always
            kept; files the manager did not write are never touched.
        """
        self._check_open()
        self.wait()
        if dry_run:
            with self._mutex:
                entries = list(self._entries)
            kept = self._policy().keep(entries)
            return [e for i, e in enumerate(entries) if i not in kept]
        if self._dist:

            def prune0() -> list[list[dict[str, Any]]]:
                dropped = self._apply_retention()
                return [[e.to_json() for e in dropped], [e.to_json() for e in self._entries]]

            dropped, entries = coll.on_rank0(prune0, path=self.directory, action="prune")
            self._set_entries(entries)
            return [CheckpointInfo.from_json(self._store.path_of, d) for d in dropped]
        return self._apply_retention()

    def _write_manifest(self) -> None:
        latest = self._entries[-1].file if self._entries else None
        best = None
        if self.monitor:
            i = retention.best_index(self._entries, self.monitor, self.mode)
            best = None if i is None else self._entries[i].file
        self._store.write(manifest.MANIFEST, manifest.encode(self._entries, latest, best), durable=self.durable)
        self._point_last()

    def _point_last(self) -> None:
        point_last = getattr(self._store, "point_last", None)
        if point_last is not None:  # a local run: last.safetensors names the newest committed checkpoint
            point_last(self._entries[-1].file if self._entries else None)

    # -- restoring -------------------------------------------------------------------------------
    def restore(self, state: Any, *, step: int | str | None = None, strict: bool = False) -> CheckpointInfo | None:
        """Restore ``state`` in place from a checkpoint of the run, verifying it first.

        Args:
            state: the targets, as for :func:`torchkeep.restore` (modules, optimizers, ...).
            step: ``None``/``"latest"``: the newest checkpoint that verifies; ``"best"``: the best by
                ``monitor`` that verifies; an int: the newest checkpoint saved at that step.
            strict: raise on a corrupt or truncated checkpoint instead of warning and falling back.

        Returns:
            The restored checkpoint's info, or ``None`` when the run has no checkpoint yet.

        Raises:
            CorruptCheckpointError: ``strict=True`` and the chosen checkpoint does not verify, or
                no checkpoint of the run verifies.
            CheckpointNotFoundError: no checkpoint at the requested int step.
        """
        self.wait()  # a save in flight is committed first
        with self._mutex:
            entries = list(self._entries)
        if step is None or step == "latest":
            candidates = entries[::-1]
        elif step == "best":
            if not self.monitor:
                raise InvalidArgumentError(
                    "step",
                    step,
                    'step="best" needs a monitored metric: create the manager with '
                    'CheckpointManager(..., monitor="metric name"), or pass step="latest" or an int',
                )
            candidates = [entries[i] for i in retention.ranked(entries, self.monitor, self.mode)]
        elif isinstance(step, int) and not isinstance(step, bool):
            candidates = [e for e in entries[::-1] if e.step == step][:1]
            if not candidates:
                raise CheckpointNotFoundError(
                    f"{self.directory} (step {step}; have {sorted({e.step for e in entries if e.step is not None})[-10:]})"
                )
        else:
            raise InvalidArgumentError("step", step, 'pass None or "latest" (the default), "best" or an int step')
        if not candidates:
            return None
        failures: list[str] = []
        for k, info in enumerate(candidates):
            error: BaseException | None = None
            try:
                self._restore_one(info, state)
            except coll.FALLBACK as e:
                if not info.file.endswith(naming.DIR_SUFFIXES) and not isinstance(
                    e, (CorruptCheckpointError, CheckpointNotFoundError)
                ):
                    raise
                error = e
            if self._dist:
                error = coll.agree(error, info.path)  # every rank falls back (or raises) together
            if error is None:
                return info
            if strict or isinstance(step, int):
                raise error
            failures.append(info.file)
            nxt = candidates[k + 1].file if k + 1 < len(candidates) else None
            then = f"falling back to {nxt}" if nxt else "no other checkpoint to fall back to"
            warnings.warn(
                f"{info.path}: skipped, it does not verify ({error}); {then}", CheckpointSkippedWarning, stacklevel=2
            )
        raise CorruptCheckpointError(
            self.directory,
            f"none of its checkpoints verifies ({', '.join(failures[:10])}); nothing was restored whole (one found "
            "damaged while read straight into the targets leaves part of it there: do not use them)",
        )

    def _restore_one(self, info: CheckpointInfo, state: Any) -> None:
        if not coll.is_dir_checkpoint(info.file):
            with self._store.local(info.file) as local:
                api.restore(local, state)
            return
        if not self._dist and coll.multi_rank():
            raise InvalidArgumentError(
                "distributed",
                False,
                f"{info.path} is a distributed checkpoint, restored by every rank together; create the "
                "CheckpointManager on every rank with distributed=None (or True) and call restore on each",
            )
        import torchkeep.distributed as tkd

        with self._store.local(info.file) as local:
            tkd.restore(local, state)

    # -- lifecycle -------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if not self._open:
            raise ManagerClosedError(self.directory)

    def close(self) -> None:
        """Wait for an asynchronous save in flight (re-raising its error), then release the lock. Idempotent."""
        try:
            if self._open:
                self.wait()
        finally:
            if self._open:
                self._open = False
                self._store.unlock()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, et: object, *exc: object) -> None:
        if et is None:
            self.close()
        else:  # an exception is already on its way: finish the write in flight, do not mask it
            # (distributed: the other ranks may not be here, so no collective; the next open adopts it)
            self._pending = None
            with contextlib.suppress(Exception):
                self.close()

    def __del__(self) -> None:
        if getattr(self, "_open", False):
            self._pending = None  # never a collective from the garbage collector
            with contextlib.suppress(Exception):
                self.close()

    def __repr__(self) -> str:
        return f"CheckpointManager({str(self.directory)!r}, checkpoints={len(self._entries)})"

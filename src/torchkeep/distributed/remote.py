"""Distributed checkpoints on object storage (``s3://bucket/run/step-10``, ``gs://...``, ``memory://...``) via fsspec.

Object stores have no rename, so the local protocol (write a hidden directory, rename it into
place) becomes: **every save writes its objects under a sub-prefix of its own,
``PREFIX/.data-<random>/``, and the commit is one exclusive create of ``PREFIX/torchkeep-manifest.json``
by rank 0, after every rank has reported, naming that sub-prefix** (``"data"``, covered by the
manifest's digest). The exclusive create is fsspec's ``pipe_file(..., mode="create")``: on S3 a
conditional PUT (``If-None-Match: *``) that fails when the object exists. So of two saves to one
prefix at once, exactly one commits; the other finds the manifest taken, deletes its own
sub-prefix and raises :class:`~torchkeep.errors.CheckpointExistsError` on every rank, and no
object the committed manifest names is ever written. A prefix without a valid manifest was
never committed: ``restore`` refuses it. ``restore`` reads only the sub-prefix the manifest
names; sub-prefixes it does not name are leftovers of killed saves, never read and never
deleted by a save (another save could still be writing there).

A file system whose ``pipe_file`` has no ``mode`` (older fsspec releases) gets check-then-write:
the manifest is written only if none exists, which does not guard against a save committing in
between. Manifests without ``"data"`` (data objects directly under the prefix) are read as well.

Checksums are computed while the bytes are uploaded (each rank hashes the stream it writes,
no second read); DCP's ``.metadata`` (small) is read back by rank 0. ``restore`` lists the
data sub-prefix once, has every object hashed by one rank with streaming reads (split by size), then
DCP reads the shards straight from the store; ``.metadata``, the tree file and per-rank
files are downloaded once and checked again against the manifest on the rank that uses them.

Example:
    >>> import torch, torchkeep.distributed as tkd
    >>> url = tkd.save({"w": torch.arange(3.0), "step": 7}, "memory://doc-dist/step-7")
    >>> tkd.restore(url, {})["step"], tkd.is_torchkeep_dcp(url)
    (7, True)
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import re
import secrets
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

from torchkeep.dcp import check_ranges, metadata_from_bytes
from torchkeep.distributed import comm, common
from torchkeep.distributed.tap import TappedWriter
from torchkeep.errors import (
    CheckpointExistsError,
    CorruptCheckpointError,
    DistributedSaveError,
    FileChecksumError,
)
from torchkeep.format.header import digest
from torchkeep.storage import dcp_manifest
from torchkeep.storage.dcp_manifest import (
    MANIFEST,
    TREE_FILE,
    hash_file,
    hash_stream,
    manifest_bytes,
    parse_manifest,
    rank_file,
)
from torchkeep.storage.paths import is_url, local_path
from torchkeep.writer import save_tree

__all__ = ["DATA_PREFIX", "RemoteSource", "Store", "is_torchkeep_dcp", "save"]

_CHUNK = 16 << 20
#: the name of a save's own sub-prefix is this plus 16 random hex digits
DATA_PREFIX = ".data-"
_CHILD = re.compile(r"[A-Za-z0-9_.-]+")
_RACE = "another save committed here while this one ran"


def is_torchkeep_dcp(path: Any, *, storage_options: Mapping[str, Any] | None = None) -> bool:
    """True for a directory (or an fsspec URL prefix, ``s3://...``) holding a torchkeep manifest (valid or not).

    Example:
        >>> is_torchkeep_dcp("memory://nothing-here")
        False
    """
    if is_url(path):
        return Store(str(path), storage_options or {}).exists(MANIFEST)
    return dcp_manifest.is_torchkeep_dcp(local_path(path))


class Store:
    """A checkpoint prefix on an fsspec file system: ``url`` is ``scheme://bucket/prefix``."""

    def __init__(self, url: str, storage_options: Mapping[str, Any]) -> None:
        from torchkeep.storage.remote import filesystem  # the install hints for missing fsspec packages

        self.url = url.rstrip("/")
        self.options = dict(storage_options)
        self.fs, root = filesystem(self.url, self.options)
        self.root = root.rstrip("/")

    def child(self, name: str) -> Store:
        """The sub-prefix ``name`` on the same file system."""
        sub = copy.copy(self)
        sub.url, sub.root = self.url_of(name), self.p(name)
        return sub

    def p(self, name: str) -> str:
        return f"{self.root}/{name}"

    def url_of(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _refresh(self) -> None:
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(self.root)  # other processes write here

    def exists(self, name: str) -> bool:
        self._refresh()
        return bool(self.fs.exists(self.p(name)))

    def listing(self) -> list[dict[str, Any]]:
        """Everything directly under the prefix (objects and sub-prefixes), freshly listed."""
        self._refresh()
        try:
            return list(self.fs.ls(self.root, detail=True))
        except FileNotFoundError:
            return []

    def sizes(self, listing: list[dict[str, Any]] | None = None) -> dict[str, int]:
        """``{object name: bytes}`` of the objects directly under the prefix (one listing)."""
        return {
            str(item["name"]).rstrip("/").rsplit("/", 1)[-1]: int(item.get("size") or 0)
            for item in (self.listing() if listing is None else listing)
            if item.get("type", "file") == "file"
        }

    def read(self, name: str) -> bytes | None:
        try:
            return bytes(self.fs.cat_file(self.p(name)))
        except FileNotFoundError:
            return None

    def hash(self, name: str) -> dict[str, Any]:
        """Size and digest of an object, by a streaming read."""
        with self.fs.open(self.p(name), "rb", block_size=_CHUNK) as f:
            return hash_stream(f)

    def upload(self, local: Path, name: str) -> None:
        self.fs.put_file(str(local), self.p(name))

    def download(self, name: str, dest: Path) -> None:
        self.fs.get_file(self.p(name), str(dest))

    def remove_all(self) -> None:
        """Delete everything under the prefix (only ever called for a save's own data sub-prefix)."""
        with contextlib.suppress(Exception):
            self.fs.rm(self.root, recursive=True)
        self._refresh()


def data_name(manifest: Mapping[str, Any], where: Any) -> str | None:
    """The data sub-prefix a manifest names (``None``: the objects lie directly under the prefix).

    Raises:
        CorruptCheckpointError: ``"data"`` is not a plain child name (``..``, ``/`` and the like).

    Example:
        >>> data_name({"data": ".data-0123"}, "x"), data_name({}, "x")
        ('.data-0123', None)
    """
    name = manifest.get("data")
    if name is None:
        return None
    if not isinstance(name, str) or name in (".", "..") or not _CHILD.fullmatch(name):
        raise CorruptCheckpointError(where, f"the manifest names a data location that is not a child: {name!r}")
    return name


# -- save ---------------------------------------------------------------------------------------


class _Writer(TappedWriter, FsspecWriter):
    """DCP's fsspec writer that hashes what it uploads and remembers which data files this rank wrote."""

    def __init__(self, store: Store, thread_count: int) -> None:
        # sync_files=False: an object is durable once its upload completes; fsync would sync the local disk
        super().__init__(store.url, sync_files=False, thread_count=thread_count, **store.options)
        self.tap()


def _upload(store: Store, name: str, write: Callable[[Path], Any]) -> dict[str, Any]:
    """Write a small torchkeep file locally, hash it, upload it; returns its manifest entry."""
    with tempfile.TemporaryDirectory(prefix="torchkeep-") as tmp:
        local = Path(tmp) / name
        write(local)
        entry = hash_file(local)
        store.upload(local, name)
    return entry


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _committed(store: Store) -> bool:
    """Whether the prefix holds a manifest now (the early refusal; the commit itself is exclusive)."""
    return MANIFEST in store.sizes()


def exclusive_create(fs: Any) -> bool:
    """Whether ``fs.pipe_file`` takes ``mode="create"`` (fail if the object exists; a conditional PUT on S3)."""
    try:
        return "mode" in inspect.signature(fs.pipe_file).parameters
    except (TypeError, ValueError):
        return False


class _Uncertain(DistributedSaveError):
    """The manifest PUT failed and no manifest is there: the request may still land, so the data stays."""


def _create_manifest(store: Store, body: bytes) -> None:
    """Write the manifest only if there is none; raise :class:`CheckpointExistsError` when another save has one."""
    if not exclusive_create(store.fs):
        if _committed(store):
            raise CheckpointExistsError(store.url, _RACE)
        store.fs.pipe_file(store.p(MANIFEST), body)  # unguarded between the check and the write
        return
    try:
        store.fs.pipe_file(store.p(MANIFEST), body, mode="create")
        return
    except Exception as e:
        # a retried request finds its own first attempt; a conflict or lost reply needs a look
        store._refresh()
        try:
            now = store.read(MANIFEST)
        except Exception:
            now = None
        if now == body:
            return
        if now is not None:
            raise CheckpointExistsError(store.url, _RACE) from e
        raise _Uncertain(store.url, 0, f"the commit (the manifest's PUT) failed: {_error(e)}") from e


def _commit(
    store: Store,
    data: Store,
    writer: _Writer,
    own: dict[str, Any],
    before: Callable[[], dict[str, Any]],
    group: Any,
    *,
    world: int,
    extra: dict[str, Any],
) -> str:
    """Gather every rank's digests on rank 0, which creates the manifest last; every rank learns the outcome."""
    report: dict[str, Any] = {"files": {}, "error": None}
    try:
        files = {**own, **before()}
        for name in sorted(writer.written):
            if name not in writer.digests:
                raise OSError(f"{data.url_of(name)}: written, but its digest was not recorded")
            files[name] = writer.digests[name]
        report["files"] = files
    except Exception as e:  # reported to rank 0, which then commits nothing
        report["error"] = _error(e)
    reports = comm.all_gather_json(report, group)
    failure: BaseException | None = None
    status: dict[str, Any] | None = None
    if comm.rank(group) == 0:
        try:
            bad = [(r, x["error"]) for r, x in enumerate(reports) if x["error"]]
            if bad:
                raise DistributedSaveError(store.url, bad[0][0], bad[0][1])
            files = {name: entry for x in reports for name, entry in x["files"].items()}
            raw = data.read(".metadata")
            if raw is None:
                raise DistributedSaveError(store.url, 0, "DCP's .metadata object is missing after the save")
            files[".metadata"] = {"bytes": len(raw), "xxh3": digest(raw)}
            _create_manifest(store, manifest_bytes(files, world_size=world, extra=extra))
            status = {"ok": True}
        except Exception as e:  # every rank must hear of it, or they would wait forever
            failure = e
            status = {"ok": False, "error": _error(e), "exists": isinstance(e, CheckpointExistsError)}
            if not isinstance(e, _Uncertain):
                data.remove_all()  # this save's own objects: no manifest names them
    outcome = comm.all_gather_json(status, group)[0]
    if failure is not None:
        raise failure
    if not outcome["ok"]:
        if outcome["exists"]:
            raise CheckpointExistsError(store.url, _RACE)
        raise DistributedSaveError(store.url, 0, outcome["error"])
    return store.url


def save(
    state: Any,
    url: str,
    *,
    storage_options: Mapping[str, Any],
    metadata: Mapping[str, Any] | None,
    async_save: bool,
    per_rank: tuple[str, ...],
    process_group: Any,
    thread_count: int,
) -> Any:
    """:func:`torchkeep.distributed.save` to an fsspec URL (see the module docstring)."""
    store = Store(url, storage_options)
    split = common.Split(tuple(per_rank))
    tree = split.run(state)
    group = process_group
    me, world = comm.rank(group), comm.world_size(group)
    rank_values = [common.snapshot(v) for v in split.rank_values]
    start: dict[str, Any] = {}
    failure: Exception | None = None
    if me == 0:
        data = store.child(f"{DATA_PREFIX}{secrets.token_hex(8)}")
        try:
            if _committed(store):
                raise CheckpointExistsError(store.url)
            tree_entry = _upload(data, TREE_FILE, lambda p: save_tree(tree, p, metadata=metadata, durable=False))
            start = {"data": data.root.rsplit("/", 1)[-1], "tree": tree_entry}
        except Exception as e:  # tell the other ranks before they start writing, then raise here
            failure = e
            start = {"error": _error(e), "exists": isinstance(e, CheckpointExistsError)}
            if not isinstance(e, CheckpointExistsError):
                data.remove_all()  # a partly uploaded tree file
    start = comm.all_gather_json(start, group)[0]
    if failure is not None:
        raise failure
    if "error" in start:
        if start["exists"]:
            raise CheckpointExistsError(store.url)
        raise DistributedSaveError(store.url, 0, start["error"])
    sub = str(start["data"])
    data = store.child(sub)
    own = {TREE_FILE: start["tree"]} if me == 0 else {}

    def write_rank_file() -> dict[str, Any]:
        if not split.rank_paths:
            return {}
        name = rank_file(me)
        return {name: _upload(data, name, lambda p: save_tree(rank_values, p, durable=False))}

    extra = {"tensors": split.placeholders, "per_rank": split.rank_paths, "modules": split.module_paths, "data": sub}
    writer = _Writer(data, thread_count)
    dist_kw: dict[str, Any] = {"no_dist": not comm.is_distributed()}

    def failed(e: BaseException) -> BaseException:
        if me == 0:
            data.remove_all()  # this save's own sub-prefix, never named by a manifest
        return common.as_save_error(store.url, e)

    def commit(grp: Any) -> str:
        return _commit(store, data, writer, own, write_rank_file, grp, world=world, extra=extra)

    if not async_save:
        try:
            with common.quiet():
                dcp.save(split.tensors, storage_writer=writer, process_group=group, **dist_kw)
        except BaseException as e:
            raise failed(e) from e
        return commit(group)
    bg = common.async_group(group)
    with common.quiet():
        response = dcp.async_save(split.tensors, storage_writer=writer, process_group=bg, **dist_kw)
    return common.in_background(response, failed, lambda: commit(bg), store.url)


# -- restore ------------------------------------------------------------------------------------


class RemoteSource:
    """What :func:`torchkeep.distributed.restore` reads from a checkpoint prefix on object storage.

    The manifest lies at the prefix; the objects it names lie in the sub-prefix it names
    (``"data"``), or directly under the prefix when it names none.
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any]) -> None:
        self.store = self.data = Store(url, storage_options)
        self.label = self.store.url
        self._top: dict[str, int] = {}
        self._sizes: dict[str, int] = {}
        self._sub: str | None = None

    def exists(self) -> bool:
        listing = self.store.listing()
        self._top = self._sizes = self.store.sizes(listing)
        return bool(listing)

    def is_ours(self) -> bool:
        return MANIFEST in self._top

    def is_dcp(self) -> bool:
        return ".metadata" in self._top

    def not_checkpoint(self) -> str:
        return (
            f"objects but no {MANIFEST} and no DCP .metadata: a save that was killed before its commit "
            "(the manifest is written last), or not a checkpoint"
        )

    def unverified(self) -> str:
        return (
            f"a DCP checkpoint without a torchkeep manifest ({MANIFEST}): a foreign DCP save, "
            "or one that was killed before its commit"
        )

    def manifest(self) -> dict[str, Any]:
        where = self.store.url_of(MANIFEST)
        raw = self.store.read(MANIFEST)
        if raw is None:
            raise CorruptCheckpointError(self.label, f"no {MANIFEST}: the save never committed")
        manifest = parse_manifest(raw, where)
        self._sub = data_name(manifest, where)
        if self._sub is not None:
            self.data = self.store.child(self._sub)
            self._sizes = self.data.sizes()
        return manifest

    def _name(self, name: str) -> str:
        """``name`` relative to the prefix (errors name the object where it is)."""
        return name if self._sub is None else f"{self._sub}/{name}"

    def check(self, manifest: Mapping[str, Any], names: list[str], verify: bool) -> list[dict[str, Any]]:
        problems: list[dict[str, Any]] = []
        for name in names:
            entry = manifest["files"][name]
            size = self._sizes.get(name)
            if size is None:
                problems.append({"file": self._name(name), "kind": "missing"})
            elif size != entry["bytes"]:
                problems.append({"file": self._name(name), "kind": "size", "expected": entry["bytes"], "actual": size})
            elif verify:
                try:
                    got = self.data.hash(name)
                except FileNotFoundError:
                    problems.append({"file": self._name(name), "kind": "missing"})
                    continue
                if got["xxh3"] != entry["xxh3"]:
                    problems.append(
                        {"file": self._name(name), "kind": "checksum", "expected": entry["xxh3"], "actual": got["xxh3"]}
                    )
        return problems

    def _checked(self, name: str, raw: bytes, manifest: Mapping[str, Any] | None, verify: bool) -> bytes:
        entry = (manifest or {}).get("files", {}).get(name)
        if verify and entry is not None and digest(raw) != entry["xxh3"]:
            raise FileChecksumError(self.data.url_of(name), entry["xxh3"], digest(raw))
        return raw

    def metadata(self, manifest: Mapping[str, Any] | None, verify: bool = True) -> Any:
        raw = self.data.read(".metadata")
        if raw is None:
            from torchkeep.errors import MissingShardError

            raise MissingShardError(self.store.url_of(MANIFEST), [self._name(".metadata")])
        md = metadata_from_bytes(self._checked(".metadata", raw, manifest, verify), self.data.url_of(".metadata"))
        check_ranges(self.data.url, md, self._sizes.get)
        return md

    @contextlib.contextmanager
    def local(self, name: str, manifest: Mapping[str, Any], verify: bool) -> Iterator[Path]:
        """``name`` downloaded to a temporary file (checked against the manifest again), removed afterwards."""
        with tempfile.TemporaryDirectory(prefix="torchkeep-") as tmp:
            dest = Path(tmp) / name
            self.data.download(name, dest)
            entry = manifest["files"].get(name)
            if verify and entry is not None:
                got = hash_file(dest)["xxh3"]
                if got != entry["xxh3"]:
                    raise FileChecksumError(self.data.url_of(name), entry["xxh3"], got)
            yield dest

    def reader(self, md: Any) -> Any:
        from torchkeep.dcp import safe_reader

        return safe_reader(self.data.url, md, self.store.options)

    def foreign(self) -> dict[str, Any]:
        """DCP's own reader (it unpickles ``.metadata``): only for ``trust_pickle=True``."""
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        return {"storage_reader": FsspecReader(self.label, **self.store.options)}

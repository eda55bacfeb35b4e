"""The stored tensors of one checkpoint file or of a shard set, read where the caller decides.

``restore`` needs the state tree (shapes, dtypes, views) before it knows where each tensor
goes: into a model's live parameter, or into memory of its own. :class:`StoredSet` opens the
file (or every shard), hands out unread placeholder tensors (:attr:`StoredSet.fresh`: allocated,
not yet touched, so costing no memory until read) to build and check the tree with, and
:meth:`StoredSet.read` then fills each named tensor, into its placeholder or into a given
destination, verifying checksums as the bytes arrive (:meth:`torchkeep.reader.Checkpoint.read`).

Example:
    >>> import torch, torchkeep as tk, tempfile, os
    >>> p = tk.save({"w": torch.ones(3)}, os.path.join(tempfile.mkdtemp(), "c.safetensors"))
    >>> with StoredSet(kinds.detect(p)) as s:
    ...     _ = s.read(["w"])
    ...     s.fresh["w"].tolist()
    [1.0, 1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from torchkeep import alloc, kinds
from torchkeep.dtypes import ST_TO_DTYPE
from torchkeep.format.meta import TREE_KEY
from torchkeep.reader import Checkpoint

__all__ = ["StoredSet", "can_open"]


def can_open(found: kinds.Detected) -> bool:
    """Whether :class:`StoredSet` reads this kind: a torchkeep or safetensors file, or a shard set of them."""
    if found.kind in (kinds.TORCHKEEP, kinds.SAFETENSORS):
        return True
    return found.kind == kinds.SHARDED and not any(kinds.is_legacy_kind(k) for k in found.shard_kinds.values())


class StoredSet:
    """Every stored tensor of a checkpoint file or shard set, by stored name.

    Attributes:
        label: the file (or shard index) named in messages.
        skeleton: the state tree's skeleton (``None`` for a flat file or a plain shard set).
        fresh: ``{stored name: unread placeholder tensor}`` of the right shape and dtype.
    """

    def __init__(self, found: kinds.Detected, *, verify: bool = True) -> None:
        assert found.file is not None  # every kind can_open() accepts has one
        self.label: Path = found.file
        self._stack = ExitStack()
        self._owner: dict[str, Checkpoint] = {}
        try:
            if found.kind == kinds.SHARDED:
                assert found.index is not None  # detect() sets it for SHARDED
                root = found.file.parent
                for fname in found.index.shards:
                    ck = self._stack.enter_context(Checkpoint(root / fname, verify=verify))
                    found.check_shard(fname, ck.keys())
                    self._owner.update((n, ck) for n in found.index.names_in(fname))
                self.skeleton: Any = found.index.metadata.get(TREE_KEY)
            else:
                ck = self._stack.enter_context(Checkpoint(found.file, verify=verify))
                self._owner = {n: ck for n in ck.keys()}
                self.skeleton = ck.skeleton if ck.has_tree else None
        except BaseException:
            self._stack.close()
            raise
        self.fresh: dict[str, torch.Tensor] = {
            n: alloc.empty(s.shape, ST_TO_DTYPE[s.dtype], huge=False)
            for n, s in ((n, ck.spec(n)) for n, ck in self._owner.items())
        }

    def read(self, keys: Iterable[str], into: Mapping[str, torch.Tensor] | None = None) -> None:
        """Read ``keys``: into ``into[key]`` where given, else into ``fresh[key]``; checksums verified.

        Placeholders about to be read are first advised onto huge pages where those are turned on
        (:func:`torchkeep.alloc.advise`; off by default).
        """
        into = into or {}
        by_file: dict[int, tuple[Checkpoint, dict[str, torch.Tensor]]] = {}
        for k in keys:
            ck = self._owner[k]
            dst = into.get(k)
            if dst is None:
                dst = self.fresh[k]
                alloc.advise(dst)
            by_file.setdefault(id(ck), (ck, {}))[1][k] = dst
        for ck, dests in by_file.values():
            ck.read(sorted(dests, key=lambda k: ck.spec(k).start), into=dests)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> StoredSet:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

"""Read a checkpoint through a memory map: verify in parallel, then copy into existing tensors.

:func:`torchkeep.restore` uses this so that restoring into a live model and optimizer
costs one pass to verify and one copy straight into their memory, with no temporary
allocation of the whole checkpoint. The mapped views are read-only and never handed
to the caller: :func:`owned` copies whatever the caller keeps.
"""

from __future__ import annotations

import mmap
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from torchkeep.dtypes import ST_TO_DTYPE
from torchkeep.reader import Checkpoint, check_digests

__all__ = ["MappedCheckpoint", "adopt"]


class MappedCheckpoint:
    """Read-only tensor views over a checkpoint's data, backed by one ``mmap``."""

    def __init__(self, ck: Checkpoint) -> None:
        self.ck = ck
        self.header = ck.header
        self._mm = (
            mmap.mmap(ck.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) if ck.header.file_size else None
        )
        self._views: dict[str, torch.Tensor] = {}

    def verify(self, threads: int = 2) -> None:
        """Check every checksum, hashing in ``threads`` threads; raises before anything is used."""
        sums = self.header.checksums
        if sums is None or self._mm is None:
            return
        mv = memoryview(self._mm)
        base = self.header.size
        specs = list(self.header.tensors.values())
        bufs = [mv[base + s.start : base + s.end] for s in specs]
        try:
            with ThreadPoolExecutor(threads) as pool:
                check_digests(self.ck.path, specs, bufs, sums, pool, threads)
        finally:
            for b in bufs:
                b.release()
            mv.release()

    def view(self, key: str) -> torch.Tensor:
        """A read-only CPU tensor over the mapped bytes of ``key`` (do not write to it)."""
        t = self._views.get(key)
        if t is None:
            s = self.ck.spec(key)
            dtype = ST_TO_DTYPE[s.dtype]
            if s.nbytes == 0 or self._mm is None:
                t = torch.empty(s.shape, dtype=dtype)
            else:
                with warnings.catch_warnings():  # the map is read-only; these views are only copied from
                    warnings.simplefilter("ignore", UserWarning)
                    raw = torch.frombuffer(
                        self._mm, dtype=torch.uint8, count=s.nbytes, offset=self.header.size + s.start
                    )
                t = raw.view(dtype).view(s.shape)
            self._views[key] = t
        return t


def _tensor_items(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        return [(prefix, tree)]
    if isinstance(tree, Mapping):
        return [item for k, v in tree.items() for item in _tensor_items(v, (*prefix, k))]
    if isinstance(tree, (list, tuple)):
        return [item for i, v in enumerate(tree) for item in _tensor_items(v, (*prefix, i))]
    return []


def adopt(current: Any, loaded: Any, owned: Any) -> Any:
    """Copy ``loaded`` (mapped views) into the tensors of ``current`` where they match.

    ``current`` is a target's ``state_dict()`` (an optimizer's holds its live state
    tensors); where a path exists in both with the same shape, dtype and a CPU
    contiguous tensor, the values are copied into the existing memory and that tensor
    goes into the result, so ``load_state_dict`` keeps it without another copy.
    Everything else is materialised by ``owned(tensor)``.
    """
    live = {p: t for p, t in _tensor_items(current) if t.device.type == "cpu" and t.is_contiguous()}
    used: set[int] = set()

    def walk(node: Any, prefix: tuple[Any, ...]) -> Any:
        if isinstance(node, torch.Tensor):
            dst = live.get(prefix)
            if dst is not None and id(dst) not in used and dst.shape == node.shape and dst.dtype == node.dtype:
                used.add(id(dst))
                with torch.no_grad():
                    dst.copy_(node)
                return dst
            return owned(node)
        if isinstance(node, Mapping):
            return (
                type(node)((k, walk(v, (*prefix, k))) for k, v in node.items())
                if isinstance(node, dict)
                else {k: walk(v, (*prefix, k)) for k, v in node.items()}
            )
        if isinstance(node, list):
            return [walk(v, (*prefix, i)) for i, v in enumerate(node)]
        if isinstance(node, tuple):
            return tuple(walk(v, (*prefix, i)) for i, v in enumerate(node))
        return node

    return walk(loaded, ())

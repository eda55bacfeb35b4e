"""Gather a torchkeep distributed checkpoint on one process, in bounded memory.

:class:`Gathered` verifies every file of the checkpoint against its manifest, then rebuilds
the tree :func:`torchkeep.distributed.load_tree` would return, except that each DCP tensor is a
*stand-in*: a zero-stride view of its global shape and dtype, one element of memory. Flattening
and laying out that tree gives exactly the names, skeleton and offsets of the loaded tree;
:meth:`Gathered.load` then reads any batch of stand-ins through DCP (only the requested keys)
into one reused buffer. :func:`torchkeep.convert` writes the output file batch by batch with it.

Example:
    >>> import torch, tempfile, os, torchkeep.distributed as tkd
    >>> p = tkd.save({"w": torch.arange(6.0).reshape(2, 3), "step": 4}, os.path.join(tempfile.mkdtemp(), "ck"))
    >>> g = Gathered(p, max_memory=1 << 20, progress=None)
    >>> g.tree["step"], g.tree["w"].shape, g.tree["w"].stride()
    (4, torch.Size([2, 3]), (0, 0))
    >>> g.load({"w": g.tree["w"]})["w"].tolist()
    [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    >>> g.close()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from torchkeep import kinds
from torchkeep.dcp import check_complete, dcp_errors, read_metadata, safe_reader
from torchkeep.errors import CorruptCheckpointError, TorchkeepError
from torchkeep.reader import Checkpoint
from torchkeep.sources import read_tree
from torchkeep.storage.dcp_manifest import TREE_FILE, check_files, raise_for, rank_file, read_manifest
from torchkeep.writer import host_copies

__all__ = ["Gathered", "tensor_bytes"]


def tensor_bytes(src: Path) -> int:
    """Bytes of every tensor DCP's metadata lists (0 when it cannot be read: convert then reports why)."""
    try:
        md = read_metadata(src)
    except (TorchkeepError, OSError):
        return 0
    return _metadata_bytes(md)


def _metadata_bytes(md: Any) -> int:
    """Bytes of every tensor in DCP metadata ``md`` (global shapes)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return sum(
        math.prod(m.size) * m.properties.dtype.itemsize
        for m in md.state_dict_metadata.values()
        if isinstance(m, TensorStorageMetadata)
    )


def _trim_heap() -> None:
    """Hand memory the C allocator keeps after frees back to the system (glibc ``malloc_trim``; elsewhere nothing).

    DCP reads each stored chunk into a temporary buffer; once glibc has raised its mmap
    threshold, such buffers come from the heap, and freed heap memory stays resident.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Any = None


def _stand_in(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``shape`` and ``dtype`` backed by one element (a zero-stride view): it lays out,
    flattens and selects like the real tensor without its memory. Never written as it is."""
    return torch.empty((), dtype=dtype).expand(shape)


class Gathered:
    """A torchkeep distributed checkpoint, verified, whose tree holds stand-ins for its DCP tensors.

    The tree is the one :func:`torchkeep.distributed.resume.load_tree` returns (non-tensor
    leaves from ``tree.safetensors``, per-rank entries from rank 0's file), except that each
    DCP tensor is a :func:`_stand_in` of its global shape and dtype, so flattening it gives
    the same names, skeleton and layout as the loaded tree. :meth:`load` reads a batch of
    stand-ins through DCP (only the requested keys) into full-size buffers.

    Every file is hashed against the manifest before anything else is read, so a damaged
    checkpoint is refused before any output is created.
    """

    def __init__(self, src: Path, max_memory: int, progress: Callable[[int], None] | None) -> None:
        # torch.distributed.checkpoint (resume's import) is paid only when a distributed checkpoint is converted
        from torchkeep.distributed.resume import Local

        # half for the batch, half for what DCP holds while copying it in: each stored chunk is
        # read into a temporary tensor first, and those of one batch add up to the batch at most
        self.batch = max(1, max_memory // 2)
        self.progress = progress
        self.standins: dict[int, tuple[str, torch.Tensor]] = {}  # id(stand-in) -> (DCP key, stand-in)
        self.gathered = 0
        self._arena: torch.Tensor | None = None  # reused memory the batches are read into
        self.src = Local(src.absolute())
        self.src.pin()  # a save that swaps another checkpoint in meanwhile makes this fail, not mix the two
        try:
            self._open()
        except BaseException as e:
            self.src.named(e)
            self.close()
            raise

    def _open(self) -> None:
        from torchkeep.distributed.common import wait  # torch.distributed: only when a distributed checkpoint is read
        from torchkeep.distributed.resume import set_at

        wait()  # this process's own background save of it, if any
        root, label = self.src.root, self.src.label
        manifest = read_manifest(root)
        problems = check_files(root, manifest, manifest["files"], progress=self.progress)
        raise_for(label, problems)
        self.md = read_metadata(root)
        check_complete(root, self.md)
        self.tensor_bytes = _metadata_bytes(self.md)
        tree = read_tree(kinds.detect(root / TREE_FILE))[0]
        with Checkpoint(root / TREE_FILE) as ck:
            self.user = ck.metadata
        self.placeholders = {tuple(p): k for p, k in manifest.get("tensors", [])}
        tree = self._fill(tree, ())
        rank_paths = [tuple(p) for p in manifest.get("per_rank", [])]
        if rank_paths:  # rank 0's entries, as load_tree takes them
            values = read_tree(kinds.detect(root / rank_file(0)))[0]
            for rp, value in zip(rank_paths, values, strict=True):
                tree = set_at(tree, rp, value)
        self.tree = tree

    def _fill(self, node: Any, path: tuple[Any, ...]) -> Any:
        """The tree with a stand-in at every placeholder (containers rebuilt as resume's filler does)."""
        key = self.placeholders.get(path)
        if key is not None:
            meta = self.md.state_dict_metadata.get(key)
            if meta is None or not hasattr(meta, "size"):
                raise CorruptCheckpointError(key, "the manifest names a tensor DCP's metadata lacks")
            t = _stand_in(tuple(meta.size), meta.properties.dtype)
            self.standins[id(t)] = (key, t)
            return t
        if isinstance(node, Mapping):
            return {k: self._fill(v, (*path, k)) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            items = [self._fill(v, (*path, i)) for i, v in enumerate(node)]
            return items if isinstance(node, list) else tuple(items)
        return node

    def load(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Contiguous CPU tensors for ``tensors``: stand-ins read through DCP, real tensors as host copies."""
        import torch.distributed.checkpoint as dcp

        from torchkeep.distributed.common import quiet  # torch.distributed.checkpoint: only when gathering

        wanted: dict[str, torch.Tensor] = {}  # DCP key -> stand-in
        real: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            entry = self.standins.get(id(t))
            if entry is None or entry[1] is not t:
                real[name] = t
            else:
                wanted.setdefault(entry[0], t)
        want = self._buffers(wanted)
        out = {name: want[self.standins[id(t)][0]] for name, t in tensors.items() if name not in real}
        if want:
            try:
                with quiet(), dcp_errors(self.src.label):
                    dcp.load(want, storage_reader=safe_reader(self.src.root, self.md), no_dist=True)
            except BaseException as e:
                self.src.named(e)  # the real path in the message, not the pinned one
                raise
            _trim_heap()
            n = sum(t.numel() * t.element_size() for t in want.values())
            self.gathered += n
            if self.progress is not None:
                self.progress(n)
        out.update(host_copies(real))
        return out

    def _buffers(self, standins: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full-size tensors for ``standins``, packed into one reused buffer.

        The buffer grows to the largest batch and is then reused: allocating and freeing a
        batch's worth of tensors each time would leave the C allocator holding freed memory.
        Each tensor starts at a multiple of its element size.
        """
        spans: list[tuple[str, torch.Tensor, int, int]] = []
        end = 0
        for key, t in standins.items():
            size = t.element_size()
            start = -(-end // size) * size
            end = start + t.numel() * size
            spans.append((key, t, start, end))
        if self._arena is None or self._arena.numel() < end:
            self._arena = None  # the old buffer goes back before the larger one is taken
            self._arena = torch.empty(max(end, min(self.batch, self.tensor_bytes)), dtype=torch.uint8)
        arena = self._arena
        return {key: arena[start:stop].view(t.dtype).view(t.shape) for key, t, start, stop in spans}

    def finish(self) -> None:
        """Report the tensors never gathered (not selected for the output), so progress adds up to :func:`input_size`."""
        left = self.tensor_bytes - self.gathered
        if left > 0 and self.progress is not None:
            self.progress(left)
        self.gathered = self.tensor_bytes

    def close(self) -> None:
        self._arena = None
        self.src.close()

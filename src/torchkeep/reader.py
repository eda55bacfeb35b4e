"""Open a safetensors/torchkeep file, read tensors into memory, and verify them as they arrive.

:func:`torchkeep.open` returns a :class:`Checkpoint`; :func:`torchkeep.load` uses one to read
everything. Each tensor is read (``preadv``) straight into its destination, fresh memory
(:mod:`torchkeep.alloc`) or a tensor the caller passes (``restore`` passes a model's live
parameters), in chunks of 1 MiB, on several threads; each chunk is fed to the tensor's
checksum right after it lands, while it is still in the CPU cache, so verifying costs no second
pass over memory. The bytes hashed are the destination's own bytes: what was verified is what
is used. Device destinations are read through page-locked staging buffers
(:mod:`torchkeep.staging`), hashed there, then copied.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from torchkeep import alloc
from torchkeep.dtypes import ST_TO_DTYPE, buffer_of
from torchkeep.errors import ChecksumMismatchError, CorruptCheckpointError, InvalidArgumentError
from torchkeep.format.header import HashState, TensorSpec, digest
from torchkeep.headers import HeaderFile
from torchkeep.runtime import read_threads
from torchkeep.staging import STAGE, Stage, device_bytes
from torchkeep.storage.local import read_into
from torchkeep.tree import SkeletonError, unflatten

__all__ = ["Checkpoint", "check_digests", "open_checkpoint", "read_hashed"]


_CHUNK = 1 << 20  # bytes read, then hashed while still in cache (measured: 1 MiB beat 2 and 4)
_SMALL = 1 << 20  # tensors below this are read in batches of adjacent ones and hashed inline
_SPLIT = 64 << 20  # tensors from this size are read by every thread at once, chunk by chunk
_RUN = 4 << 20  # bytes per batch of small tensors
_IOV = 1024  # buffers per batch (IOV_MAX)

Dest = memoryview | torch.Tensor  # host bytes, or a device tensor's bytes (read through a Stage)


class _Shared:
    """One large tensor read by every thread at once, in ``piece``-byte chunks claimed in order;
    its one checksum stream is fed in chunk order (``front``: chunks hashed so far)."""

    def __init__(self, nbytes: int, off: int, piece: int, hashed: bool) -> None:
        self.off, self.piece = off, piece
        self.count = -(-nbytes // piece)
        self.claimed = 0
        self.front = 0
        self.state = HashState() if hashed else None
        self.turn = threading.Condition()

    def open(self) -> bool:
        return self.claimed < self.count

    def claim(self) -> int | None:
        """The next chunk to read, or ``None`` when every chunk is taken."""
        with self.turn:
            c = self.claimed
            if c >= self.count:
                return None
            self.claimed += 1
            return c

    def digest(self) -> str:
        return self.state.hexdigest() if self.state is not None else ""


class _Split(_Shared):
    """A large tensor in host memory: each thread reads the chunks it claims straight into place;
    whoever completes the chunk at the hash frontier feeds it (and every completed chunk after
    it) to the checksum. A lone huge tensor (a flat parameter buffer, an embedding) so reads and
    faults in its memory on every core, not one."""

    def __init__(self, buf: memoryview, off: int, hashed: bool) -> None:
        super().__init__(buf.nbytes, off, _CHUNK, hashed)
        self.buf = buf
        self.done = [False] * self.count
        self.hashing = False

    def run(self, fd: int, failed: list[BaseException]) -> None:
        """Read (and hash, in order) chunks until none is left to claim, or another thread failed."""
        while not failed and (c := self.claim()) is not None:
            read_into(fd, self.off + c * _CHUNK, [self.buf[c * _CHUNK : (c + 1) * _CHUNK]])
            self._hash_from(c)

    def _hash_from(self, c: int) -> None:
        with self.turn:
            self.done[c] = True
            if self.hashing or self.state is None:
                return
            self.hashing = True
        while True:
            with self.turn:
                c = self.front
                if c >= self.count or not self.done[c]:
                    self.hashing = False
                    return
                self.front += 1
            self.state.update(self.buf[c * _CHUNK : (c + 1) * _CHUNK])


class _DeviceSplit(_Shared):
    """A large tensor on a device, read through the threads' staging buffers.

    Each thread reads the chunks it claims into its own buffer; the chunks are hashed in order
    (a thread waits for its chunk's turn: the bytes are in its buffer, which it needs back),
    then each thread sends its chunk to the device. Reads and copies overlap across threads;
    only the hashing is one at a time, and it is the fastest of the three.
    """

    def __init__(self, dst: torch.Tensor, off: int, hashed: bool) -> None:
        super().__init__(dst.nbytes, off, STAGE, hashed)
        self.dst = dst
        self.broken = False  # a thread failed: the others stop waiting for its turn

    def run(self, fd: int, failed: list[BaseException], stage: Stage) -> None:
        """Read, hash (in order) and send chunks until none is left to claim, or a thread failed."""
        try:
            while not failed and not self.broken and (c := self.claim()) is not None:
                lo = c * STAGE
                n = min(STAGE, self.dst.nbytes - lo)
                buf, view = stage.take()
                read_into(fd, self.off + lo, [view[:n]])
                with self.turn:
                    while self.front != c and not self.broken:
                        self.turn.wait()
                    if self.broken:
                        return
                if self.state is not None:
                    self.state.update(view[:n])  # this chunk's turn: no other thread hashes now
                with self.turn:
                    self.front += 1
                    self.turn.notify_all()
                stage.send(self.dst[lo : lo + n], buf[:n])
                stage.sent()
        except BaseException:
            with self.turn:
                self.broken = True
                self.turn.notify_all()
            raise


def _units(specs: list[TensorSpec], bufs: list[Dest]) -> list[tuple[int, list[int]]]:
    """``(bytes, tensor indices)`` work units: a large tensor alone, or a run of small ones adjacent
    in the file (all in host memory, or all on one device); largest first, so that the threads
    pulling from one queue finish together."""
    units: list[tuple[int, list[int]]] = []
    run: list[int] = []
    size = 0
    end = -1
    here: torch.device | None = None
    for i, (s, b) in enumerate(zip(specs, bufs, strict=True)):
        n = b.nbytes
        if n >= _SMALL:
            units.append((n, [i]))
            continue
        place = None if type(b) is memoryview else b.device  # type: ignore[union-attr]
        if run and (s.start != end or size + n > _RUN or len(run) >= _IOV or place != here):
            units.append((size, run))
            run, size = [], 0
        here = place
        run.append(i)
        size += n
        end = s.end
    if run:
        units.append((size, run))
    units.sort(key=lambda u: -u[0])
    return units


def read_hashed(fd: int, base: int, specs: list[TensorSpec], bufs: list[Dest], *, hashed: bool = True) -> list[str]:
    """Fill ``bufs[i]`` with tensor ``specs[i]``'s bytes (at ``base + start``); returns their digests.

    A destination is host memory (a ``memoryview``) or a device tensor's bytes
    (:func:`~torchkeep.staging.device_bytes`), which is read through the thread's
    :class:`~torchkeep.staging.Stage`: hashed there, then copied to the device.

    Large tensors are read in ``_CHUNK`` pieces, each hashed right after it is read; runs of
    small adjacent tensors are read with one ``preadv`` and hashed inline. Work is split over
    :func:`~torchkeep.runtime.read_threads` threads by whole tensors (each tensor is hashed in
    order by one thread), except tensors of ``_SPLIT`` bytes or more, which all threads read at
    once (:class:`_Split`, :class:`_DeviceSplit`). Digests are ``""`` when ``hashed`` is false.

    Raises:
        EOFError: the file ended before a tensor's last byte.
    """
    digests = [""] * len(specs)
    queue: deque[list[int] | _Shared] = deque()
    splits: list[tuple[int, _Shared]] = []
    local = threading.local()
    for n, idx in _units(specs, bufs):
        if n >= _SPLIT and len(idx) == 1:
            b, off = bufs[idx[0]], base + specs[idx[0]].start
            job = _Split(b, off, hashed) if isinstance(b, memoryview) else _DeviceSplit(b, off, hashed)
            splits.append((idx[0], job))
            queue.append(job)
        else:
            queue.append(idx)

    def stage_for(device: torch.device) -> Stage:
        stages = local.__dict__.setdefault("stages", {})
        if device not in stages:
            stages[device] = Stage(device)
        return stages[device]

    failed: list[BaseException] = []

    def pull() -> None:
        while queue and not failed:
            try:
                unit = queue.popleft()
            except IndexError:
                return
            try:
                if isinstance(unit, _Shared):  # left queued for the others while chunks remain
                    if unit.open():
                        queue.appendleft(unit)
                    if isinstance(unit, _DeviceSplit):
                        unit.run(fd, failed, stage_for(unit.dst.device))
                    else:
                        assert isinstance(unit, _Split)
                        unit.run(fd, failed)
                    continue
                idx = unit
                first = bufs[idx[0]]
                if not isinstance(first, memoryview):
                    _staged(fd, base, specs, bufs, idx, stage_for(first.device), digests, hashed)
                elif len(idx) == 1 and first.nbytes >= _SMALL:
                    i = idx[0]
                    b, off = first, base + specs[i].start
                    h = HashState() if hashed else None
                    for pos in range(0, b.nbytes, _CHUNK):
                        piece = b[pos : pos + _CHUNK]
                        read_into(fd, off + pos, [piece])
                        if h is not None:
                            h.update(piece)
                    digests[i] = h.hexdigest() if h is not None else ""
                else:
                    read_into(fd, base + specs[idx[0]].start, [bufs[i] for i in idx])
                    if hashed:
                        for i in idx:
                            digests[i] = digest(bufs[i])
            except BaseException as e:
                failed.append(e)
                raise

    def work() -> None:
        try:
            pull()
        finally:  # every copy to a device has landed before the read returns or raises
            for stage in local.__dict__.get("stages", {}).values():
                try:
                    stage.drain()
                except BaseException as e:  # a copy that failed on the device fails the read
                    failed.append(e)

    threads = min(read_threads(), len(queue) + sum(j.count for _, j in splits))
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            futures = [pool.submit(work) for _ in range(threads)]
            try:
                for f in futures:
                    f.exception()
            except BaseException as e:  # Ctrl-C while waiting: the readers stop at their next piece
                failed.append(e)
                raise
    else:
        work()
    if failed:
        raise failed[0]
    for i, job in splits:
        digests[i] = job.digest()
    return digests


def _staged(
    fd: int,
    base: int,
    specs: list[TensorSpec],
    bufs: list[Dest],
    idx: list[int],
    stage: Stage,
    digests: list[str],
    hashed: bool,
) -> None:
    """Read one unit into device destinations through ``stage``: a large tensor chunk by chunk,
    or a run of small adjacent ones at once; each chunk hashed in the staging buffer, then sent."""
    if len(idx) == 1 and bufs[idx[0]].nbytes > STAGE:
        i = idx[0]
        dst, off = bufs[i], base + specs[i].start
        h = HashState() if hashed else None
        for pos in range(0, dst.nbytes, STAGE):
            n = min(STAGE, dst.nbytes - pos)
            buf, view = stage.take()
            read_into(fd, off + pos, [view[:n]])
            if h is not None:
                h.update(view[:n])
            stage.send(dst[pos : pos + n], buf[:n])  # type: ignore[index]
            stage.sent()
        digests[i] = h.hexdigest() if h is not None else ""
        return
    first = specs[idx[0]].start
    size = specs[idx[-1]].end - first
    buf, view = stage.take()
    read_into(fd, base + first, [view[:size]])
    for i in idx:
        lo, hi = specs[i].start - first, specs[i].end - first
        if hashed:
            digests[i] = digest(view[lo:hi])
        if hi > lo:
            stage.send(bufs[i], buf[lo:hi])  # type: ignore[arg-type]
    stage.sent()


def check_digests(path: str | Path, specs: list[TensorSpec], digests: list[str], sums: Mapping[str, str]) -> None:
    """Raise :class:`ChecksumMismatchError` for the first tensor (in file order) whose digest does not match."""
    for s, h in sorted(zip(specs, digests, strict=True), key=lambda p: p[0].start):
        if h != sums[s.name]:
            raise ChecksumMismatchError(path, s.name, sums[s.name], h)


def _checked_target(path: Path, s: TensorSpec, t: torch.Tensor) -> Dest:
    """The bytes of a caller's destination tensor for ``s``: a contiguous tensor of its dtype and
    size, in host memory or on a CUDA device (read through a staging buffer)."""
    if not (
        (t.is_cpu or t.is_cuda)
        and t.layout is torch.strided
        and t.dtype is ST_TO_DTYPE[s.dtype]
        and t.nbytes == s.nbytes
        and t.is_contiguous()
        and not (t.is_conj() or t.is_neg())  # a lazy conjugate or negation: its memory does not hold its values
    ):
        raise InvalidArgumentError(
            "into",
            f"{s.name}: {t.dtype} {tuple(t.shape)} on {t.device}",
            f"a contiguous CPU or CUDA tensor of dtype {ST_TO_DTYPE[s.dtype]} and {s.nbytes} bytes (the stored "
            f"tensor in {path}; not a lazy .conj() or negative view), or leave {s.name!r} out of into=",
        )
    return _bytes_of(t)


def _bytes_of(t: torch.Tensor) -> Dest:
    """Where a read puts ``t``'s bytes: a host view of them, or (on a device) the tensor read through a Stage."""
    if t.is_cpu and not _stage_host:
        return buffer_of(t.detach() if t.requires_grad else t)
    return device_bytes(t)


_stage_host = False  # tests set it: host destinations then go through a Stage too (the CUDA path's logic, on a CPU)


class Checkpoint(HeaderFile):
    """A read-only handle on a checkpoint file (a :class:`HeaderFile`); reads only the tensors asked for.

    Example:
        >>> import torch, torchkeep as tk, tempfile, os
        >>> p = tk.save({"w": torch.ones(3), "b": torch.zeros(1)}, os.path.join(tempfile.mkdtemp(), "c.safetensors"))
        >>> with tk.open(p) as ck:
        ...     sorted(ck.keys()), ck.get("w").sum().item()
        (['b', 'w'], 3.0)
    """

    # -- tensors ----------------------------------------------------------------------------
    def get(self, key: str) -> torch.Tensor:
        """One tensor, read (and verified) on its own."""
        return self.read([key])[key]

    def read(
        self,
        keys: Iterable[str] | None = None,
        *,
        into: Mapping[str, torch.Tensor] | None = None,
        device: torch.device | str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Read the named tensors (all when ``None``), verifying each checksum as its bytes arrive.

        Args:
            keys: the stored tensors to read.
            into: destinations the caller already holds, by stored name (contiguous CPU or CUDA
                tensors of the stored dtype and size, e.g. a model's parameters); every other
                tensor is read into fresh memory. A destination is written before its checksum
                is known: on a mismatch it holds the file's (damaged) bytes.
            device: where fresh tensors go (default: host memory). A CUDA device gets them
                through page-locked staging buffers, each chunk hashed there, then copied.

        Raises:
            ChecksumMismatchError: a tensor's bytes do not match its checksum (raised after every
                requested tensor was read).
            CorruptCheckpointError: the file ended early.
            InvalidArgumentError: a destination in ``into`` does not fit its tensor, or ``device`` is not a device.
        """
        specs = (
            sorted((self.spec(k) for k in keys), key=lambda s: s.start)
            if keys is not None
            else list(self.header.tensors.values())
        )
        out: dict[str, torch.Tensor] = {}
        bufs: list[Dest] = []
        devices: set[torch.device] = set()  # the CUDA devices read into
        try:
            fresh_on = torch.device(device) if device is not None else None
        except (RuntimeError, TypeError):
            raise InvalidArgumentError("device", device, "a device such as 'cpu' or 'cuda:0'") from None
        if fresh_on is not None and fresh_on.type == "cpu":
            fresh_on = None
        for s in specs:
            t = into.get(s.name) if into else None
            if t is None:
                dtype = ST_TO_DTYPE[s.dtype]
                t = (
                    alloc.empty(s.shape, dtype)
                    if fresh_on is None
                    else torch.empty(s.shape, dtype=dtype, device=fresh_on)
                )
                b = _bytes_of(t)
            else:
                b = _checked_target(self.path, s, t)
            if type(b) is not memoryview and b.is_cuda:
                devices.add(b.device)
            bufs.append(b)
            out[s.name] = t
        for dev in devices:
            # work queued on the targets, on any stream of the device, comes first: the copies go
            # on the reading threads' own (default) streams, which do not wait for other streams
            torch.cuda.synchronize(dev)
        sums = self.header.checksums if self.verify else None
        try:
            digests = read_hashed(self._fd, self.header.size, specs, bufs, hashed=sums is not None)
        except EOFError:
            raise CorruptCheckpointError(self.path, "the file ended before its last tensor (truncated)") from None
        finally:
            if into:  # written behind torch's back: autograd must see them as modified in place
                given = {id(d) for d in into.values()}
                for t in out.values():
                    if id(t) in given:
                        torch.autograd.graph.increment_version(t)
        if sums is not None:
            check_digests(self.path, specs, digests, sums)
        return out

    def tree(self, *, place: Any = None) -> Any:
        """The whole state tree (Stateful leaves as their state dicts)."""
        tensors = self.read()
        skeleton = self.skeleton
        if not self.has_tree:  # a plain safetensors file: a flat dict
            return tensors if place is None else {k: place(t, None) for k, t in tensors.items()}
        try:
            return unflatten(skeleton, tensors.__getitem__, place)
        except SkeletonError as e:
            raise CorruptCheckpointError(self.path, str(e)) from None


def open_checkpoint(path: str | os.PathLike[str], *, verify: bool = True) -> Checkpoint:
    """Open a checkpoint for lazy reading: ``keys()``, ``get(key)``, ``metadata``, ``skeleton``.

    Example:
        >>> import torch, torchkeep as tk, tempfile, os
        >>> p = tk.save({"w": torch.ones(2)}, os.path.join(tempfile.mkdtemp(), "c.safetensors"))
        >>> with tk.open(p) as ck:
        ...     ck.get("w").tolist()
        [1.0, 1.0]
    """
    return Checkpoint(path, verify=verify)

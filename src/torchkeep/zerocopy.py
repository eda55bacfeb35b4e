"""Zero-copy loads: tensors that are views of a private memory map of the file, verified first.

:func:`map_tensors` is what ``tk.load(path, mmap=True)`` does with one torchkeep or safetensors
file. The file is mapped copy-on-write (``MAP_PRIVATE``; ``ACCESS_COPY``): its pages come from
the page cache with no copy into fresh memory, the returned tensors are writable, and a write
to one gets a private copy of that page, never reaching the file. Before any tensor exists,
every stored checksum is compared with the xxh3-128 of the mapped bytes (several threads, one
pass at memory speed); a mismatch raises and nothing is returned.

What a mapping cannot promise (and the default, copying ``tk.load`` does): after the check,
the tensors are only as stable as the file under them. torchkeep replaces files by rename,
which leaves a mapping on the old inode and its old bytes; but another tool rewriting the
file in place (``cp``, ``rsync --inplace``) shows through every page not yet written, and a
truncated file makes touching a page past its new end raise ``SIGBUS``. The size is checked
just before mapping, so a file already short is a typed error, never a crash.

A tensor whose bytes do not start at a multiple of its element size (possible in a foreign
safetensors file, never in a torchkeep one) is copied into memory of its own and checked
there. Each mapped tensor has a storage of its own bytes (not one storage for the whole
file), so saving it writes only its bytes, as for a tensor read into fresh memory.

Example:
    >>> import torch, torchkeep as tk, tempfile, os
    >>> from torchkeep.headers import HeaderFile
    >>> p = tk.save({"w": torch.arange(4.0)}, os.path.join(tempfile.mkdtemp(), "c.safetensors"))
    >>> with HeaderFile(p) as hf:
    ...     t = map_tensors(hf)["w"]
    >>> t.tolist()
    [0.0, 1.0, 2.0, 3.0]
"""

from __future__ import annotations

import contextlib
import mmap
import os

import torch

from torchkeep.dtypes import ST_TO_DTYPE, buffer_of
from torchkeep.errors import CorruptCheckpointError
from torchkeep.format.dtypes import ITEMSIZE
from torchkeep.format.header import TensorSpec
from torchkeep.hashing import digests_of
from torchkeep.headers import HeaderFile
from torchkeep.reader import check_digests
from torchkeep.runtime import read_threads

__all__ = ["check_mapped", "map_tensors"]


def map_tensors(hf: HeaderFile, *, verify: bool | None = None, threads: int | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the open file ``hf`` as a view of a private (copy-on-write) map of it.

    Args:
        hf: the opened file (a :class:`~torchkeep.headers.HeaderFile` or a ``Checkpoint``);
            the map is made from its descriptor, so the bytes are those of the file it opened.
        verify: compare every checksum with the mapped bytes before any tensor is made
            (default: ``hf.verify``). A plain safetensors file has no checksums: it is mapped
            unverified, as the copying load reads it. ``False``: no hash pass at all.
        threads: threads hashing the mapped bytes (default :func:`~torchkeep.runtime.read_threads`).

    Returns:
        ``{name: tensor}`` in file order. Empty tensors and misaligned ones are in memory of their own.

    Raises:
        CorruptCheckpointError: the file is shorter than its header says (truncated since it was opened).
        ChecksumMismatchError: a tensor's bytes do not match its checksum (naming file and tensor);
            no tensor is returned and the map is released.
    """
    header = hf.header
    specs = list(header.tensors.values())  # data order
    end = header.size + (specs[-1].end if specs else 0)
    check = (hf.verify if verify is None else verify) and header.checksums is not None
    _check_size(hf, end)
    base = header.size
    full = [(s, base + s.start, base + s.end) for s in specs if s.end > s.start]  # tensors with bytes
    copied = [(s, lo, hi) for s, lo, hi in full if lo % ITEMSIZE[s.dtype]]
    # never MAP_POPULATE: on a writable private map it would copy every page; pages fault in as hashed
    mm = mmap.mmap(hf.fileno(), end, access=mmap.ACCESS_COPY) if full else None
    views: list[memoryview] = []
    try:
        whole = memoryview(mm) if mm is not None else memoryview(b"")
        views.append(whole)
        own = {s.name: _copy(s, whole[lo:hi]) for s, lo, hi in copied}
        if check:
            want = header.checksums
            assert want is not None  # checked above
            bufs = [buffer_of(own[s.name]) if s.name in own else whole[lo:hi] for s, lo, hi in full]
            views.extend(bufs)
            check_digests(hf.path, [s for s, _, _ in full], digests_of(bufs, threads or read_threads()), want)
    except BaseException:
        _release(views)
        if mm is not None:
            with contextlib.suppress(BufferError):  # a slice still held by a traceback: freed with it
                mm.close()  # unmapped now, not when the traceback is dropped
        raise
    _release(views)  # the tensors below hold exports of their own
    out: dict[str, torch.Tensor] = {}
    frombuffer = torch.frombuffer
    for s in specs:
        n = s.end - s.start
        if not n:
            out[s.name] = torch.empty(s.shape, dtype=ST_TO_DTYPE[s.dtype])
        elif own and s.name in own:
            out[s.name] = own[s.name]
        else:  # a storage of its own bytes, in the map
            t = frombuffer(mm, dtype=ST_TO_DTYPE[s.dtype], count=n // ITEMSIZE[s.dtype], offset=base + s.start)
            out[s.name] = t if len(s.shape) == 1 else t.view(s.shape)
    if mm is not None and len(copied) == len(full):
        mm.close()  # everything was copied: nothing keeps the map
    return out


def check_mapped(hf: HeaderFile, names: list[str], *, threads: int | None = None) -> None:
    """Compare the checksums of the stored tensors ``names`` with their bytes in a read-only map
    of the open file ``hf``, before a caller reads them into memory it cares about (``load_into``
    into a model): a damaged file is refused with nothing touched, at the cost of one hashing pass
    over the page cache and no copy. A no-op without checksums or with ``hf.verify`` off.

    Raises:
        CorruptCheckpointError: the file is shorter than its header says.
        ChecksumMismatchError: a tensor's bytes do not match its checksum.

    Example:
        >>> import torch, torchkeep as tk, tempfile, os
        >>> p = tk.save({"w": torch.ones(4)}, os.path.join(tempfile.mkdtemp(), "c.safetensors"))
        >>> with HeaderFile(p) as hf:
        ...     check_mapped(hf, ["w"])  # silent: the bytes match
    """
    want = hf.header.checksums
    if not hf.verify or want is None or not names:
        return
    base = hf.header.size
    specs = sorted((hf.spec(n) for n in names), key=lambda s: s.start)
    specs = [s for s in specs if s.end > s.start]
    if not specs:
        return
    end = base + specs[-1].end
    _check_size(hf, end)
    mm = mmap.mmap(hf.fileno(), end, access=mmap.ACCESS_READ)
    whole = memoryview(mm)
    bufs = [whole[base + s.start : base + s.end] for s in specs]
    try:
        sums = digests_of(bufs, threads or read_threads())
    finally:
        _release([whole, *bufs])
        mm.close()
    check_digests(hf.path, specs, sums, want)


def _check_size(hf: HeaderFile, end: int) -> None:
    """Refuse a file shorter than ``end`` before mapping it: a mapped page past the end of the file
    raises ``SIGBUS`` when touched."""
    size = os.fstat(hf.fileno()).st_size
    if size < end:
        raise CorruptCheckpointError(
            hf.path,
            f"the file is {size:,} bytes, shorter than the {end:,} its header describes "
            "(truncated or rewritten in place since it was opened)",
        )


def _release(views: list[memoryview]) -> None:
    for v in reversed(views):
        v.release()


def _copy(spec: TensorSpec, data: memoryview) -> torch.Tensor:
    """``spec``'s bytes in memory of its own (a tensor at an offset its dtype cannot view in place)."""
    t = torch.empty(spec.shape, dtype=ST_TO_DTYPE[spec.dtype])
    buffer_of(t)[:] = data
    return t

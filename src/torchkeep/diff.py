"""Compare two checkpoints tensor by tensor, in bounded memory: :func:`diff` -> :class:`DiffReport`.

Names are the flat tensor names of each file: the ``/``-joined tree paths for torchkeep
files (``model/fc.weight``, ``optimizer/state/0/exp_avg``), the stored names for plain
safetensors files. torchkeep and safetensors files are read in batches of about 64 MiB from
both sides, compared, and dropped; legacy ``torch.save`` files are loaded whole (safely).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from torchkeep import kinds
from torchkeep.dtypes import ST_TO_DTYPE
from torchkeep.errors import ArgumentTypeError, CorruptCheckpointError, InvalidArgumentError
from torchkeep.format.meta import TREE_KEY
from torchkeep.reader import Checkpoint
from torchkeep.sources import read_tree
from torchkeep.storage.paths import as_path
from torchkeep.tree import SkeletonError, flatten, unflatten

__all__ = ["DiffReport", "DtypeChange", "LeafChange", "ShapeChange", "ValueChange", "diff"]

PathLike = str | os.PathLike[str]
_BATCH = 64 << 20  # bytes per side read before comparing
_CHUNK = 1 << 20  # elements compared at a time in float64 (a few 8 MiB scratch arrays)
_TINY = torch.finfo(torch.float64).tiny


class ShapeChange(NamedTuple):
    name: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]


class DtypeChange(NamedTuple):
    name: str
    dtype_a: str
    dtype_b: str


class ValueChange(NamedTuple):
    """A tensor whose values differ beyond ``atol + rtol * |b|`` somewhere."""

    name: str
    max_abs: float
    rel_l2: float  # ||a - b|| / max(||a||, tiny)


class LeafChange(NamedTuple):
    """A non-tensor leaf (epoch, config entry) whose value differs, or a tensor that became a value."""

    name: str
    value_a: Any
    value_b: Any


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return repr(v)


@dataclass
class DiffReport:
    """What differs between checkpoints ``a`` and ``b``.

    Attributes:
        only_a / only_b: names (tensors or values) present on one side only, sorted.
        shape_changed, dtype_changed: tensors present in both with another shape / dtype
            (their values are not compared).
        value_changed: tensors whose values differ beyond the tolerance, with the max
            absolute and relative L2 difference, in A's file order.
        leaf_changed: non-tensor values (epoch, config) that differ.
        equal: tensors bitwise equal; close: tensors not bitwise equal but within tolerance
            (with the default ``rtol=atol=0``: ``-0.0`` vs ``0.0``, NaN payloads).

    Example:
        >>> import torch, torchkeep as tk, tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> a = tk.save({"w": torch.zeros(2), "step": 1}, os.path.join(d, "a.safetensors"))
        >>> b = tk.save({"w": torch.zeros(2), "step": 2}, os.path.join(d, "b.safetensors"))
        >>> report = diff(a, b)
        >>> report.identical, report.equal, [c.name for c in report.leaf_changed]
        (False, 1, ['step'])
    """

    a: str
    b: str
    rtol: float = 0.0
    atol: float = 0.0
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    shape_changed: list[ShapeChange] = field(default_factory=list)
    dtype_changed: list[DtypeChange] = field(default_factory=list)
    value_changed: list[ValueChange] = field(default_factory=list)
    leaf_changed: list[LeafChange] = field(default_factory=list)
    equal: int = 0
    close: int = 0
    equal_leaves: int = 0

    @property
    def identical(self) -> bool:
        """True when nothing differs (within the tolerance)."""
        return not (
            self.only_a
            or self.only_b
            or self.shape_changed
            or self.dtype_changed
            or self.value_changed
            or self.leaf_changed
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite floats as strings, other values as their ``repr``)."""
        return {
            "a": self.a,
            "b": self.b,
            "identical": self.identical,
            "rtol": self.rtol,
            "atol": self.atol,
            "equal": self.equal,
            "close": self.close,
            "equal_values": self.equal_leaves,
            "only_a": list(self.only_a),
            "only_b": list(self.only_b),
            "shape_changed": [{"name": n, "a": list(x), "b": list(y)} for n, x, y in self.shape_changed],
            "dtype_changed": [{"name": n, "a": x, "b": y} for n, x, y in self.dtype_changed],
            "value_changed": [
                {"name": n, "max_abs": _jsonable(m), "rel_l2": _jsonable(r)} for n, m, r in self.value_changed
            ],
            "leaf_changed": [{"name": n, "a": _jsonable(x), "b": _jsonable(y)} for n, x, y in self.leaf_changed],
        }

    def summary(self) -> str:
        """One line: counts per kind of difference."""
        if self.identical:
            extra = f" ({self.close} within tolerance)" if self.close else ""
            return f"identical: {self.equal + self.close} tensors{extra}, {self.equal_leaves} values"
        parts = [
            f"{len(self.value_changed)} changed",
            f"{len(self.shape_changed)} reshaped",
            f"{len(self.dtype_changed)} retyped",
            f"{len(self.only_a)} only in A",
            f"{len(self.only_b)} only in B",
            f"{len(self.leaf_changed)} values changed",
        ]
        return f"different: {', '.join(p for p in parts if not p.startswith('0 '))}; {self.equal + self.close} tensors equal"

    def rows(self, limit: int | None = 20) -> Iterator[tuple[str, str, str]]:
        """``(kind, name, detail)`` rows, at most ``limit`` per kind (largest value changes first)."""

        def cap(items: list[Any]) -> list[Any]:
            return items if limit is None else items[:limit]

        def more(items: list[Any], kind: str) -> Iterator[tuple[str, str, str]]:
            if limit is not None and len(items) > limit:
                yield kind, f"... {len(items) - limit} more", ""

        ranked = sorted(self.value_changed, key=lambda v: -v.rel_l2 if math.isfinite(v.rel_l2) else -math.inf)
        for v in cap(ranked):
            yield "changed", v.name, f"max_abs {v.max_abs:.3g}  rel_l2 {v.rel_l2:.3g}"
        yield from more(ranked, "changed")
        for s in cap(self.shape_changed):
            yield "shape", s.name, f"{tuple(s.shape_a)} -> {tuple(s.shape_b)}"
        yield from more(self.shape_changed, "shape")
        for d in cap(self.dtype_changed):
            yield "dtype", d.name, f"{d.dtype_a} -> {d.dtype_b}"
        yield from more(self.dtype_changed, "dtype")
        for n in cap(self.only_a):
            yield "only A", n, ""
        yield from more(self.only_a, "only A")
        for n in cap(self.only_b):
            yield "only B", n, ""
        yield from more(self.only_b, "only B")
        for c in cap(self.leaf_changed):
            yield "value", c.name, f"{c.value_a!r} -> {c.value_b!r}"
        yield from more(self.leaf_changed, "value")

    def __str__(self) -> str:
        rows = list(self.rows())
        width = max((len(n) for _, n, _ in rows), default=0)
        lines = [f"A: {self.a}", f"B: {self.b}", self.summary()]
        lines += [f"  {k:<8} {n:<{width}}  {d}".rstrip() for k, n, d in rows]
        return "\n".join(lines)


# -- sources: a checkpoint as named tensors + named values --------------------------------------


class _Tensor(NamedTuple):
    key: str  # stored tensor
    view: Any  # [offset, shape, stride] into it, or None
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    order: int  # file position of the stored tensor, for sequential reads


def _component(p: Any) -> str:
    s = p if isinstance(p, str) else repr(p)
    return s.replace("%", "%25").replace("/", "%2F")


def _name(path: tuple[Any, ...]) -> str:
    return "/".join(_component(p) for p in path) or "<root>"


def _no_tensor(key: str) -> torch.Tensor:
    raise SkeletonError(f"a dict key refers to tensor {key!r}")


def _walk(n: Any, path: tuple[Any, ...], tensors: dict[str, dict], leaves: dict[str, Any]) -> None:
    """Collect tensor nodes and plain values of a skeleton by their ``/``-joined paths."""
    if n is None or isinstance(n, (bool, int, float, str)):
        leaves[_name(path)] = n
        return
    if not isinstance(n, dict):
        raise SkeletonError(f"unknown skeleton node {str(n)[:80]}")
    if "d" in n:
        for k, v in n["d"].items():
            _walk(v, (*path, k), tensors, leaves)
    elif "l" in n or "t" in n:
        for i, v in enumerate(n.get("l", n.get("t"))):
            _walk(v, (*path, i), tensors, leaves)
    elif "D" in n or "o" in n:
        for k, v in n.get("D", n.get("o")):
            _walk(v, (*path, unflatten(k, _no_tensor)), tensors, leaves)
    elif "T" in n:
        tensors[_name(path) if path else "tensor"] = n
    elif "S" in n:
        _walk(n["v"], path, tensors, leaves)
    elif "G" in n:
        tensors[_name(path)] = n["s"]
    else:  # nan/inf floats, dtypes, sizes, devices, NumPy scalars
        leaves[_name(path)] = unflatten(n, _no_tensor)


class _Source:
    """A checkpoint seen as ``tensors`` (name -> where and what) and ``leaves`` (name -> value)."""

    def __init__(self, path: Path, stack: ExitStack) -> None:
        self.path = path
        self.tensors: dict[str, _Tensor] = {}
        self.leaves: dict[str, Any] = {}
        self._fetch: Callable[[list[str]], dict[str, torch.Tensor]]
        found = kinds.detect(path, operation="diff")
        if found.kind == kinds.SHARDED and not any(kinds.is_legacy_kind(k) for k in found.shard_kinds.values()):
            self._open_index(found, stack)
            return
        if found.kind not in (kinds.TORCHKEEP, kinds.SAFETENSORS):  # torch.save files, DCP directories
            self._open_whole(found)
            return
        ck = stack.enter_context(Checkpoint(found.target))
        self._specs = {k: (ck.spec(k), i) for i, k in enumerate(ck.keys())}
        self._fetch = ck.read
        self._index(ck.skeleton if ck.has_tree else None)

    def _open_index(self, found: kinds.Detected, stack: ExitStack) -> None:
        assert found.index is not None and found.file is not None  # set by detect() for sharded
        index = found.index
        shards: dict[str, Checkpoint] = {}
        owner: dict[str, Checkpoint] = {}
        self._specs = {}
        for name, file in index.weight_map.items():
            if file not in shards:
                shards[file] = stack.enter_context(Checkpoint(found.file.parent / file))
            owner[name] = shards[file]
            self._specs[name] = (shards[file].spec(name), len(self._specs))

        def fetch(keys: list[str]) -> dict[str, torch.Tensor]:
            out: dict[str, torch.Tensor] = {}
            for ck in {id(owner[k]): owner[k] for k in keys}.values():
                out.update(ck.read([k for k in keys if owner[k] is ck]))
            return out

        self._fetch = fetch
        self._index(index.metadata.get(TREE_KEY))

    def _open_whole(self, found: kinds.Detected) -> None:
        tree, _ = read_tree(found)  # torch.save files: weights_only=True, after the pickle scan
        flat = flatten(tree)
        stored = flat.tensors
        self._specs = {k: (_FakeSpec(k, t), i) for i, (k, t) in enumerate(stored.items())}
        self._fetch = lambda keys: {k: stored[k] for k in keys}
        self._index(flat.skeleton)

    def _index(self, skeleton: Any) -> None:
        if skeleton is None:
            nodes = {k: {"T": k} for k in self._specs}
        else:
            nodes = {}
            try:
                _walk(skeleton, (), nodes, self.leaves)
            except (SkeletonError, KeyError, TypeError, ValueError) as e:
                raise CorruptCheckpointError(self.path, f"the state tree is malformed ({e})") from None
        for name, n in nodes.items():
            key = n.get("T")
            if key not in self._specs:
                raise CorruptCheckpointError(self.path, f"the state tree refers to a missing tensor {key!r}")
            spec, order = self._specs[key]
            dtype = ST_TO_DTYPE[spec.dtype] if isinstance(spec.dtype, str) else spec.dtype
            view = n.get("v")
            shape = tuple(view[1]) if view is not None else tuple(spec.shape)
            nbytes = math.prod(shape) * dtype.itemsize
            self.tensors[name] = _Tensor(key, view, dtype, shape, nbytes, order)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        stored = self._fetch(sorted({self.tensors[n].key for n in names}, key=lambda k: self._specs[k][1]))
        out = {}
        for n in names:
            t = stored[self.tensors[n].key]
            view = self.tensors[n].view
            if view is not None:
                off, shape, stride = view
                t = t.as_strided(shape, stride, t.storage_offset() + off)
            out[n] = t
        return out


class _FakeSpec(NamedTuple):
    name: str
    tensor: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)


# -- comparing ------------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _compare(x: torch.Tensor, y: torch.Tensor, rtol: float, atol: float) -> tuple[bool, bool, float, float]:
    """``(bitwise_equal, within_tolerance, max_abs, rel_l2)``; float64 scratch in chunks of ``_CHUNK``."""
    if x.numel() == 0 or torch.equal(_bits(x), _bits(y)):
        return True, True, 0.0, 0.0
    wide = torch.complex128 if (x.is_complex() or y.is_complex()) else torch.float64
    xf, yf = x.reshape(-1), y.reshape(-1)
    max_abs, diff_sq, norm_sq, close = 0.0, 0.0, 0.0, True
    for i in range(0, xf.numel(), _CHUNK):
        a = xf[i : i + _CHUNK].to(wide)
        b = yf[i : i + _CHUNK].to(wide)
        d = (a - b).abs()
        # equal values (also inf == inf) and NaN in both places count as no difference
        d[(a == b) | (torch.isnan(a) & torch.isnan(b))] = 0
        m = d.max().item()
        max_abs = m if math.isnan(m) else max(max_abs, m)
        diff_sq += (d * d).sum().item()
        norm_sq += (torch.where(torch.isfinite(a), a, 0).abs() ** 2).sum().item()  # NaN/inf in A: norm of the rest
        if close:
            close = bool(((d == 0) | (d <= atol + rtol * b.abs())).all())
    rel = math.sqrt(diff_sq) / max(math.sqrt(norm_sq), _TINY) if not math.isnan(diff_sq) else math.nan
    return False, close, max_abs, rel


def _describe(t: _Tensor) -> str:
    return f"tensor{list(t.shape)} {str(t.dtype).removeprefix('torch.')}"


def _same_value(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    try:
        return bool(a == b) or repr(a) == repr(b)  # repr: nan == nan
    except Exception:
        return repr(a) == repr(b)


def diff(
    a: PathLike,
    b: PathLike,
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
    progress: Callable[[int], None] | None = None,
) -> DiffReport:
    """Compare two checkpoints: keys, shapes, dtypes, values and non-tensor entries.

    Reads torchkeep files, plain safetensors files, ``*.safetensors.index.json`` shard sets
    (one tensor batch of ~64 MiB per side in memory at a time; checksums verified) and legacy
    ``torch.save`` files (loaded whole, ``weights_only=True``). A tensor counts as changed when
    some element differs by more than ``atol + rtol * |b|``; the defaults (0, 0) report any
    numeric difference.

    Args:
        a, b: the two checkpoints.
        rtol, atol: tolerance, as in :func:`torch.allclose`.
        progress: called with the number of tensor bytes compared (both sides) after each batch.

    Returns:
        A :class:`DiffReport`; ``report.identical`` is the yes/no answer, ``print(report)`` a table.

    Example:
        >>> import torch, torchkeep as tk, tempfile, os
        >>> from torchkeep.diff import diff
        >>> d = tempfile.mkdtemp()
        >>> a = tk.save({"w": torch.zeros(3), "epoch": 1}, os.path.join(d, "a.safetensors"))
        >>> b = tk.save({"w": torch.tensor([0.0, 0.5, 0.0]), "epoch": 2}, os.path.join(d, "b.safetensors"))
        >>> r = diff(a, b)
        >>> r.identical, [(v.name, v.max_abs) for v in r.value_changed], r.leaf_changed[0].value_b
        (False, [('w', 0.5)], 2)
    """
    for name, tol in (("rtol", rtol), ("atol", atol)):
        try:
            if isinstance(tol, (bool, str, bytes)):
                raise TypeError
            value = float(tol)
        except (TypeError, ValueError):
            raise ArgumentTypeError(name, tol, f"a number, e.g. {name}=1e-5 (0 reports any difference)") from None
        if not value >= 0:  # NaN too
            raise InvalidArgumentError(name, tol, f"pass a number >= 0, e.g. {name}=1e-5 (0 reports any difference)")
    pa = as_path(a, "a")
    pb = as_path(b, "b")
    report = DiffReport(str(a), str(b), rtol=float(rtol), atol=float(atol))
    with ExitStack() as stack:
        sa = _Source(pa, stack)
        sb = _Source(pb, stack)
        names_a = set(sa.tensors) | set(sa.leaves)
        names_b = set(sb.tensors) | set(sb.leaves)
        report.only_a = sorted(names_a - names_b)
        report.only_b = sorted(names_b - names_a)
        common: list[str] = []
        for name in sorted(set(sa.tensors) & set(sb.tensors), key=lambda n: (sa.tensors[n].order, n)):
            ta, tb = sa.tensors[name], sb.tensors[name]
            if ta.shape != tb.shape:
                report.shape_changed.append(ShapeChange(name, ta.shape, tb.shape))
            elif ta.dtype != tb.dtype:
                report.dtype_changed.append(
                    DtypeChange(name, str(ta.dtype).removeprefix("torch."), str(tb.dtype).removeprefix("torch."))
                )
            else:
                common.append(name)
        report.shape_changed.sort()
        report.dtype_changed.sort()
        for name in sorted((names_a & names_b) - (set(sa.tensors) & set(sb.tensors))):
            va = _describe(sa.tensors[name]) if name in sa.tensors else sa.leaves[name]
            vb = _describe(sb.tensors[name]) if name in sb.tensors else sb.leaves[name]
            if _same_value(va, vb):
                report.equal_leaves += 1
            else:
                report.leaf_changed.append(LeafChange(name, va, vb))
        for batch in _batches(common, sa):
            xs, ys = sa.read(batch), sb.read(batch)
            for name in batch:
                same, close, max_abs, rel = _compare(xs[name], ys[name], report.rtol, report.atol)
                if same:
                    report.equal += 1
                elif close:
                    report.close += 1
                else:
                    report.value_changed.append(ValueChange(name, max_abs, rel))
            if progress is not None:
                progress(2 * sum(sa.tensors[n].nbytes for n in batch))
            del xs, ys
    return report


def _batches(names: list[str], source: _Source) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for n in names:
        nbytes = source.tensors[n].nbytes
        if batch and size + nbytes > _BATCH:
            yield batch
            batch, size = [], 0
        batch.append(n)
        size += nbytes
    if batch:
        yield batch


def report_json(report: DiffReport) -> str:
    """``report.to_dict()`` as indented JSON (what ``torchkeep diff --json`` prints)."""
    return json.dumps(report.to_dict(), indent=2, ensure_ascii=False)

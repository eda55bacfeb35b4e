"""Flatten a state tree into tensors plus a typed JSON skeleton, and back. Pure: no I/O.

Skeleton nodes (JSON):

====================  ==========================================================
``null/true/1/1.5/"s"``  ``None``, bools, ints, finite floats, strings as themselves
``{"f": "nan"}``         non-finite floats (``"nan"``, ``"inf"``, ``"-inf"``)
``{"l": [...]}``         list;  ``{"t": [...]}`` tuple
``{"d": {...}}``         dict with string keys (order kept)
``{"D": [[k, v], ...]}`` dict with any keys (ints, tuples, ...); keys are nodes too
``{"o": [[k, v]], "m": node}``  ``OrderedDict`` (``m``: ``state_dict()._metadata``)
``{"dt": "float32"}``    ``torch.dtype``; ``{"sz": [..]}`` ``torch.Size``; ``{"dev": "cuda:0"}`` device
``{"T": key, ...}``      tensor stored under ``key``; optional ``v`` = ``[offset, shape,
                         stride]`` view into it, ``dev`` original device, ``rg`` requires
                         grad, ``P`` ``nn.Parameter``, ``np`` NumPy array
``{"ns": dtype, "v": x}``  NumPy scalar
``{"G": device, "s": T}``  ``torch.Generator`` with its state tensor
``{"S": cls, "v": node}``  a Stateful leaf (``state_dict()`` output), ``cls`` for display
``{"V": kind, ...}``     an everyday Python value (Namespace, Path, set, datetime, Enum,
                         dataclass, ...): :mod:`torchkeep.values`
====================  ==========================================================

Example:
    >>> import torch
    >>> flat = flatten({"w": torch.zeros(2), "step": 3})
    >>> sorted(flat.tensors), flat.skeleton["d"]["step"]
    (['w'], 3)
    >>> unflatten(flat.skeleton, flat.tensors.__getitem__)["step"]
    3
"""

from __future__ import annotations

import math
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from torchkeep import values
from torchkeep.dtypes import DTYPE_TO_ST, dtype_from_name, dtype_name
from torchkeep.errors import TorchkeepError, UnsupportedDtypeError, UnsupportedObjectError
from torchkeep.format.limits import MAX_RANK, view_error

__all__ = [
    "Flat",
    "SkeletonError",
    "flatten",
    "format_path",
    "generator_keys",
    "is_stateful",
    "tensor_nodes",
    "unflatten",
]

Path = tuple[Any, ...]
_INT_DIGITS = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 0


class SkeletonError(ValueError):
    """The skeleton JSON is malformed (a corrupt or foreign file)."""


def is_stateful(obj: Any) -> bool:
    """True for objects with callable ``state_dict`` and ``load_state_dict`` (not classes)."""
    return (
        not isinstance(obj, type)
        and callable(getattr(obj, "state_dict", None))
        and callable(getattr(obj, "load_state_dict", None))
    )


def format_path(path: Path) -> str:
    """``("optimizer", "param_groups", 0, "foo")`` -> ``optimizer.param_groups[0].foo``."""
    out = ""
    for p in path:
        if isinstance(p, str) and p and "." not in p and "[" not in p:
            out += f".{p}" if out else p
        else:
            out += f"[{p!r}]"
    return out


def _component(p: Any) -> str:
    s = p if isinstance(p, str) else repr(p)
    return s.replace("%", "%25").replace("/", "%2F")


@dataclass
class Flat:
    """Result of :func:`flatten`: tensors to store (by key) and the JSON skeleton."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    skeleton: Any = None


@dataclass(slots=True)
class _Leaf:
    node: dict
    tensor: torch.Tensor
    path: Path


class _Flattener:
    def __init__(self) -> None:
        self.leaves: list[_Leaf] = []
        self.by_id: dict[int, dict] = {}
        self.names: set[str] = set()
        self.active: set[int] = set()

    def key_for(self, path: Path) -> str:
        try:
            key = "/".join(path)  # fast path: plain string components
            if "%" in key or any("/" in p for p in path):
                raise TypeError
        except TypeError:
            key = "/".join(_component(p) for p in path)
        key = key or "tensor"
        if key in self.names:
            i = 2
            while f"{key}~{i}" in self.names:
                i += 1
            key = f"{key}~{i}"
        self.names.add(key)
        return key

    def tensor(self, t: torch.Tensor, path: Path, extra: dict | None = None) -> dict:
        seen = self.by_id.get(id(t))
        if seen is not None:
            return seen
        if (
            t.layout is not torch.strided
            or t.dtype not in DTYPE_TO_ST
            or t.is_meta
            or t.is_nested
            or t.dim() > MAX_RANK
            or _is_wrapper(t)
        ):
            self._refuse(t, path)
        node: dict[str, Any] = {"T": None}
        if not t.is_cpu:
            node["dev"] = str(t.device)
        if t.requires_grad:
            node["rg"] = 1
            if isinstance(t, torch.nn.Parameter):
                node["P"] = 1
        elif type(t) is torch.nn.Parameter:
            node["P"] = 1
        if extra:
            node.update(extra)
        self.by_id[id(t)] = node
        self.leaves.append(_Leaf(node, t, path))
        return node

    @staticmethod
    def _refuse(t: torch.Tensor, path: Path) -> None:
        where = format_path(path)
        if _is_dtensor(t):
            raise UnsupportedObjectError(
                where,
                t,
                "a DTensor (an FSDP2 / tensor-parallel shard) holds only this rank's part of the tensor. Save a "
                "sharded model with torchkeep.distributed (tkd.save(state, directory) on every rank), or gather it "
                "first: t.full_tensor() / torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
                "options=StateDictOptions(full_state_dict=True)).",
            )
        if t.is_nested:
            raise UnsupportedObjectError(
                where, t, "a nested tensor has no single shape; save its parts instead: list(t.unbind()) ."
            )
        if _is_wrapper(t):
            raise UnsupportedObjectError(
                where,
                t,
                f"a tensor subclass ({type(t).__module__}.{type(t).__qualname__}) whose data torchkeep cannot read "
                "as plain memory; convert it to a plain tensor first (e.g. its dense or dequantized value).",
            )
        if t.dim() > MAX_RANK:
            raise UnsupportedObjectError(
                where, t, f"a tensor of {t.dim()} dimensions is over the limit of {MAX_RANK}; reshape it first."
            )
        if t.layout != torch.strided:
            raise UnsupportedObjectError(where, t, f"{t.layout} tensors are not supported; call .to_dense() first.")
        if t.is_quantized:
            raise UnsupportedObjectError(
                where,
                t,
                f"a quantized ({t.dtype}) tensor keeps its scales and zero points in packed objects that a "
                "pickle-free file cannot represent. Save the float model and quantize after loading "
                "(tk.save_model(model, path); qmodel, _ = tk.quantize(tk.load_model(path))): the int8 weights "
                "come out identical; or ship it as an artifact with tk.export(qmodel, x, 'model.pt').",
            )
        if t.dtype not in DTYPE_TO_ST:
            raise UnsupportedDtypeError(where, t.dtype)
        raise UnsupportedObjectError(where, t, "a meta tensor has no data; materialise it (e.g. .to_empty()) first.")

    def encode(self, obj: Any, path: Path) -> Any:
        if isinstance(obj, torch.Tensor):  # first: the common case in large trees
            return self.tensor(obj, path)
        if obj is None or obj is True or obj is False:
            return obj
        if type(obj) is str:
            return _check_str(obj, path)
        if type(obj) is int:
            if obj.bit_length() > 3 * _INT_DIGITS > 0:
                _check_int(obj, path)
            return obj
        if type(obj) is float:
            return obj if math.isfinite(obj) else {"f": repr(obj)}
        if isinstance(obj, torch.dtype):
            return {"dt": dtype_name(obj)}
        if isinstance(obj, torch.Size):
            return {"sz": list(obj)}
        if isinstance(obj, torch.device):
            return {"dev": str(obj)}
        if isinstance(obj, np.ndarray):
            if obj.dtype.kind not in "biufc" or not obj.dtype.isnative:
                raise UnsupportedObjectError(
                    format_path(path), obj, f"NumPy arrays of dtype {obj.dtype.str} are not supported."
                )
            # not np.ascontiguousarray: it turns a 0-d array into shape (1,)
            arr = obj if obj.flags.c_contiguous else np.array(obj, order="C")
            with warnings.catch_warnings():  # a read-only array: we only ever read it
                warnings.simplefilter("ignore", UserWarning)
                t = torch.from_numpy(arr)
            return self.tensor(t, path, {"np": 1})
        if isinstance(obj, np.generic) and obj.dtype.kind in "biuf":
            value = obj.item()
            if isinstance(value, np.generic):  # longdouble has no Python equivalent: .item() returns itself
                raise UnsupportedObjectError(format_path(path), obj, f"NumPy {obj.dtype} scalars are not supported.")
            return {"ns": obj.dtype.name, "v": self.encode(value, path)}
        if isinstance(obj, torch.Generator):
            state = obj.get_state()
            return {"G": str(obj.device), "s": self.tensor(state, (*path, "state"))}
        oid = id(obj)
        if oid in self.active:
            raise UnsupportedObjectError(format_path(path), obj, "the tree contains a reference cycle.")
        self.active.add(oid)
        try:
            return self._container(obj, path)
        finally:
            self.active.discard(oid)

    def _container(self, obj: Any, path: Path) -> Any:
        if type(obj) is list:
            return {"l": [self.encode(v, (*path, i)) for i, v in enumerate(obj)]}
        if type(obj) is tuple:
            return {"t": [self.encode(v, (*path, i)) for i, v in enumerate(obj)]}
        if isinstance(obj, OrderedDict):
            node: dict[str, Any] = {"o": [[self.encode(k, path), self.encode(v, (*path, k))] for k, v in obj.items()]}
            meta = getattr(obj, "_metadata", None)
            if meta is not None:
                node["m"] = self.encode(meta, (*path, "_metadata"))
            return node
        if type(obj) is dict:
            if all(type(k) is str for k in obj):
                return {"d": {_check_str(k, path): self.encode(v, (*path, k)) for k, v in obj.items()}}
            return {"D": [[self.encode(k, path), self.encode(v, (*path, k))] for k, v in obj.items()]}
        if is_stateful(obj):
            cls = type(obj)
            try:
                state = obj.state_dict()
            except Exception as e:  # refused here, naming the place, before anything is written
                raise UnsupportedObjectError(
                    format_path(path),
                    obj,
                    f"its state_dict() raised {type(e).__name__}: {str(e).strip()[:200]}. Save what it holds "
                    "instead, or leave it out of the tree.",
                ) from e
            return {"S": f"{cls.__module__}.{cls.__qualname__}", "v": self.encode(state, path)}
        node = values.encode(obj, self.encode, path)
        if node is not None:
            return node
        raise UnsupportedObjectError(format_path(path), obj)

    def resolve(self) -> dict[str, torch.Tensor]:
        """Name stored tensors; tensors sharing storage become views of one stored tensor."""
        groups: dict[tuple[Any, int], list[_Leaf]] = {}
        for leaf in self.leaves:
            t = leaf.tensor
            # the address where the tensor's storage begins identifies the storage
            base = t.data_ptr() - t.storage_offset() * t.element_size() if t.numel() else 0
            # a conj/neg view shares memory with its source but not its values: store it on its own
            if base == 0 or t.is_conj() or t.is_neg():
                groups[(None, id(leaf))] = [leaf]
            else:
                groups.setdefault((t.get_device(), base), []).append(leaf)
        out: dict[str, torch.Tensor] = {}
        for members in groups.values():
            base = _covering(members) if len(members) > 1 else None
            if base is None:
                for leaf in members:
                    key = self.key_for(leaf.path)
                    leaf.node["T"] = key
                    out[key] = leaf.tensor
                continue
            key = self.key_for(base.path)
            out[key] = base.tensor
            b = base.tensor
            for leaf in members:
                leaf.node["T"] = key
                if leaf is base:
                    continue
                t = leaf.tensor
                if t.storage_offset() == b.storage_offset() and t.shape == b.shape and t.stride() == b.stride():
                    continue
                if t.numel() > b.numel():
                    # an expanded view (a stride of 0) holds more elements than the bytes it reads: it is stored
                    # as a tensor of its own, so a view read back never asks for more memory than the file holds
                    key = self.key_for(leaf.path)
                    leaf.node["T"] = key
                    out[key] = t
                    continue
                leaf.node["v"] = [t.storage_offset() - b.storage_offset(), list(t.shape), list(t.stride())]
        return out


def _is_dtensor(t: torch.Tensor) -> bool:
    mod = sys.modules.get("torch.distributed.tensor")  # a DTensor exists only once its module is loaded
    cls = getattr(mod, "DTensor", None) if mod is not None else None
    return cls is not None and isinstance(t, cls)


def _is_wrapper(t: torch.Tensor) -> bool:
    """A tensor subclass that redefines dispatch (DTensor, fake, functional...): no plain memory to write."""
    cls = type(t)
    return (
        cls is not torch.Tensor
        and cls is not torch.nn.Parameter
        and getattr(cls, "__torch_dispatch__", None) is not _PLAIN_DISPATCH
    )


_PLAIN_DISPATCH = torch.Tensor.__torch_dispatch__


def _check_int(i: int, path: Path) -> None:
    try:
        str(i)  # json writes (and reads back) ints through str: bounded by int_max_str_digits
    except ValueError:
        raise UnsupportedObjectError(
            format_path(path), i, f"ints longer than {_INT_DIGITS} digits cannot be stored; store str(value)."
        ) from None


def _check_str(s: str, path: Path) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsupportedObjectError(
            format_path(path), s, f"the string {s[:40]!r} is not valid Unicode (a lone surrogate); it cannot be UTF-8."
        ) from None
    return s


def _covering(members: list[_Leaf]) -> _Leaf | None:
    """The contiguous member whose bytes cover every other member of a shared storage."""
    dtype = members[0].tensor.dtype
    if any(m.tensor.dtype != dtype for m in members):
        return None
    spans = []
    for m in members:
        t = m.tensor
        lo = t.storage_offset()
        hi = lo + 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True) if s > 0)
        spans.append((lo, hi))
    for m, (lo, hi) in zip(members, spans, strict=True):
        if m.tensor.is_contiguous() and all(lo <= a and b <= hi for a, b in spans):
            return m
    return None


def flatten(obj: Any) -> Flat:
    """Split a state tree into ``{key: tensor}`` and a JSON-able skeleton.

    Stateful leaves are replaced by their ``state_dict()``. Tensors that share storage
    are stored once when one of them covers the others (tied weights, a view and its
    base); the others become views of it.

    Raises:
        UnsupportedObjectError: a leaf that cannot be represented, naming its path.
        UnsupportedDtypeError: a tensor dtype safetensors cannot hold.
    """
    f = _Flattener()
    skeleton = f.encode(obj, ())
    return Flat(tensors=f.resolve(), skeleton=skeleton)


def _nodes(skeleton: Any, hit: Callable[[dict], bool]) -> list[dict]:
    """The dict nodes of a skeleton for which ``hit`` is true, depth first (not looking inside them)."""
    out: list[dict] = []

    def walk(n: Any) -> None:
        if isinstance(n, list):
            for v in n:
                if isinstance(v, (dict, list)):  # not into the numbers and strings, most of a skeleton
                    walk(v)
        elif isinstance(n, dict):
            if hit(n):
                out.append(n)
                return
            for v in n.values():
                if isinstance(v, (dict, list)):
                    walk(v)

    walk(skeleton)
    return out


def tensor_nodes(skeleton: Any) -> list[dict]:
    """Every tensor node of a skeleton (for inspection), depth first."""
    return _nodes(skeleton, lambda n: "T" in n)


def generator_keys(skeleton: Any) -> list[str]:
    """Stored names of the ``torch.Generator`` states in a skeleton (``{"G": dev, "s": {"T": key}}``).

    Example:
        >>> generator_keys({"d": {"rng": {"G": "cpu", "s": {"T": "rng/state"}}, "w": {"T": "w"}}})
        ['rng/state']
    """

    def generator(n: dict) -> bool:
        return "G" in n and isinstance(n.get("s"), dict) and isinstance(n["s"].get("T"), str)

    return [n["s"]["T"] for n in _nodes(skeleton, generator)]


def unflatten(
    skeleton: Any,
    get: Callable[[str], torch.Tensor],
    place: Callable[[torch.Tensor, str | None], torch.Tensor] | None = None,
) -> Any:
    """Rebuild a tree from its skeleton.

    Args:
        skeleton: the JSON skeleton from :func:`flatten`.
        get: ``key -> tensor`` (CPU) for stored tensors; called once per key.
        place: ``(tensor, original_device or None) -> tensor`` to move tensors
            (``map_location``); identity when omitted.

    Raises:
        SkeletonError: malformed skeleton.
    """
    cache: dict[str, torch.Tensor] = {}

    def stored(key: Any, dev: str | None) -> torch.Tensor:
        if not isinstance(key, str):
            raise SkeletonError(f"bad tensor reference {key!r}")
        ck = f"{key}\x00{dev}"
        t = cache.get(ck)
        if t is None:
            t = get(key)
            if place is not None:
                t = place(t, dev)
            cache[ck] = t
        return t

    def tensor(n: dict) -> torch.Tensor:
        t = stored(n["T"], n.get("dev"))
        view = n.get("v")
        if view is not None:
            problem = view_error(t.numel(), *view) if isinstance(view, list) and len(view) == 3 else "not a view"
            if problem:  # checked before anything is built from it: a view never reaches past its tensor
                raise SkeletonError(f"bad view {str(view)[:80]} of {str(n['T'])[:80]!r}: {problem}")
            off, shape, stride = view
            try:
                t = t.as_strided(shape, stride, t.storage_offset() + off)
            except (TypeError, ValueError, RuntimeError) as e:
                raise SkeletonError(f"bad view {str(view)[:80]} of {str(n['T'])[:80]!r}: {e}") from None
        if n.get("np"):  # a numpy array lives in host memory, wherever map_location sent the tensors
            return (t if t.is_cpu else t.cpu()).numpy()
        if n.get("P"):
            return torch.nn.Parameter(t, requires_grad=bool(n.get("rg")))
        if n.get("rg") and (t.is_floating_point() or t.is_complex()):
            # a new tensor object: the cached one may also be handed out without requires_grad
            t = t.detach().requires_grad_(True)
        return t

    def dec(n: Any) -> Any:
        if n is None or isinstance(n, (bool, int, float, str)):
            return n
        if isinstance(n, dict):
            if "V" in n:  # first: its other keys ("v", "m", "c") mean something else there
                return values.decode(n, dec)
            if "d" in n:
                return {k: dec(v) for k, v in n["d"].items()}
            if "l" in n:
                return [dec(v) for v in n["l"]]
            if "t" in n:
                return tuple(dec(v) for v in n["t"])
            if "T" in n:
                return tensor(n)
            if "D" in n:
                return {_key(dec(k)): dec(v) for k, v in n["D"]}
            if "o" in n:
                od: OrderedDict = OrderedDict((_key(dec(k)), dec(v)) for k, v in n["o"])
                if "m" in n:
                    od._metadata = dec(n["m"])  # type: ignore[attr-defined]
                return od
            if "f" in n:
                return float(n["f"])
            if "dt" in n:
                return dtype_from_name(n["dt"])
            if "sz" in n:
                return torch.Size(n["sz"])
            if "dev" in n:
                return torch.device(n["dev"])
            if "ns" in n:
                return np.dtype(n["ns"]).type(dec(n["v"]))
            if "S" in n:
                return dec(n["v"])
            if "G" in n:
                state = stored(n["s"]["T"], None)
                try:
                    g = torch.Generator(device=n["G"])
                except RuntimeError:
                    g = torch.Generator()
                g.set_state(state.cpu() if g.device.type == "cpu" else state)
                return g
        raise SkeletonError(f"unknown skeleton node {str(n)[:80]}")

    try:
        return dec(skeleton)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, RecursionError, ArithmeticError) as e:
        if isinstance(e, (SkeletonError, TorchkeepError)):  # e.g. DeviceUnavailableError from place()
            raise
        raise SkeletonError(f"malformed skeleton: {e!r}") from None


def _key(k: Any) -> Any:
    if isinstance(k, list):  # never produced; tuples are the hashable sequence
        raise SkeletonError("a dict key decoded to a list")
    return k

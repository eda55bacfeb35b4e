"""Everyday Python values in a state tree, without pickle: hyperparameters as people write them.

Each value becomes one typed JSON node ``{"V": kind, ...}`` of the skeleton (:mod:`torchkeep.tree`):

==============================================  ============================================================
value                                           node
==============================================  ============================================================
``argparse.Namespace``                          ``{"V": "namespace", "v": <dict node>}``
``pathlib.Path`` / ``Pure*Path``                ``{"V": "path", "k": "PurePosixPath", "v": "runs/a"}``
``set`` / ``frozenset``                         ``{"V": "set"|"frozenset", "v": [items]}`` (sorted when sortable)
``datetime`` / ``date`` / ``time``              ``{"V": "datetime"|..., "v": ISO 8601 (with its UTC offset)}``
``timedelta``                                   ``{"V": "timedelta", "v": [days, seconds, microseconds]}``
``uuid.UUID`` / ``Decimal`` / ``Fraction``      ``{"V": "uuid"|"decimal"|"fraction", "v": "text"}``
``complex`` / ``bytes`` / ``bytearray``         ``{"V": "complex", "v": [re, im]}``, ``{"V": "bytes", "v": base64}``
``collections.deque`` / ``Counter``             ``{"V": "deque", "m": maxlen, "v": [...]}``, ``{"V": "counter", ...}``
``defaultdict`` with a builtin factory          ``{"V": "defaultdict", "df": "list", "v": <dict>}``
``Enum`` member                                 ``{"V": "enum", "c": "pkg.Color", "n": "RED", "v": value}``
dataclass instance                              ``{"V": "dataclass", "c": "pkg.Config", "v": <dict node>}``
``NamedTuple`` instance                         ``{"V": "namedtuple", "c": "pkg.Pair", "f": [names], "v": [...]}``
==============================================  ============================================================

Standard-library values come back as themselves. User classes (enums, dataclasses, named
tuples) are never imported by the name in the file: they come back as themselves when the
class is registered with :func:`register_type`, and otherwise as a stand-in, with a
:class:`UnregisteredTypeWarning` naming the class: an enum member as its value, a dataclass as
a dict of its fields, a named tuple as a ``collections.namedtuple`` of the same name and fields.

Example:
    >>> import argparse, pathlib
    >>> from torchkeep.tree import flatten, unflatten
    >>> hp = argparse.Namespace(lr=0.1, out=pathlib.Path("runs/a"), tags={"b", "a"})
    >>> back = unflatten(flatten({"hp": hp}).skeleton, lambda k: None)["hp"]
    >>> back == hp
    True
"""

from __future__ import annotations

import argparse
import base64
import collections
import dataclasses
import datetime as dt
import enum
import fractions
import pathlib
import uuid
import warnings
from collections.abc import Callable
from decimal import Decimal
from typing import Any, TypeVar

from torchkeep.errors import ArgumentTypeError, InvalidArgumentError

__all__ = ["UnregisteredTypeWarning", "decode", "encode", "register_type", "registered_types"]

T = TypeVar("T", bound=type)

#: registered user classes, by "module.qualname" (what the file records)
_TYPES: dict[str, type] = {}
_PATHS: dict[str, type] = {
    c.__name__: c for c in (pathlib.Path, pathlib.PurePath, pathlib.PurePosixPath, pathlib.PureWindowsPath)
}
_FACTORIES: dict[str, Any] = {"list": list, "dict": dict, "set": set, "int": int, "float": float, "str": str}
_FACTORIES.update({"tuple": tuple, "None": None})
_FACTORY_NAMES = {v: k for k, v in _FACTORIES.items()}
_TIMES = {"datetime": dt.datetime, "date": dt.date, "time": dt.time}


class UnregisteredTypeWarning(UserWarning):
    """A file holds an instance of a class that is not registered: it loads as a plain stand-in.

    Example:
        >>> import warnings
        >>> warnings.simplefilter("error", UnregisteredTypeWarning)  # make a stand-in an error
        >>> warnings.resetwarnings()
    """


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_type(cls: T) -> T:
    """Register a dataclass, ``Enum`` or ``NamedTuple`` class so that loading returns its instances.

    Files record the class by ``module.qualname``; loading never imports it: only registered
    classes are rebuilt (others come back as plain stand-ins, with a warning). Use as a
    decorator or a call; registering the same class again is a no-op.

    Example:
        >>> import dataclasses, torchkeep as tk
        >>> @tk.register_type
        ... @dataclasses.dataclass
        ... class Opt:
        ...     lr: float = 0.1
        >>> Opt.__name__
        'Opt'

    Raises:
        ArgumentTypeError: ``cls`` is not a class.
        InvalidArgumentError: it is not a dataclass, an Enum or a NamedTuple, or another class
            is registered under the same name.
    """
    if not isinstance(cls, type):
        raise ArgumentTypeError("register_type(cls)", cls, "a class (a dataclass, an Enum or a NamedTuple)")
    if not (dataclasses.is_dataclass(cls) or issubclass(cls, enum.Enum) or _is_namedtuple_class(cls)):
        raise InvalidArgumentError(
            "register_type(cls)",
            cls,
            "only dataclasses, Enum classes and NamedTuple classes are rebuilt from their fields; give other "
            "classes state_dict()/load_state_dict() to save them as Stateful objects",
        )
    name = _name(cls)
    other = _TYPES.get(name)
    if other is not None and other is not cls:
        raise InvalidArgumentError("register_type(cls)", cls, f"another class is registered as {name!r}")
    _TYPES[name] = cls
    return cls


def registered_types() -> dict[str, type]:
    """The registered classes by the name files record them under."""
    return dict(_TYPES)


def _is_namedtuple_class(cls: type) -> bool:
    return issubclass(cls, tuple) and isinstance(getattr(cls, "_fields", None), tuple)


def _sorted(items: Any) -> list[Any]:
    """Set members in a stable order (files are reproducible); insertion order when unorderable."""
    items = list(items)
    try:
        return sorted(items)
    except TypeError:
        return sorted(items, key=repr)


def encode(obj: Any, enc: Callable[[Any, tuple[Any, ...]], Any], path: tuple[Any, ...]) -> dict[str, Any] | None:
    """The node of an everyday value, or ``None`` when ``obj`` is none of them.

    ``enc(value, path)`` encodes nested values (dict nodes, items, fields) with the tree's rules.
    """
    if isinstance(obj, enum.Enum):  # first: an IntEnum is also an int, a StrEnum a str
        cls = type(obj)
        return {"V": "enum", "c": _name(cls), "n": obj.name, "v": enc(obj.value, (*path, obj.name))}
    if isinstance(obj, argparse.Namespace):
        return {"V": "namespace", "v": enc(dict(vars(obj)), path)}
    if isinstance(obj, pathlib.Path):  # PosixPath / WindowsPath: the native kind on load
        return {"V": "path", "k": "Path", "v": str(obj)}
    if isinstance(obj, pathlib.PurePath):
        kind = next(c.__name__ for c in (pathlib.PurePosixPath, pathlib.PureWindowsPath) if isinstance(obj, c))
        return {"V": "path", "k": kind, "v": str(obj)}
    if isinstance(obj, (set, frozenset)):
        kind = "frozenset" if isinstance(obj, frozenset) else "set"
        return {"V": kind, "v": [enc(v, (*path, i)) for i, v in enumerate(_sorted(obj))]}
    for kind, cls in _TIMES.items():
        if type(obj) is cls:
            return {"V": kind, "v": obj.isoformat()}
    if type(obj) is dt.timedelta:
        return {"V": "timedelta", "v": [obj.days, obj.seconds, obj.microseconds]}
    if type(obj) is uuid.UUID:
        return {"V": "uuid", "v": str(obj)}
    if type(obj) is Decimal:
        return {"V": "decimal", "v": str(obj)}
    if type(obj) is fractions.Fraction:
        return {"V": "fraction", "v": str(obj)}
    if type(obj) is complex:
        return {"V": "complex", "v": [enc(obj.real, path), enc(obj.imag, path)]}
    if type(obj) in (bytes, bytearray):
        return {"V": type(obj).__name__, "v": base64.b64encode(obj).decode("ascii")}
    if type(obj) is collections.deque:
        return {"V": "deque", "m": obj.maxlen, "v": [enc(v, (*path, i)) for i, v in enumerate(obj)]}
    if type(obj) is collections.Counter:
        return {"V": "counter", "v": enc(dict(obj), path)}
    if type(obj) is collections.defaultdict:
        factory = obj.default_factory
        if factory not in _FACTORY_NAMES:
            return None  # refused by the caller, naming the path
        return {"V": "defaultdict", "df": _FACTORY_NAMES[factory], "v": enc(dict(obj), path)}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        return {"V": "dataclass", "c": _name(type(obj)), "v": enc(fields, path)}
    if isinstance(obj, tuple) and _is_namedtuple_class(type(obj)):
        cls = type(obj)
        return {
            "V": "namedtuple",
            "c": _name(cls),
            "f": list(cls._fields),  # type: ignore[attr-defined]
            "v": [enc(v, (*path, f)) for f, v in zip(cls._fields, obj, strict=True)],  # type: ignore[attr-defined]
        }
    return None


def _stand_in(cls_name: str, what: str) -> None:
    warnings.warn(
        f"{cls_name} is not registered: loaded as {what}. Register the class before loading to get its "
        f"instances back: torchkeep.register_type({cls_name.rsplit('.', 1)[-1]})",
        UnregisteredTypeWarning,
        stacklevel=4,
    )


def decode(n: dict[str, Any], dec: Callable[[Any], Any]) -> Any:
    """The value of a ``{"V": ...}`` node; ``dec`` decodes nested nodes.

    Raises:
        ValueError: an unknown or malformed node (the tree reader reports the file as damaged).
    """
    kind = n["V"]
    v = n.get("v")
    if kind == "namespace":
        return argparse.Namespace(**dec(v))
    if kind == "path":
        return _PATHS[n["k"]](v)
    if kind in ("set", "frozenset"):
        items = [dec(x) for x in v]
        return set(items) if kind == "set" else frozenset(items)
    if kind in _TIMES:
        return _TIMES[kind].fromisoformat(v)
    if kind == "timedelta":
        days, seconds, micros = v
        return dt.timedelta(days=days, seconds=seconds, microseconds=micros)
    if kind == "uuid":
        return uuid.UUID(v)
    if kind == "decimal":
        return Decimal(v)
    if kind == "fraction":
        return fractions.Fraction(v)
    if kind == "complex":
        return complex(dec(v[0]), dec(v[1]))
    if kind in ("bytes", "bytearray"):
        raw = base64.b64decode(v.encode("ascii"), validate=True)
        return raw if kind == "bytes" else bytearray(raw)
    if kind == "deque":
        return collections.deque((dec(x) for x in v), n.get("m"))
    if kind == "counter":
        return collections.Counter(dec(v))
    if kind == "defaultdict":
        return collections.defaultdict(_FACTORIES[n["df"]], dec(v))
    if kind == "enum":
        cls = _TYPES.get(n["c"])
        if cls is not None:
            return cls[n["n"]]
        _stand_in(n["c"], f"its value ({n['n']})")
        return dec(v)
    if kind == "dataclass":
        fields = dec(v)
        cls = _TYPES.get(n["c"])
        if cls is not None:
            init = {f.name: fields[f.name] for f in dataclasses.fields(cls) if f.init and f.name in fields}
            obj = cls(**init)
            for f in dataclasses.fields(cls):
                if not f.init and f.name in fields:
                    object.__setattr__(obj, f.name, fields[f.name])
            return obj
        _stand_in(n["c"], "a dict of its fields")
        return fields
    if kind == "namedtuple":
        items = [dec(x) for x in v]
        cls = _TYPES.get(n["c"])
        if cls is None:
            _stand_in(n["c"], "a collections.namedtuple of the same fields")
            cls = collections.namedtuple(n["c"].rsplit(".", 1)[-1], n["f"])  # type: ignore[misc]
        return cls(*items)
    raise ValueError(f"unknown value node {kind!r}")

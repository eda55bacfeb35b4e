"""register_model / save_model / load_model: whole-model files without pickle.

A registered class records the constructor arguments each instance was built with;
:func:`save_model` writes them, the registry name and version and the weights into one
torchkeep file; :func:`load_model` rebuilds the model from that record, by name, without
unpickling anything and without the training script.

File layout (single file): the state tree is ``{"model": <state dict>}`` and the header
metadata key ``torchkeep.model`` holds JSON::

    {"name": "tiny-net", "version": 1, "class": "pkg.models.TinyNet", "training": false,
     "config": {...plain JSON view...}, "config_typed": <typed skeleton (tuples, dtypes)>,
     "torchkeep_version": "..."}

Directory layout (``save_model(model, "out/")``): ``config.json`` (the same record) and
``model.safetensors`` (flat state-dict names), or ``model-0000i-of-0000N.safetensors`` +
``model.safetensors.index.json`` above ``max_shard_size``.

Discovery order in :func:`load_model`: the in-process registry, then the ``torchkeep.models``
entry-point group of installed packages (``name = "pkg.module:Class"``), then, only with
``allow_import=True``, the import path recorded in the file.

Versions: a file written by a newer ``version`` than the registered class raises
:class:`~torchkeep.errors.ModelVersionError`. A file from an older version is passed to the
class's ``upgrade(config, state_dict, from_version) -> (config, state_dict)`` classmethod
when the class defines one (otherwise it is loaded as is, strictly).

Example:
    >>> import torch, torchkeep as tk, tempfile, os
    >>> @tk.register_model("doc-mlp")
    ... class MLP(torch.nn.Module):
    ...     def __init__(self, sizes=(4, 8, 2), act="relu"):
    ...         super().__init__()
    ...         self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
    >>> p = tk.save_model(MLP(sizes=(3, 5, 1)), os.path.join(tempfile.mkdtemp(), "mlp.safetensors"))
    >>> m = tk.load_model(p)
    >>> type(m).__name__, m.layers[0].in_features
    ('MLP', 3)
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from torchkeep import kinds, pretrained
from torchkeep._version import __version__
from torchkeep.construct import build
from torchkeep.errors import (
    ArgumentTypeError,
    CorruptCheckpointError,
    InvalidArgumentError,
    ModelVersionError,
    UnknownModelError,
    UnsupportedObjectError,
    UnsupportedSourceError,
)
from torchkeep.format.meta import MODEL_KEY, TREE_KEY, USER_KEY, tree_json, user_json
from torchkeep.format.shards import parse_size
from torchkeep.headers import HeaderFile
from torchkeep.loading import load_into
from torchkeep.runtime import paused_gc
from torchkeep.sources import open_source
from torchkeep.storage.paths import as_path
from torchkeep.tree import flatten, format_path, unflatten
from torchkeep.writer import provenance_metadata, write_file, write_model_dir

__all__ = [
    "ENTRY_POINT_GROUP",
    "MODEL_KEY",
    "load_model",
    "model_record",
    "register_model",
    "registered_names",
    "save_model",
]

ENTRY_POINT_GROUP = "torchkeep.models"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_ATTR = "_torchkeep_init"

PathLike = str | os.PathLike[str]
M = TypeVar("M", bound=type)


class _Entry:
    __slots__ = ("cls", "name", "version")

    def __init__(self, name: str, cls: type, version: int) -> None:
        self.name, self.cls, self.version = name, cls, version


_REGISTRY: dict[str, _Entry] = {}


class _InitArgs:
    """Constructor arguments of one instance. Kept out of the way of pickle and deepcopy:
    unpicklable or tensor arguments are dropped when pickling (never making pickle fail)."""

    __slots__ = ("arguments",)

    def __init__(self, arguments: dict[str, Any] | None) -> None:
        self.arguments = arguments

    def __reduce__(self) -> tuple[Any, ...]:
        try:
            _check_config(self.arguments or {}, ())
            return (_InitArgs, (self.arguments,))
        except UnsupportedObjectError:
            return (_InitArgs, (None,))

    def __deepcopy__(self, memo: dict[int, Any]) -> _InitArgs:
        import copy

        try:
            return _InitArgs(copy.deepcopy(self.arguments, memo))
        except Exception:  # an argument that cannot be copied: the copy just cannot be save_model'd
            return _InitArgs(None)


def _wrap_init(cls: type) -> None:
    original = cls.__dict__.get("__init__", cls.__init__)
    if getattr(original, "_torchkeep_wrapped", None) is cls:
        return
    sig = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if type(self) is cls:  # a subclass's super().__init__() call does not describe the instance
            try:
                bound = sig.bind(self, *args, **kwargs)
                bound.apply_defaults()
                arguments = dict(list(bound.arguments.items())[1:])
            except TypeError:
                arguments = None
            object.__setattr__(self, _ATTR, _InitArgs(arguments))

    __init__._torchkeep_wrapped = cls  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[misc]


def register_model(name: str | type | None = None, *, version: int = 1) -> Any:
    """Class decorator: instances record their constructor arguments so that
    :func:`load_model` can rebuild them by ``name`` from a file.

    The class behaves, pickles, deep-copies and compiles as before. Constructor arguments
    must be JSON-like (numbers, strings, bools, None, lists, tuples, dicts, dtypes, devices);
    otherwise define ``to_config(self) -> dict`` and ``from_config(cls, config)`` (classmethod).
    An optional ``upgrade(cls, config, state_dict, from_version) -> (config, state_dict)``
    classmethod migrates files saved with an older ``version``.

    Args:
        name: registry name; default the class's ``module.QualName``. ``@register_model``
            without parentheses works too.
        version: integer version of the class's config/weights layout (default 1).

    Example:
        >>> import torch, torchkeep as tk
        >>> @tk.register_model("doc-linear", version=2)
        ... class Lin(torch.nn.Module):
        ...     def __init__(self, n, bias=True):
        ...         super().__init__()
        ...         self.fc = torch.nn.Linear(n, n, bias=bias)
        >>> tk.registry.model_record(Lin(3))["config"]
        {'n': 3, 'bias': True}
    """
    if isinstance(name, type):  # used bare: @register_model
        return register_model(None, version=version)(name)
    if name is not None and not isinstance(name, str):
        raise ArgumentTypeError("name", name, 'a string such as "my-net", or None for the class\'s module.QualName')
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArgumentTypeError("version", version, "a non-negative int, e.g. version=2")
    if version < 0:
        raise InvalidArgumentError("version", version, "pass a non-negative int, e.g. version=1 (the default)")

    def decorate(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            raise ArgumentTypeError(
                "the class decorated by register_model",
                cls,
                "an nn.Module subclass (decorate the class, not an instance)",
            )
        key = name or f"{cls.__module__}.{cls.__qualname__}"
        old = _REGISTRY.get(key)
        if old is not None and old.cls is not cls and old.cls.__qualname__ != cls.__qualname__:
            raise InvalidArgumentError(
                "name",
                key,
                f"already registered to {_path(old.cls)}; choose another name for {_path(cls)}, "
                f'e.g. @register_model("{key}-{cls.__name__.lower()}")',
            )
        _wrap_init(cls)
        cls._torchkeep_name = key  # type: ignore[attr-defined]
        cls._torchkeep_version = version  # type: ignore[attr-defined]
        _REGISTRY[key] = _Entry(key, cls, version)
        return cls

    return decorate


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# -- configs ---------------------------------------------------------------------------------


def _check_config(value: Any, path: tuple[Any, ...]) -> None:
    """Raise UnsupportedObjectError at the first value that a JSON header cannot hold."""
    if value is None or type(value) in (bool, int, float, str) or isinstance(value, (torch.dtype, torch.device)):
        return
    if type(value) in (list, tuple):
        for i, v in enumerate(value):
            _check_config(v, (*path, i))
        return
    if type(value) is dict:
        for k, v in value.items():
            if not (k is None or type(k) in (bool, int, float, str)):
                _refuse(path, k)
            _check_config(v, (*path, k))
        return
    _refuse(path, value)


def _refuse(path: tuple[Any, ...], value: Any) -> None:
    what = "a tensor (store it as a buffer or parameter instead)" if isinstance(value, torch.Tensor) else ""
    raise UnsupportedObjectError(
        f"config.{format_path(path)}",
        value,
        f"Constructor argument {format_path(path[:1])!r} {what or 'is not JSON-like'}: save_model records numbers, "
        "strings, bools, None, lists, tuples, dicts, dtypes and devices. Define to_config(self) -> dict and a "
        "classmethod from_config(cls, config) on the class to describe it with such values.",
    )


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile
        if isinstance(inner, torch.nn.Module):
            model = inner
        elif isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def _encode(config: dict[str, Any]) -> tuple[Any, Any]:
    """``(plain JSON view, typed skeleton)`` of a validated config."""
    typed = flatten(config).skeleton

    def plain(v: Any) -> Any:
        if isinstance(v, (torch.dtype, torch.device)):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        return v

    return plain(config), typed


def _decode(record: Mapping[str, Any]) -> dict[str, Any]:
    if "config_typed" in record:

        def no_tensor(key: str) -> torch.Tensor:
            raise ValueError(f"a model config refers to tensor {key!r}")

        return unflatten(record["config_typed"], no_tensor)
    return dict(record.get("config") or {})


def model_record(model: torch.nn.Module) -> dict[str, Any]:
    """The JSON record :func:`save_model` writes for ``model`` (name, version, class, config, training).

    Raises:
        UnknownModelError: the model's class is not registered.
        UnsupportedObjectError: a constructor argument cannot be recorded (names it).
    """
    model = _unwrap(model)
    cls = type(model)
    name = cls.__dict__.get("_torchkeep_name")
    lib = pretrained.library_of(model)
    if lib is not None:  # rebuilt from its own config by its library; a registered subclass keeps its name
        rec = pretrained.record(model, lib)
        if name is not None:
            rec.update(name=name, version=cls._torchkeep_version)
        return rec
    if name is None:
        raise UnknownModelError(
            _path(cls),
            sorted(_REGISTRY),
            detail=f'{_path(cls)} is not registered; decorate it with @torchkeep.register_model("name")',
        )
    to_config = getattr(model, "to_config", None)
    if callable(to_config):
        config = to_config()
        if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
            raise UnsupportedObjectError(
                "config",
                config,
                f"{_path(cls)}.to_config() must return a dict with string keys (its constructor arguments by name), "
                "such as {'width': 4}; from_config(cls, config) gets that dict back.",
            )
    else:
        init = model.__dict__.get(_ATTR)
        if init is None or init.arguments is None:
            raise UnsupportedObjectError(
                "config",
                model,
                "its constructor arguments were not recorded (the model was unpickled or copied without them, or "
                "built before its class was registered). Define to_config()/from_config() on the class, or build "
                "it again.",
            )
        config = init.arguments
    _check_config(config, ())
    plain, typed = _encode(config)
    return {
        "name": name,
        "version": cls._torchkeep_version,
        "class": _path(cls),
        "training": bool(model.training),
        "config": plain,
        "config_typed": typed,
        "torchkeep_version": __version__,
    }


# -- saving ----------------------------------------------------------------------------------


def _is_dir_target(path: PathLike) -> bool:
    s = os.fspath(path)
    return s.endswith(("/", os.sep)) or Path(s).is_dir()


def save_model(
    model: torch.nn.Module,
    path: PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Save a registered model (or a Hugging Face model) to a file or folder :func:`load_model` rebuilds it from.

    Args:
        model: an instance of a :func:`register_model` class (``torch.compile``/DDP wrappers are unwrapped).
        path: a file (one torchkeep file, tree ``{"model": state_dict}``), or a directory (a path ending
            with a separator, or an existing directory): ``config.json`` + ``model.safetensors``, sharded
            with ``model.safetensors.index.json`` above ``max_shard_size``. A ``transformers`` or
            ``diffusers`` model goes to a folder ``from_pretrained`` loads unless the path ends in
            ``.safetensors`` (see :mod:`torchkeep.pretrained`).
        metadata: user metadata (JSON), as in :func:`torchkeep.save`.
        max_shard_size: directory layout only: bytes per shard (``"5GB"``, ``"500MB"``, an int).

    Returns:
        The file written (the directory for the directory layout).

    Raises:
        UnknownModelError: the class is not registered.
        UnsupportedObjectError: a constructor argument is not JSON-like (named in the message).

    Example:
        >>> import torch, torchkeep as tk, tempfile, os
        >>> @tk.register_model("doc-save")
        ... class Net(torch.nn.Module):
        ...     def __init__(self, width=4):
        ...         super().__init__()
        ...         self.fc = torch.nn.Linear(width, 1)
        >>> d = tk.save_model(Net(width=6), tempfile.mkdtemp() + "/")
        >>> sorted(p.name for p in d.iterdir())
        ['config.json', 'model.safetensors']
    """
    record = model_record(model)
    model = _unwrap(model)
    meta = provenance_metadata()
    meta[MODEL_KEY] = json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    if metadata:
        meta[USER_KEY] = user_json(metadata)
    with paused_gc():
        hub = "library" in record and not os.fspath(path).endswith(".safetensors")  # save_pretrained takes a folder
        if not hub and not _is_dir_target(path):
            path = Path(os.fspath(path)).expanduser()
            flat = flatten({"model": model})
            meta[TREE_KEY] = tree_json(flat.skeleton)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_file(path, flat.tensors, meta, checksums=True)
            return path
        if "library" in record:
            return pretrained.save(
                model, Path(os.fspath(path)).expanduser(), metadata=metadata, max_shard_size=max_shard_size
            )
        limit = parse_size(max_shard_size)
        text = json.dumps(record, indent=2, ensure_ascii=False) + "\n"
        return write_model_dir(
            Path(os.fspath(path)).expanduser(),
            WEIGHTS_FILE,
            flatten(dict(model.state_dict())),
            meta,
            {MODEL_KEY: record},
            max_shard_size=limit,
            files={CONFIG_FILE: text},
        )


# -- loading ---------------------------------------------------------------------------------


def _read_record(path: Path) -> tuple[dict[str, Any], kinds.Detected]:
    """The model record of a ``save_model`` file or directory, and what the path is."""
    found = kinds.detect(path, operation="load_model")
    raw: Any = None
    where: Path = found.target
    if found.path.is_dir() and (found.path / CONFIG_FILE).is_file():
        where = found.path / CONFIG_FILE
        raw = where.read_text(encoding="utf-8")
    elif found.kind == kinds.TORCHKEEP and found.file is not None:
        with HeaderFile(found.file, verify=False) as hf:
            raw = hf.header.metadata.get(MODEL_KEY)
    elif found.kind == kinds.SHARDED and found.index is not None:
        raw = found.index.metadata.get(MODEL_KEY)
        raw = json.dumps(raw) if isinstance(raw, dict) else raw
    if raw is None:
        raise UnsupportedSourceError(found.target, found.kind, "load_model", _NO_RECORD.get(found.kind, _NO_RECORD[""]))
    try:
        record = json.loads(raw)
        if not isinstance(record, dict) or not isinstance(record.get("name"), str):
            raise ValueError("the record has no 'name'")
    except ValueError as e:
        raise CorruptCheckpointError(where, f"malformed model record ({e})") from None
    return record, found


_NO_RECORD = {
    kinds.TORCHKEEP: "it holds a state tree written by tk.save, not a model written by tk.save_model. Build the "
    "model in code and call tk.load_into(model, path) or tk.restore(path, {'model': model}); "
    "or write a rebuildable file with tk.save_model(model, path)",
    kinds.LEGACY_ZIP: "a torch.save file records no model class to rebuild. Build the model in code and call "
    "tk.load_into(model, path) (read with weights_only=True); then tk.save_model(model, 'model.safetensors') "
    "gives a file load_model can rebuild",
    "": "it records no model class to rebuild (only weights). Build the model in code and call "
    "tk.load_into(model, path); then tk.save_model(model, 'model.safetensors') gives a file load_model can rebuild",
}
_NO_RECORD[kinds.LEGACY_PICKLE] = _NO_RECORD[kinds.LEGACY_ZIP]


def _resolve_import(class_path: str) -> tuple[Any, str]:
    """``(object, "")`` for an importable ``module.QualName``; ``(None, why)`` when the import failed."""
    parts = class_path.split(".")
    failure = ""
    for i in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:i])
        try:
            obj: Any = importlib.import_module(module)
        except ImportError as e:
            failure = failure or f"importing {module} failed ({type(e).__name__}: {e})"
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            failure = failure or f"{module} has no {'.'.join(parts[i:])}"
            continue
        return obj, ""
    return None, failure


def _find_class(name: str, class_path: str | None, allow_import: bool) -> tuple[type, int | None]:
    entry = _REGISTRY.get(name)
    if entry is not None:
        return entry.cls, entry.version
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            obj = ep.load()
            entry = _REGISTRY.get(name)
            if entry is not None:
                return entry.cls, entry.version
            if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
                return obj, getattr(obj, "_torchkeep_version", None)
    failure = ""
    if allow_import and class_path:
        obj, failure = _resolve_import(class_path)
        entry = _REGISTRY.get(name)
        if entry is not None:
            return entry.cls, entry.version
        if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
            return obj, getattr(obj, "_torchkeep_version", None)
    detail = f"no model class registered as {name!r} (saved from {class_path}); {failure}" if failure else ""
    raise UnknownModelError(name, sorted(_REGISTRY), class_path=class_path, tried_import=allow_import, detail=detail)


def load_model(
    path: PathLike,
    *,
    map_location: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    allow_import: bool = False,
    verify: bool = True,
) -> torch.nn.Module:
    """Rebuild a model saved with :func:`save_model`: no pickle, no training script needed.

    The class is looked up by its registered name (in-process registry, then the
    ``torchkeep.models`` entry points, then the recorded import path if ``allow_import``),
    constructed on the ``meta`` device where possible (weights are allocated once, never
    initialised), and loaded strictly; its train/eval flag is restored.

    Args:
        path: a file or a directory written by :func:`save_model`.
        map_location: the device to build the model on.
        dtype: cast floating-point parameters and buffers to this dtype after loading.
        allow_import: import the module recorded in the file if the name is not registered
            (imports run that module's code: only for files you trust).
        verify: check checksums before copying weights.

    Raises:
        UnknownModelError: the name is not registered (lists registered names).
        ModelVersionError: the file was saved by a newer version of the class.
        KeyMismatchError: the weights do not fit the rebuilt model.

    Example:
        >>> import torch, torchkeep as tk, tempfile, os
        >>> @tk.register_model("doc-load")
        ... class Net(torch.nn.Module):
        ...     def __init__(self, width=4):
        ...         super().__init__()
        ...         self.fc = torch.nn.Linear(width, 1)
        >>> net = Net(5).eval()
        >>> p = tk.save_model(net, os.path.join(tempfile.mkdtemp(), "net.safetensors"))
        >>> m = tk.load_model(p, dtype=torch.float64)
        >>> m.training, m.fc.weight.dtype, torch.equal(m.fc.weight.float(), net.fc.weight)
        (False, torch.float64, True)
    """

    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ArgumentTypeError("dtype", dtype, "a torch.dtype such as torch.float16, or None to keep the saved dtypes")
    if dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
        raise InvalidArgumentError(
            "dtype",
            dtype,
            "pass a floating-point dtype such as torch.float16 or torch.bfloat16 (it casts the floating-point "
            "parameters and buffers), or None",
        )
    path = as_path(path)
    hub = pretrained.folder_library(path) if path.exists() else None
    if hub is not None:  # a Hugging Face folder (save_pretrained's or save_model's)
        config, weights = pretrained.read_folder(*hub, path)
        return pretrained.load(
            hub[0], config, weights, map_location=map_location, dtype=dtype, verify=verify, find=_by_class_name
        )
    record, found = _read_record(path)
    if record.get("library") in pretrained.LIBRARIES:  # save_model(hf_model, "file.safetensors")
        model = pretrained.load(
            record["library"],
            record.get("config") or {},
            found.target,
            key="model",
            map_location=map_location,
            dtype=dtype,
            verify=verify,
            find=lambda n: (
                _by_class_name(n) or (_REGISTRY[record["name"]].cls if record["name"] in _REGISTRY else None)
            ),
        )
        return model.train(bool(record.get("training", False)))
    whole = found.path.is_dir() or found.kind == kinds.SHARDED  # the directory layout: a flat state dict
    name = record["name"]
    cls, registered = _find_class(name, record.get("class"), allow_import)
    saved = record.get("version", 1)
    try:
        config = _decode(record)
    except (ValueError, TypeError, KeyError) as e:  # SkeletonError included: a damaged or foreign record
        raise CorruptCheckpointError(path, f"malformed model config ({e})") from None
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError):
        raise InvalidArgumentError("map_location", map_location, "pass a device such as 'cpu' or 'cuda:0'") from None
    if registered is not None and saved > registered:
        raise ModelVersionError(name, saved, registered, str(path))
    upgrade = getattr(cls, "upgrade", None)
    if registered is not None and saved < registered and callable(upgrade):
        with open_source(path, verify=verify) as src:
            tree = src.tree
            sd = tree["model"] if isinstance(tree, Mapping) and "model" in tree and not whole else tree
            sd = {k: (v.load() if hasattr(v, "load") and not isinstance(v, torch.Tensor) else v) for k, v in sd.items()}
        config, sd = upgrade(config, sd, saved)
        model, _ = build(cls, config, device)
        load_into(model, sd, strict=True)
    else:
        model, _ = build(cls, config, device)
        load_into(model, path, strict=True, verify=verify, key=None if whole else "model")
    if dtype is not None:
        model = model.to(dtype)
    model.train(bool(record.get("training", False)))
    return model


def _by_class_name(name: str) -> type | None:
    """A registered class called ``name`` (a Hugging Face config names classes, not registry names)."""
    return next((e.cls for e in _REGISTRY.values() if e.cls.__name__ == name or e.name == name), None)


def registered_names() -> list[str]:
    """The names in the in-process registry, sorted."""
    return sorted(_REGISTRY)

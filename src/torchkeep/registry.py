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

import contextlib
import functools
import importlib
import importlib.metadata
import inspect
import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from torchkeep._version import __version__
from torchkeep.errors import ModelVersionError, UnknownModelError, UnsupportedObjectError
from torchkeep.tree import format_path, unflatten

__all__ = [
    "ENTRY_POINT_GROUP",
    "MODEL_KEY",
    "load_model",
    "model_record",
    "register_model",
    "registered_names",
    "save_model",
]

MODEL_KEY = "torchkeep.model"
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
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise TypeError(f"version must be a non-negative int, not {version!r}")

    def decorate(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            raise TypeError(f"register_model decorates nn.Module subclasses, not {cls!r}")
        key = name or f"{cls.__module__}.{cls.__qualname__}"
        old = _REGISTRY.get(key)
        if old is not None and old.cls is not cls and old.cls.__qualname__ != cls.__qualname__:
            raise ValueError(
                f"model name {key!r} is already registered to {_path(old.cls)}; choose another name for {_path(cls)}"
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
    from torchkeep.tree import flatten

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
            raise TypeError(
                f"{_path(cls)}.to_config() must return a dict with string keys, not {type(config).__name__}"
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
    """Save a registered model's weights, registry name, version, config and train/eval flag.

    Args:
        model: an instance of a :func:`register_model` class (``torch.compile``/DDP wrappers are unwrapped).
        path: a file (one torchkeep file, tree ``{"model": state_dict}``), or a directory (a path ending
            with a separator, or an existing directory): ``config.json`` + ``model.safetensors``, sharded
            with ``model.safetensors.index.json`` above ``max_shard_size``.
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
    from torchkeep.api import _metadata_json, paused_gc, provenance_metadata
    from torchkeep.convert import parse_size, shard_names, split_shards, write_file, write_sharded
    from torchkeep.reader import TREE_KEY, USER_KEY
    from torchkeep.tree import flatten

    record = model_record(model)
    model = _unwrap(model)
    meta = provenance_metadata()
    meta[MODEL_KEY] = json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    if metadata:
        meta[USER_KEY] = _metadata_json(metadata)
    with paused_gc():
        if not _is_dir_target(path):
            path = Path(os.fspath(path)).expanduser()
            flat = flatten({"model": model})
            meta[TREE_KEY] = json.dumps(flat.skeleton, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_file(path, flat.tensors, meta, checksums=True)
            return path
        directory = Path(os.fspath(path)).expanduser()
        directory.mkdir(parents=True, exist_ok=True)
        flat = flatten(dict(model.state_dict()))
        limit = parse_size(max_shard_size)
        groups = split_shards(flat.tensors, limit) if limit is not None else [list(flat.tensors)]
        single = directory / WEIGHTS_FILE
        old_shards = sorted(directory.glob("model-*-of-*.safetensors"))
        if len(groups) > 1:
            index_meta = {"torchkeep.model": record}
            written = write_sharded(single, single, flat.tensors, groups, meta, index_meta, checksums=True)
            keep = {p.name for p in shard_names(single, len(groups))[0]}
            stale = [single, *(p for p in old_shards if p.name not in keep)]
        else:
            meta[TREE_KEY] = json.dumps(flat.skeleton, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
            write_file(single, flat.tensors, meta, checksums=True)
            written = single
            stale = [directory / f"{WEIGHTS_FILE}.index.json", *old_shards]
        for p in stale:  # a previous save with the other layout would shadow this one
            if p != written:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        from torchkeep.storage.local import AtomicFile

        with AtomicFile(directory / CONFIG_FILE) as f:
            os.write(f.fd, (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode())
            f.commit()
    return directory


# -- loading ---------------------------------------------------------------------------------


def _read_record(path: Path) -> dict[str, Any]:
    from torchkeep.errors import CheckpointNotFoundError, CorruptCheckpointError
    from torchkeep.reader import Checkpoint

    if not path.exists():
        raise CheckpointNotFoundError(path)
    try:
        if path.is_dir():
            raw = (path / CONFIG_FILE).read_text(encoding="utf-8")
        else:
            with Checkpoint(path, verify=False) as ck:
                raw = ck.header.metadata.get(MODEL_KEY)
            if raw is None:
                raise CorruptCheckpointError(
                    path, "it holds no model record (not written by save_model); use tk.load_into(model, path)"
                )
        record = json.loads(raw)
        if not isinstance(record, dict) or not isinstance(record.get("name"), str):
            raise ValueError("the record has no 'name'")
    except FileNotFoundError:
        raise CorruptCheckpointError(path, f"a directory without {CONFIG_FILE}; save it with save_model") from None
    except ValueError as e:
        raise CorruptCheckpointError(path, f"malformed model record ({e})") from None
    return record


def _resolve_import(class_path: str) -> Any:
    parts = class_path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        return obj
    return None


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
    if allow_import and class_path:
        obj = _resolve_import(class_path)
        entry = _REGISTRY.get(name)
        if entry is not None:
            return entry.cls, entry.version
        if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
            return obj, getattr(obj, "_torchkeep_version", None)
    raise UnknownModelError(name, sorted(_REGISTRY), class_path=class_path, tried_import=allow_import)


def _call(cls: type, config: dict[str, Any]) -> torch.nn.Module:
    from_config = getattr(cls, "from_config", None)
    if callable(from_config):
        return from_config(config)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    rest = dict(config)
    for p in params:
        if p.name not in rest:
            continue
        v = rest.pop(p.name)
        if p.kind is p.POSITIONAL_ONLY:
            args.append(v)
        elif p.kind is p.VAR_POSITIONAL:
            args.extend(v)
        elif p.kind is p.VAR_KEYWORD:
            kwargs.update(v)
        else:
            kwargs[p.name] = v
    kwargs.update(rest)  # unknown names: let the constructor say so
    return cls(*args, **kwargs)


def _meta_safe(model: torch.nn.Module) -> bool:
    """True when every tensor of a meta-built model will be filled by allocation + a strict load."""
    for m in model.modules():
        if getattr(m, "_non_persistent_buffers_set", None):
            return False  # allocation would leave them uninitialised and the file does not hold them
        for v in m.__dict__.values():
            if isinstance(v, torch.Tensor) and v.is_meta:
                return False  # a plain tensor attribute computed in __init__
    return True


#: Shape-preserving in-place ops that weight initialisers call. On a meta tensor they compute
#: nothing, yet the first one dispatched in a process imports torch._dynamo (~1 s): skip them.
_INIT_OPS = frozenset(
    [
        "normal_",
        "uniform_",
        "fill_",
        "zero_",
        "random_",
        "exponential_",
        "log_normal_",
        "cauchy_",
        "geometric_",
        "bernoulli_",
        "erfinv_",
        "mul_",
        "add_",
        "sub_",
        "div_",
        "clamp_",
        "copy_",
    ]
)


class _SkipMetaInit(torch.overrides.TorchFunctionMode):
    """Thread-local: initialisers' in-place ops on meta tensors return the tensor untouched."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _INIT_OPS:
            # torch.nn.init functions come with their arguments as keywords (tensor=...)
            t = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


def _build(cls: type, config: dict[str, Any], device: torch.device) -> tuple[torch.nn.Module, bool]:
    """The model, and whether it was built on the meta device (weights never initialised)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.device("meta"), _SkipMetaInit():
                model = _call(cls, config)
        if isinstance(model, torch.nn.Module) and _meta_safe(model):
            # what to_empty does, without the symbolic-shape machinery empty_like pulls in on meta
            return model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device)), True
    except Exception:
        pass  # the class cannot be built on meta: build it for real below
    return _call(cls, config).to(device), False


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
    from torchkeep.loading import load_into

    path = Path(os.fspath(path)).expanduser()
    record = _read_record(path)
    name = record["name"]
    cls, registered = _find_class(name, record.get("class"), allow_import)
    saved = record.get("version", 1)
    config = _decode(record)
    device = torch.device(map_location)
    if registered is not None and saved > registered:
        raise ModelVersionError(name, saved, registered, str(path))
    upgrade = getattr(cls, "upgrade", None)
    if registered is not None and saved < registered and callable(upgrade):
        from torchkeep.sources import open_source

        with open_source(path, verify=verify) as src:
            tree = src.tree
            sd = tree["model"] if isinstance(tree, Mapping) and "model" in tree and not path.is_dir() else tree
            sd = {k: (v.load() if hasattr(v, "load") and not isinstance(v, torch.Tensor) else v) for k, v in sd.items()}
        config, sd = upgrade(config, sd, saved)
        model, _ = _build(cls, config, device)
        load_into(model, sd, strict=True)
    else:
        model, _ = _build(cls, config, device)
        load_into(model, path, strict=True, verify=verify, key=None if path.is_dir() else "model")
    if dtype is not None:
        model = model.to(dtype)
    model.train(bool(record.get("training", False)))
    return model


def registered_names() -> list[str]:
    """The names in the in-process registry, sorted."""
    return sorted(_REGISTRY)

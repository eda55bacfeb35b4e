"""Hugging Face model folders both ways: write what ``from_pretrained`` loads, rebuild models from them.

:func:`torchkeep.save_model` on a ``transformers`` model (any ``PreTrainedModel``) or a
``diffusers`` model (any ``ModelMixin``) writes the folder their ``from_pretrained`` reads:

- ``config.json`` from the model's own config (``architectures`` set to its class, as
  ``save_pretrained`` does) and, for generative models, ``generation_config.json``;
- the weights under the names the library expects (tied copies such as ``lm_head.weight`` are
  left out, the library ties them again), as ``model.safetensors`` (diffusers:
  ``diffusion_pytorch_model.safetensors``), or shards and an index above ``max_shard_size``;
- torchkeep's checksums and provenance in the safetensors metadata (``format: pt`` included),
  which ``from_pretrained`` ignores and :func:`torchkeep.load_model` verifies.

:func:`torchkeep.load_model` on such a folder, whoever wrote it, rebuilds the model through the
library from ``config.json`` (the class named in ``architectures``, from the library itself: code
shipped with a model, ``trust_remote_code``, is never run), allocates it without initialising
its weights, and loads the weights strictly.

The libraries are imported only when a model or folder of theirs is met.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from torchkeep.construct import construct
from torchkeep.errors import ConversionError, UnknownModelError, UnsupportedSourceError
from torchkeep.format.meta import MODEL_KEY, USER_KEY, user_json
from torchkeep.format.shards import parse_size
from torchkeep.loading import load_into
from torchkeep.runtime import paused_gc
from torchkeep.tree import flatten
from torchkeep.writer import provenance_metadata, write_model_dir

__all__ = [
    "LIBRARIES",
    "folder_library",
    "hub_weights",
    "library_of",
    "load",
    "model_for_weights",
    "read_folder",
    "record",
    "save",
    "weights_path",
]

#: library -> (module and name of its model base class, weights file name, install command)
LIBRARIES: dict[str, tuple[str, str, str, str]] = {
    "transformers": (
        "transformers.modeling_utils",
        "PreTrainedModel",
        "model.safetensors",
        "pip install 'torchkeep[transformers]'",
    ),
    "diffusers": (
        "diffusers.models.modeling_utils",
        "ModelMixin",
        "diffusion_pytorch_model.safetensors",
        "pip install 'torchkeep[diffusers]'",
    ),
}
CONFIG_FILE = "config.json"
GENERATION_FILE = "generation_config.json"


def library_of(model: Any) -> str | None:
    """``"transformers"`` or ``"diffusers"`` when ``model`` (or a model class) is one of theirs (imports neither).

    Example:
        >>> import torch
        >>> library_of(torch.nn.Linear(2, 2)) is None
        True
    """
    for c in (model if isinstance(model, type) else type(model)).__mro__:
        for lib, (module, base, _, _) in LIBRARIES.items():
            if c.__name__ == base and c.__module__ == module:
                return lib
    return None


def _library(lib: str) -> Any:
    try:
        return __import__(lib)
    except ImportError:
        raise ImportError(f"this is a {lib} model folder; reading it needs {lib}: {LIBRARIES[lib][3]}") from None


# -- writing -------------------------------------------------------------------------------------


def hub_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` without the tied copies the library restores itself on load.

    A name is left out when its tensor is the same storage as a name kept before it: first
    the targets of the model's own tie table (``lm_head.weight -> transformer.wte.weight``),
    then any other repeat, keeping the first name in state-dict order, as ``save_pretrained``.

    Example:
        >>> import torch
        >>> m = torch.nn.ModuleDict({"emb": torch.nn.Embedding(5, 2), "head": torch.nn.Linear(2, 5, bias=False)})
        >>> m["head"].weight = m["emb"].weight  # tied
        >>> sorted(hub_weights(m))
        ['emb.weight']
    """
    sd = model.state_dict()

    def where(t: torch.Tensor) -> tuple[Any, ...] | None:
        if t.device.type == "meta" or not t.numel():
            return None
        return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype)

    ties = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    drop = set()
    if isinstance(ties, Mapping):
        drop = {
            t
            for t, s in ties.items()
            if t in sd and s in sd and where(sd[t]) is not None and where(sd[t]) == where(sd[s])
        }
    kept: dict[str, torch.Tensor] = {}
    seen: set[tuple[Any, ...]] = set()
    for name, t in sd.items():
        at = where(t)
        if name in drop or (at is not None and at in seen):
            continue
        if at is not None:
            seen.add(at)
        kept[name] = t
    return kept


def _config_files(model: Any, lib: str) -> dict[str, str]:
    if lib == "diffusers":
        return {CONFIG_FILE: model.to_json_string()}
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    files = {CONFIG_FILE: config.to_json_string(use_diff=True)}
    generation = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", None)
    if generation is not None and callable(can_generate) and can_generate():
        files[GENERATION_FILE] = generation.to_json_string(use_diff=True)
    return files


def record(model: Any, lib: str) -> dict[str, Any]:
    """The model record for a single-file ``save_model``: library, class and the full config."""
    from torchkeep._version import __version__

    cls = type(model)
    config = json.loads(_config_files(model, lib)[CONFIG_FILE])
    return {
        "name": f"{lib}:{cls.__name__}",
        "library": lib,
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "training": bool(model.training),
        "config": config,
        "torchkeep_version": __version__,
    }


def save(model: Any, directory: Path, *, metadata: Mapping[str, Any] | None, max_shard_size: int | str | None) -> Path:
    """Write ``directory`` as ``model.save_pretrained`` would, checksummed (see the module docs)."""
    lib = library_of(model)
    assert lib is not None
    rec = record(model, lib)
    rec.pop("config")  # config.json holds it
    meta = provenance_metadata()
    meta[MODEL_KEY] = json.dumps(rec, separators=(",", ":"), ensure_ascii=False)
    if metadata:
        meta[USER_KEY] = user_json(metadata)
    with paused_gc():
        return write_model_dir(
            directory,
            LIBRARIES[lib][2],
            flatten(hub_weights(model)),
            meta,
            {MODEL_KEY: rec},
            max_shard_size=parse_size(max_shard_size) if max_shard_size is not None else None,
            files=_config_files(model, lib),
        )


# -- reading -------------------------------------------------------------------------------------


def folder_library(path: Path) -> tuple[str, Path] | None:
    """``(library, folder)`` when ``path`` is a Hugging Face model folder or a weights file in one."""
    folder = path if path.is_dir() else path.parent
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or ("name" in config and "config" in config):
        return None  # torchkeep's own save_model record
    if not path.is_dir() and not path.name.startswith(tuple(v[2].split(".")[0] for v in LIBRARIES.values())):
        return None
    if "_class_name" in config:
        return "diffusers", folder
    if "model_type" in config:
        return "transformers", folder
    return None


def weights_path(lib: str, folder: Path) -> Path:
    """The index or the single weights file of a model folder."""
    name = LIBRARIES[lib][2]
    index = folder / f"{name}.index.json"
    return index if index.is_file() else folder / name


def _resolve(lib: str, config: Mapping[str, Any], find: Callable[[str], type | None]) -> type:
    module = _library(lib)
    names = [config.get("_class_name")] if lib == "diffusers" else list(config.get("architectures") or [])
    for name in names:
        cls = getattr(module, name, None) if isinstance(name, str) else None
        if cls is None and isinstance(name, str):
            cls = find(name)
        if isinstance(cls, type) and library_of(cls) == lib:
            return cls
    if lib == "transformers" and not names:
        raise ConversionError(
            "the config names no class ('architectures' is empty); set it, e.g. "
            "config.architectures = ['GPT2LMHeadModel'], or load the weights with tk.load_into"
        )
    remote = " (its config maps it to code shipped with the model: torchkeep never runs trust_remote_code)"
    raise UnknownModelError(
        str(names[0] if names else config.get("model_type")),
        [],
        detail=f"{lib} has no class {', '.join(map(str, names))}{remote if 'auto_map' in config else ''}; register "
        "your subclass with @torchkeep.register_model, or upgrade " + lib,
    )


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None or not dtype.is_floating_point:
        yield
        return
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _config_dtype(config: Mapping[str, Any]) -> torch.dtype | None:
    name = config.get("dtype") or config.get("torch_dtype")
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    return dt if isinstance(dt, torch.dtype) else None


def _no_init(lib: str) -> Any:
    """The library's own "allocate, do not initialise" context, where it has one."""
    for where in (f"{lib}.initialization", f"{lib}.modeling_utils", f"{lib}.models.modeling_utils"):
        fn = getattr(sys.modules.get(where) or _try_import(where), "no_init_weights", None)
        if fn is not None:
            return fn()
    return contextlib.nullcontext()


def _try_import(name: str) -> Any:
    try:
        return __import__(name, fromlist=["_"])
    except ImportError:
        return None


def build(
    lib: str, config: Mapping[str, Any], device: torch.device, dtype: torch.dtype | None, cls: type
) -> torch.nn.Module:
    """The model ``cls`` of ``config``, allocated on ``device`` and not initialised."""

    def make() -> torch.nn.Module:
        if lib == "diffusers":
            return cls.from_config(dict(config))
        return cls(cls.config_class.from_dict(dict(config)))

    with _default_dtype(dtype or _config_dtype(config)), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = construct(make, device, real=lambda: _no_init(lib))
    tie = getattr(model, "tie_weights", None)
    if callable(tie):  # transformers skips tying while it skips initialising; from_pretrained ties after
        tie()
    return model


def load(
    lib: str,
    config: Mapping[str, Any],
    weights: Path,
    *,
    key: str | None = None,
    map_location: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    verify: bool = True,
    find: Callable[[str], type | None] = lambda name: None,
) -> torch.nn.Module:
    """Rebuild the model of ``config`` and load ``weights`` (at ``key``) strictly; ``eval`` mode.

    ``find`` looks up a class name the library does not have (a registered subclass).
    """
    cls = _resolve(lib, config, find)
    model = build(lib, config, torch.device(map_location), dtype, cls)
    load_into(model, weights, strict=True, verify=verify, key=key)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def read_folder(lib: str, folder: Path, source: Path) -> tuple[dict[str, Any], Path]:
    """``(config, weights path)`` of a model folder; ``source`` is the path the user gave."""
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    weights = source if not source.is_dir() else weights_path(lib, folder)
    if not weights.exists():
        raise UnsupportedSourceError(
            folder, lib, "load_model", f"it has {CONFIG_FILE} but no {weights.name}; only safetensors weights are read"
        )
    return config, weights


def model_for_weights(config: Any, weights: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """A model of ``config`` (a ``transformers``/``diffusers`` config object, a dict, or a path to
    ``config.json`` or its folder) holding ``weights``, loaded strictly; for ``convert(to="hf")``.

    When the config names no class (a config never saved by ``save_pretrained``), the class is
    the one among the library's task classes for its ``model_type`` whose parameter names are
    exactly those of ``weights`` (tied copies aside).
    """
    if isinstance(config, (str, Path)):
        p = Path(config)
        config = json.loads((p / CONFIG_FILE if p.is_dir() else p).read_text(encoding="utf-8"))
    elif not isinstance(config, Mapping):
        to_dict = getattr(config, "to_dict", None)
        if not callable(to_dict):
            raise ConversionError(f"config: expected a transformers/diffusers config, a dict or a path, got {config!r}")
        config = to_dict()
    config = dict(config)
    lib = "diffusers" if "_class_name" in config else "transformers" if "model_type" in config else None
    if lib is None:
        raise ConversionError("config: not a Hugging Face config (it has neither 'model_type' nor '_class_name')")
    if lib == "transformers" and not config.get("architectures"):
        config["architectures"] = [_matching_class(config, weights)]
    model = build(lib, config, torch.device("cpu"), None, _resolve(lib, config, lambda name: None))
    load_into(model, dict(weights), strict=True)
    return model


def _matching_class(config: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> str:
    auto = _try_import("transformers.models.auto.modeling_auto")
    names: list[str] = []
    for attr in sorted(dir(auto)) if auto is not None else []:
        table = getattr(auto, attr)
        if attr.startswith("MODEL_") and attr.endswith("_MAPPING_NAMES") and isinstance(table, Mapping):
            name = table.get(config["model_type"])
            if isinstance(name, str) and name not in names:
                names.append(name)
    module = _library("transformers")
    wanted = set(weights)
    for name in names:
        cls = getattr(module, name, None)
        if cls is None:
            continue
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            try:
                model = cls(cls.config_class.from_dict(dict(config)))
            except Exception:
                continue
        if set(hub_weights(model)) <= wanted <= set(model.state_dict()):
            return name
    raise ConversionError(
        f"cannot tell which {config['model_type']} class these weights belong to (none of {', '.join(names)} has "
        "exactly their names); set config.architectures, e.g. ['GPT2LMHeadModel'], or pick the subtree with key="
    )

"""PEFT adapters: which of a model's tensors an adapter checkpoint fills, and under which names.

peft keeps each adapter's weights in the model under the adapter's name
(``...q_proj.lora_A.default.weight``; a ``modules_to_save`` copy as
``...lm_head.modules_to_save.default.weight``), but writes them to ``adapter_model.safetensors``
without it (``...q_proj.lora_A.weight``, ``...lm_head.weight``), so that the file can be loaded
as any adapter. :func:`find` answers, for one adapter of a model, the names a checkpoint may
give each of its tensors; :mod:`torchkeep.loading` maps a checkpoint's names through it.

Where the names come from, in order:

1. peft's own mapping: ``peft.get_peft_model_state_dict(model, state_dict, adapter_name=...)``
   (the function ``save_pretrained`` writes the file with), asked about the model's own tensors;
   each tensor it returns is found in the model by identity, which pairs every file name with
   the model key it came from (the adapter weights, ``modules_to_save`` copies, DoRA magnitudes);
2. the fallback, when peft cannot answer (or the model holds adapter-named tensors without
   peft): a model key that carries the adapter's name as a path segment is an adapter weight,
   and its name in a file is the key without that segment (``lora_A.default.weight`` ->
   ``lora_A.weight``, ``lora_embedding_A.default`` -> ``lora_embedding_A``,
   ``modules_to_save.default.`` -> nothing, ``lora_magnitude_vector.default.weight`` ->
   ``lora_magnitude_vector``), as peft's own key renaming does.

Either way a file name is also accepted with or without peft's ``base_model.model.`` prefix
(``PeftModel`` files carry it; files written for a model that holds its adapter layers itself,
as ``transformers``' ``add_adapter`` does, do not).

peft is never imported here: a model can only hold a peft adapter if peft is already imported.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from torchkeep.errors import InvalidArgumentError

__all__ = [
    "PEFT_PREFIX",
    "AdapterNames",
    "fallback_names",
    "find",
    "is_adapter_key",
    "looks_like_adapter",
    "peft_root",
]

PEFT_PREFIX = "base_model.model."
# the layer names peft's adapter methods add (LoRA, DoRA, IA3, OFT, BOFT, VeRA, HRA, ...)
_ADAPTER_KEY = re.compile(
    r"(^|\.)(lora_(A|B|embedding_A|embedding_B|magnitude_vector)|ia3_l|oft_r|boft_R|boft_s|vera_lambda_[bd]|hra_u)(\.|$)"
)
# names of the submodules holding what an adapter layer wraps: a checkpoint that has any of them
# holds the whole model, and a strict load of it demands every tensor
_WRAPPED = (".base_layer.", ".original_module.")
# an adapter layer's tensor in a model, named by its adapter (group 2 or 3): a module in a ModuleDict
# (``lora_A.<name>.weight``) or a Parameter in a ParameterDict (``lora_embedding_A.<name>``)
_NAMED = re.compile(
    r"(^|\.)(?:(?:lora_A|lora_B|lora_magnitude_vector|modules_to_save)\.([^.]+)\.|lora_embedding_[AB]\.([^.]+)$)"
)


@dataclass(frozen=True)
class AdapterNames:
    """The names of one adapter's tensors, for loading a checkpoint into a model.

    Attributes:
        adapter: the adapter's name in the model (``"default"`` unless named otherwise).
        names: checkpoint name -> model key, for every name a checkpoint may use.
        required: the model keys of the adapter's tensors: a strict load of an adapter checkpoint demands each.
        wrapped: the model keys of the tensors that adapter layers wrap (``base_layer``, ``original_module``).
        via: ``"peft"`` (peft's own mapping) or ``"names"`` (the fallback).
    """

    adapter: str
    names: dict[str, str]
    required: frozenset[str]
    wrapped: frozenset[str]
    via: str


def is_adapter_key(key: str) -> bool:
    """True for the name of a tensor of a peft adapter layer (``...lora_A.weight``, ``...lora_B.default.weight``)."""
    return _ADAPTER_KEY.search(key) is not None


def looks_like_adapter(keys: Iterable[str]) -> bool:
    """True when checkpoint names look like a peft adapter file: some adapter layer names, and no base weight
    that an adapter layer wraps."""
    keys = list(keys)
    return any(map(is_adapter_key, keys)) and not any(w in f".{k}" for k in keys for w in _WRAPPED)


def find(model: torch.nn.Module, keys: Iterable[str], adapter: str | None = None) -> AdapterNames | None:
    """The names of ``adapter``'s tensors in ``model`` (its active, or only, adapter by default), ``keys``
    being ``model.state_dict()``'s; ``None`` when the model holds no adapter.

    The model holds an adapter when one of its modules has a peft ``peft_config`` (a ``PeftModel``, or a
    model ``transformers``' ``add_adapter`` gave adapters: the outermost such module is asked), or, without
    peft, when its own keys name adapter layers the way peft does (``...lora_A.<adapter>.weight``).

    Raises:
        InvalidArgumentError: ``adapter`` is not one of the model's adapters, or the model holds several
            and none is active.

    Example:
        >>> import torch
        >>> find(torch.nn.Linear(2, 2), ["weight", "bias"]) is None
        True
    """
    found = peft_root(model, adapter)
    if found is not None:
        return _names(*found)
    keys = list(keys)
    found = sorted({m.group(2) or m.group(3) for k in keys if (m := _NAMED.search(k))})
    return _names("", model, _pick(model, found, adapter), keys) if found else None


def peft_root(model: torch.nn.Module, adapter: str | None = None) -> tuple[str, torch.nn.Module, str] | None:
    """``(prefix, root, adapter)``: the outermost module of ``model`` with a peft ``peft_config`` (a
    ``PeftModel``, or a model ``add_adapter`` gave adapters), its name in ``model`` with a trailing dot
    (``""``: ``model`` itself) and the adapter chosen; ``None`` without one (peft is not imported here).
    """
    if "peft" not in sys.modules:  # nothing holds a peft adapter unless peft was imported
        return None
    for name, root in model.named_modules():
        config = getattr(root, "peft_config", None)
        if isinstance(config, dict) and config:
            return (f"{name}." if name else ""), root, _pick(root, sorted(config), adapter)
    return None


def _pick(root: torch.nn.Module, names: list[str], adapter: str | None) -> str:
    if adapter is not None:
        if adapter not in names:
            raise InvalidArgumentError("adapter", adapter, f"the model's adapters are {names}; pass one of them")
        return adapter
    if len(names) == 1:
        return names[0]
    active = getattr(root, "active_adapter", None)
    active = active() if callable(active) else active
    if isinstance(active, (list, tuple)) and len(active) == 1:
        active = active[0]
    if isinstance(active, str) and active in names:
        return active
    raise InvalidArgumentError(
        "adapter", adapter, f"the model holds several adapters, {names}; pass adapter= to say which one to load"
    )


def _names(prefix: str, root: torch.nn.Module, adapter: str, keys: list[str] | None = None) -> AdapterNames:
    if keys is None:
        state = root.state_dict(keep_vars=True)
        pairs, via = _by_peft(root, state, adapter), "peft"
        keys = list(state)
    else:
        pairs = None
    if pairs is None:
        pairs, via = fallback_names(keys, adapter), "names"
    names: dict[str, str] = {}
    for file_key, key in pairs.items():
        for variant in (file_key, file_key.removeprefix(PEFT_PREFIX), PEFT_PREFIX + file_key):
            names.setdefault(variant, prefix + key)
    wrapped = frozenset(prefix + k for k in keys if any(w in f".{k}" for w in _WRAPPED))
    return AdapterNames(adapter, names, frozenset(prefix + k for k in pairs.values()), wrapped, via)


def _by_peft(root: torch.nn.Module, state: dict[str, Any], adapter: str) -> dict[str, str] | None:
    """``{file name: model key}`` from peft's ``get_peft_model_state_dict``, or ``None`` if it cannot say."""
    get = getattr(sys.modules.get("peft"), "get_peft_model_state_dict", None)
    if get is None:
        return None
    owner: dict[int, str] = {}
    for k, v in state.items():
        owner.setdefault(id(v), k)
    try:
        # save_embedding_layers=False: "auto" may ask the Hub whether the vocabulary was resized
        saved = get(root, state_dict=state, adapter_name=adapter, save_embedding_layers=False)
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError):  # NotImplementedError included
        return None
    pairs = {file_key: owner[id(v)] for file_key, v in saved.items() if id(v) in owner}
    return pairs or None


def fallback_names(keys: Iterable[str], adapter: str) -> dict[str, str]:
    """``{file name: model key}`` for the model keys that carry ``adapter`` as a path segment, named as
    peft names them in an adapter file (the documented fallback when peft cannot answer).

    Example:
        >>> fallback_names(["m.q.lora_A.default.weight", "m.q.base_layer.weight", "m.e.lora_embedding_A.default",
        ...                 "head.modules_to_save.default.weight", "head.original_module.weight"], "default")
        {'m.q.lora_A.weight': 'm.q.lora_A.default.weight', 'm.e.lora_embedding_A': 'm.e.lora_embedding_A.default', \
'head.weight': 'head.modules_to_save.default.weight'}
    """
    out: dict[str, str] = {}
    seg = f".{adapter}"
    for key in keys:
        dotted = f".{key}"
        if f".modules_to_save{seg}." in dotted:
            out[key.replace(f"modules_to_save{seg}.", "", 1)] = key
        elif key.endswith(seg):  # a Parameter in a ParameterDict: the name is last
            out[key[: -len(seg)]] = key
        elif "." in key:
            head, _, last = key.rpartition(".")
            if head.endswith(seg) or head == adapter:  # a module in a ModuleDict: the name is next to last
                name = f"{head[: -len(seg)] if head != adapter else ''}.{last}".lstrip(".")
                out[name.removesuffix(".weight") if name.endswith("lora_magnitude_vector.weight") else name] = key
    return out

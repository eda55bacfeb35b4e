"""PEFT adapters: save only an adapter's weights as a torchkeep file, and load them back.

``tk.load_into`` reads adapter checkpoints by itself: ``adapter_model.safetensors`` as
``PeftModel.save_pretrained`` writes it (or its folder) loads, strictly, into a model that holds
the adapter, its names mapped to the adapter's (``lora_A.weight`` -> ``lora_A.default.weight``)
with peft's own mapping. This module writes them:

    from torchkeep.integrations.peft import adapter_state, save_adapter

    save_adapter(model, "out/adapter")                  # adapter_model.safetensors + adapter_config.json
    tk.load_into(peft_model, "out/adapter")             # strict: every adapter tensor, no base weight
    PeftModel.from_pretrained(base, "out/adapter")      # peft reads the same folder

    tk.save({"adapter": adapter_state(model), "optimizer": opt, "step": step}, "ckpt.safetensors")
    tk.restore("ckpt.safetensors", {"adapter": model, "optimizer": opt})

``adapter_model.safetensors`` written here is a torchkeep file: written atomically, with a
checksum per tensor, and still a plain safetensors file under the names peft gives the tensors.

peft is imported only when a function runs (``import torchkeep`` and ``load_into`` never import
it); without it they raise an ``ImportError`` that says ``pip install 'torchkeep[peft]'``.
"""

from __future__ import annotations

import copy
import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from torchkeep.adapters import peft_root
from torchkeep.api import save
from torchkeep.errors import ArgumentTypeError, TargetExistsError

__all__ = ["ADAPTER_FILE", "CONFIG_FILE", "INSTALL_HINT", "adapter_state", "save_adapter"]

INSTALL_HINT = "pip install 'torchkeep[peft]'"
ADAPTER_FILE = "adapter_model.safetensors"
"""The weights file of an adapter folder (peft's name for it)."""
CONFIG_FILE = "adapter_config.json"
"""The adapter's config in an adapter folder (written by peft's ``PeftConfig.save_pretrained``)."""


def _peft() -> Any:
    try:
        return importlib.import_module("peft")
    except ImportError as e:
        raise ImportError(f"torchkeep.integrations.peft needs peft: {INSTALL_HINT}", name="peft") from e


def _root(model: torch.nn.Module, adapter: str | None) -> tuple[torch.nn.Module, str]:
    _peft()
    if not isinstance(model, torch.nn.Module):
        raise ArgumentTypeError("model", model, "an nn.Module holding a peft adapter (a PeftModel)")
    found = peft_root(model, adapter)
    if found is None:
        raise ArgumentTypeError(
            "model", model, "a model holding a peft adapter: wrap it first, model = peft.get_peft_model(model, config)"
        )
    return found[1], found[2]


def adapter_state(
    model: torch.nn.Module, adapter: str | None = None, *, save_embedding_layers: bool | str = False
) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the names peft gives them in ``adapter_model.safetensors``.

    This is peft's ``get_peft_model_state_dict``: the adapter weights (LoRA ``lora_A``/``lora_B``,
    DoRA magnitudes, ...) and ``modules_to_save`` copies, without the adapter's name; nothing of the
    base model. The tensors are the model's own (no copy).

    Args:
        model: a ``PeftModel`` (also inside a wrapper such as DDP), or a model with adapters added.
        adapter: which adapter (the model's active, or only, one by default).
        save_embedding_layers: as in ``PeftModel.save_pretrained``; ``False`` by default, since
            peft's ``"auto"`` may look the base model's config up on the Hub.

    Example::

        tk.save({"adapter": adapter_state(model), "optimizer": opt, "step": step}, "ckpt.safetensors")
    """
    root, name = _root(model, adapter)
    return _peft().get_peft_model_state_dict(root, adapter_name=name, save_embedding_layers=save_embedding_layers)


def save_adapter(
    model: torch.nn.Module,
    directory: str | os.PathLike[str],
    *,
    adapter: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    durable: bool = True,
) -> Path:
    """Save an adapter as peft lays it out: ``adapter_model.safetensors`` (a torchkeep file) and
    ``adapter_config.json``, in ``directory``; returns the weights file.

    ``tk.load_into(peft_model, directory)`` and ``PeftModel.from_pretrained(base, directory)`` both
    read it. The config is written first and the weights last, atomically: a folder with weights
    always has its config.

    Example::

        save_adapter(model, "out/adapter", metadata={"step": 500})
        report = tk.load_into(fresh_peft_model, "out/adapter")   # "mapped 24 adapter tensors to adapter 'default'"
    """
    root, name = _root(model, adapter)
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise TargetExistsError(folder, "a file is there", "save_adapter writes a folder: pass a folder path")
    state = adapter_state(model, name)
    folder.mkdir(parents=True, exist_ok=True)
    _save_config(root, name, folder)
    kind = getattr(root.peft_config[name], "peft_type", "")
    meta = {"peft_type": str(getattr(kind, "value", kind)), "adapter": name, **(metadata or {})}
    save(state, folder / ADAPTER_FILE, metadata=meta, durable=durable)
    return folder / ADAPTER_FILE


def _save_config(root: torch.nn.Module, name: str, folder: Path) -> None:
    """``adapter_config.json`` as ``PeftModel.save_pretrained`` writes it: ``inference_mode`` on (a loaded
    adapter is not trained unless asked), the base model's name and, without a task type, its class."""
    config = copy.deepcopy(root.peft_config[name])
    get_base = getattr(root, "get_base_model", None)
    base = get_base() if callable(get_base) else root
    if getattr(config, "base_model_name_or_path", None) is None:
        config.base_model_name_or_path = getattr(base, "name_or_path", None) or None
    config.inference_mode = True
    auto = None
    if getattr(config, "task_type", None) is None:
        auto = {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}
    config.save_pretrained(str(folder), auto_mapping_dict=auto)

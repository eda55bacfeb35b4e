"""torchkeep: save, resume, inspect, convert and ship PyTorch models.

The public names are imported on first use, so ``torchkeep inspect`` / ``verify`` / ``scan`` /
``ls`` answer from file headers without importing torch.

Example:
    >>> import torch, torchkeep as tk, tempfile, os
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = torch.optim.Adam(model.parameters())
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.safetensors")
    >>> _ = tk.save({"model": model, "optimizer": opt, "rng": tk.RNGState(), "epoch": 7}, path)
    >>> tk.restore(path, {"model": model, "optimizer": opt, "rng": tk.RNGState()})["epoch"]
    7
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from torchkeep._version import __version__

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and IDEs
    from torchkeep import distributed, errors, export
    from torchkeep.api import load, restore, save
    from torchkeep.convert import convert
    from torchkeep.diff import DiffReport, diff
    from torchkeep.export import ExportReport, QuantizeReport, quantize
    from torchkeep.inspection import inspect, verify
    from torchkeep.loading import LoadReport, load_into
    from torchkeep.manager import CheckpointManager
    from torchkeep.reader import Checkpoint
    from torchkeep.reader import open_checkpoint as open
    from torchkeep.registry import load_model, register_model, save_model
    from torchkeep.rng import RNGState
    from torchkeep.scan import ScanReport, scan
    from torchkeep.values import register_type

#: public name -> (module, attribute); an empty attribute means the module itself
_PUBLIC: dict[str, tuple[str, str]] = {
    "Checkpoint": ("torchkeep.reader", "Checkpoint"),
    "CheckpointManager": ("torchkeep.manager", "CheckpointManager"),
    "DiffReport": ("torchkeep.diff", "DiffReport"),
    "ExportReport": ("torchkeep.export", "ExportReport"),
    "LoadReport": ("torchkeep.loading", "LoadReport"),
    "QuantizeReport": ("torchkeep.export", "QuantizeReport"),
    "RNGState": ("torchkeep.rng", "RNGState"),
    "ScanReport": ("torchkeep.scan", "ScanReport"),
    "convert": ("torchkeep.convert", "convert"),
    "diff": ("torchkeep.diff", "diff"),
    "distributed": ("torchkeep.distributed", ""),
    "errors": ("torchkeep.errors", ""),
    "export": ("torchkeep.export", ""),  # the callable package: tk.export(...), tk.export.api
    "inspect": ("torchkeep.inspection", "inspect"),
    "load": ("torchkeep.api", "load"),
    "load_into": ("torchkeep.loading", "load_into"),
    "load_model": ("torchkeep.registry", "load_model"),
    "open": ("torchkeep.reader", "open_checkpoint"),
    "quantize": ("torchkeep.export", "quantize"),
    "register_model": ("torchkeep.registry", "register_model"),
    "register_type": ("torchkeep.values", "register_type"),
    "restore": ("torchkeep.api", "restore"),
    "save": ("torchkeep.api", "save"),
    "save_model": ("torchkeep.registry", "save_model"),
    "scan": ("torchkeep.scan", "scan"),
    "verify": ("torchkeep.inspection", "verify"),
}

__all__ = [
    "Checkpoint",
    "CheckpointManager",
    "DiffReport",
    "ExportReport",
    "LoadReport",
    "QuantizeReport",
    "RNGState",
    "ScanReport",
    "__version__",
    "convert",
    "diff",
    "distributed",
    "errors",
    "export",
    "inspect",
    "load",
    "load_into",
    "load_model",
    "open",
    "quantize",
    "register_model",
    "register_type",
    "restore",
    "save",
    "save_model",
    "scan",
    "verify",
]


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562), then keep it as a plain module attribute."""
    try:
        module, attr = _PUBLIC[name]
    except KeyError:
        raise AttributeError(f"module 'torchkeep' has no attribute {name!r}") from None
    value = importlib.import_module(module)
    if attr:
        value = getattr(value, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


#: public functions that share their name with the submodule defining them
_FUNCTION_MODULES = frozenset({"convert", "diff", "scan"})


class _Package(types.ModuleType):
    """Importing ``torchkeep.diff`` (the submodule) makes the import system bind ``torchkeep.diff``
    to the module; the public name is the function, as it always was: bind that instead."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FUNCTION_MODULES and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

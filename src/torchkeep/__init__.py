"""torchkeep: save, resume, inspect, convert and ship PyTorch models.

Example:
    >>> import torch, torchkeep as tk, tempfile, os
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = torch.optim.Adam(model.parameters())
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.safetensors")
    >>> _ = tk.save({"model": model, "optimizer": opt, "rng": tk.RNGState(), "epoch": 7}, path)
    >>> tk.restore(path, {"model": model, "optimizer": opt, "rng": tk.RNGState()})["epoch"]
    7
"""

from torchkeep import distributed, errors, export  # export: the callable package (tk.export(...), tk.export.api)
from torchkeep._version import __version__
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
    "restore",
    "save",
    "save_model",
    "scan",
    "verify",
]

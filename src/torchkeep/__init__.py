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

from torchkeep import errors
from torchkeep._version import __version__
from torchkeep.api import load, restore, save
from torchkeep.inspection import inspect, verify
from torchkeep.reader import Checkpoint
from torchkeep.reader import open_checkpoint as open
from torchkeep.rng import RNGState

__all__ = ["Checkpoint", "RNGState", "__version__", "errors", "inspect", "load", "open", "restore", "save", "verify"]

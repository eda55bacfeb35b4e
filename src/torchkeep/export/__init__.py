"""Ship a model: ONNX, TorchScript, torch.export (and TensorRT on NVIDIA GPUs), each artifact
checked numerically against the eager model; dynamic int8 quantization with a size/accuracy report.

Optional dependencies (``onnx``, ``onnxscript``, ``onnxruntime``: the ``torchkeep[onnx]`` extra;
``torch_tensorrt``) are imported only when their format is used.

Modules: ``api`` (export, verify_export), ``onnx``, ``torchscript``, ``program`` (torch.export),
``tensorrt``, ``quantize``, ``report`` (ExportReport).

Example:
    >>> import torch, tempfile, os
    >>> from torchkeep.export import export
    >>> path = os.path.join(tempfile.mkdtemp(), "linear.pt2")
    >>> export(torch.nn.Linear(3, 1), torch.randn(2, 3), path).max_abs_error < 1e-5
    True
"""

import sys
import types
from typing import Any

from torchkeep.export.api import FORMATS, export, format_for, verify_export
from torchkeep.export.quantize import QuantizeReport, quantize
from torchkeep.export.report import Check, ExportReport, OutputError


class _CallableModule(types.ModuleType):
    """``tk.export`` is this package, callable as the function :func:`~torchkeep.export.api.export`:
    ``tk.export(model, x, path)``, ``tk.export.verify_export(...)`` and ``import torchkeep.export.api``
    all work, in any import order."""

    def __call__(self, *args: Any, **kwargs: Any) -> ExportReport:
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = [
    "FORMATS",
    "Check",
    "ExportReport",
    "OutputError",
    "QuantizeReport",
    "export",
    "format_for",
    "quantize",
    "verify_export",
]

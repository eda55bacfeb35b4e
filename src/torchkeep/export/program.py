"""torch.export (``.pt2``): ``torch.export.export`` with a dynamic batch, saved by ``torch.export.save``
and loaded back by ``torch.export.load``. The recommended format for PyTorch runtimes (AOTInductor,
ExecuTorch, TensorRT), and the path of the ONNX exporter too."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from torchkeep.errors import ExportError
from torchkeep.export._inputs import Call, dynamic_shapes_for, flat_outputs

__all__ = ["export_program", "load_program"]


def export_program(model: torch.nn.Module, call: Call, file: Path, *, dynamic_batch: bool) -> dict[str, Any]:
    """Write ``torch.export.export(model, ...)`` to ``file``; returns ``exporter`` and ``warnings``."""
    args, kwargs = call
    shapes = dynamic_shapes_for(model, call, torch.export.Dim("batch", min=1)) if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(model, args, kwargs=kwargs or None, dynamic_shapes=shapes)
            torch.export.save(program, str(file))
        except Exception as e:
            first = " ".join(str(e).strip().splitlines()[:2])[:400]
            raise ExportError("torch.export", f"{type(e).__name__}: {first}") from e
    return {"exporter": "torch.export.export", "fallback": "", "opset": None, "warnings": []}


def load_program(path: Path) -> Callable[[Call], list[Any]]:
    """``torch.export.load(path).module()`` as ``run(call) -> flat outputs``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.export.load(str(path)).module()

    def run(call: Call) -> list[Any]:
        args, kwargs = call
        with torch.no_grad():
            return flat_outputs(module(*args, **kwargs))

    return run

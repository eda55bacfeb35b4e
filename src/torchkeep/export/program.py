"""torch.export (``.pt2``): ``torch.export.export`` with dynamic axes, saved by ``torch.export.save``
and loaded back by ``torch.export.load``. The recommended format for PyTorch runtimes (AOTInductor,
ExecuTorch, TensorRT), and the path of the ONNX exporter too."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from torchkeep.export._axes import Axes
from torchkeep.export._failures import capture, failure
from torchkeep.export._inputs import Call, flat_outputs

__all__ = ["export_program", "load_program"]


def export_program(model: torch.nn.Module, call: Call, file: Path, *, axes: Axes) -> dict[str, Any]:
    """Write ``torch.export.export(model, ...)`` with the dynamic ``axes`` to ``file``; returns ``exporter`` and
    ``warnings``. What torch prints while it works (a failed export prints its partial graph) is captured: on
    failure it is on the :class:`ExportError` and in the log file its message names."""
    args, kwargs = call
    captured = None
    try:
        with capture() as captured:
            shapes = axes.torch_shapes(model, call, names=False)
            program = torch.export.export(model, args, kwargs=kwargs or None, dynamic_shapes=shapes)
            torch.export.save(program, str(file))
    except Exception as e:
        raise failure("torch.export", e, captured) from e
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

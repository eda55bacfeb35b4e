"""TensorRT through ``torch_tensorrt`` (dynamo front end), on a CUDA machine only.

Without ``torch_tensorrt`` or without a CUDA device this raises
:class:`~torchkeep.errors.ExportUnavailableError`; nothing is emulated. The artifact is a
``torch.export`` program with TensorRT engines embedded, loaded back with ``torch.export.load``.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from torchkeep.errors import ExportError, ExportUnavailableError
from torchkeep.export._inputs import Call

__all__ = ["export_tensorrt", "load_tensorrt", "require_tensorrt"]

_INSTALL = "pip install torch-tensorrt (matching your torch and CUDA versions)"


def require_tensorrt() -> None:
    """Raise :class:`ExportUnavailableError` unless ``torch_tensorrt`` and a CUDA device are present.

    Example:
        >>> from torchkeep.errors import ExportUnavailableError
        >>> try:
        ...     require_tensorrt()
        ... except ExportUnavailableError as e:  # also an ImportError
        ...     assert "NVIDIA GPU" in str(e)
    """
    missing = []
    if importlib.util.find_spec("torch_tensorrt") is None:
        missing.append("torch_tensorrt")
    if not torch.cuda.is_available():
        missing.append("an NVIDIA GPU with CUDA")
    if missing:
        raise ExportUnavailableError(
            "tensorrt",
            missing,
            _INSTALL if "torch_tensorrt" in missing else "",
            note="TensorRT engines are built for, and run only on, an NVIDIA GPU; on other machines export "
            "to ONNX or torch.export (.pt2) instead.",
        )


def _device() -> torch.device:
    """The device TensorRT engines are built and run on."""
    return torch.device("cuda")


def _to(tree: Any, device: torch.device) -> Any:
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, tree)


def export_tensorrt(model: torch.nn.Module, call: Call, file: Path, *, dynamic_batch: bool) -> dict[str, Any]:
    """Compile with ``torch_tensorrt.compile(ir="dynamo")`` and save the program to ``file``.

    A copy of the model is moved to the GPU and compiled; the user's model stays where it is (the
    eager reference of the verification runs there). Positional and keyword inputs are moved to the
    GPU. Runs only where :func:`require_tensorrt` passes.
    """
    require_tensorrt()
    import torch_tensorrt

    device = _device()
    args, kwargs = _to(call, device)
    try:
        gpu_model = copy.deepcopy(model).to(device).eval()
        compiled = torch_tensorrt.compile(gpu_model, ir="dynamo", arg_inputs=args, kwarg_inputs=kwargs or None)
        torch_tensorrt.save(
            compiled, str(file), output_format="exported_program", arg_inputs=args, kwarg_inputs=kwargs or None
        )
    except Exception as e:
        raise ExportError("tensorrt", f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}") from e
    return {"exporter": "torch_tensorrt.compile(ir='dynamo')", "fallback": "", "opset": None, "warnings": []}


def load_tensorrt(path: Path) -> Any:  # pragma: no cover - needs a CUDA device
    """``torch.export.load(path).module()`` on the GPU as ``run(call) -> flat outputs`` (inputs moved there,
    outputs moved back to the CPU)."""
    import torch_tensorrt  # noqa: F401  (registers the TensorRT engine ops the program calls)

    from torchkeep.export._inputs import flat_outputs

    module = torch.export.load(str(path)).module()
    device = _device()

    def run(call: Call) -> list[Any]:
        args, kwargs = _to(call, device)
        with torch.no_grad():
            return [t.cpu() if isinstance(t, torch.Tensor) else t for t in flat_outputs(module(*args, **kwargs))]

    return run

"""TensorRT through ``torch_tensorrt`` (dynamo front end), on a CUDA machine only.

Without ``torch_tensorrt`` or without a CUDA device this raises
:class:`~torchkeep.errors.ExportUnavailableError`; nothing is emulated. The artifact is a
``torch.export`` program with TensorRT engines embedded, loaded back with ``torch.export.load``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

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


def export_tensorrt(model: torch.nn.Module, call: Call, file: Path, *, dynamic_batch: bool) -> dict[str, Any]:
    """Compile with ``torch_tensorrt.compile(ir="dynamo")`` and save the program to ``file``.

    Runs only where :func:`require_tensorrt` passes (untestable on CPU-only machines).
    """
    require_tensorrt()
    import torch_tensorrt  # pragma: no cover

    args, kwargs = call  # pragma: no cover
    device = torch.device("cuda")  # pragma: no cover
    moved = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)  # pragma: no cover
    try:  # pragma: no cover
        compiled = torch_tensorrt.compile(model.to(device), ir="dynamo", arg_inputs=moved, kwarg_inputs=kwargs or None)
        torch_tensorrt.save(compiled, str(file), output_format="exported_program", arg_inputs=moved)
    except Exception as e:  # pragma: no cover
        raise ExportError("tensorrt", f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    return {"exporter": "torch_tensorrt.compile(ir='dynamo')", "fallback": "", "opset": None, "warnings": []}


def load_tensorrt(path: Path) -> Any:  # pragma: no cover - needs a CUDA device
    """``torch.export.load(path).module()`` on CUDA as ``run(call) -> flat outputs`` (inputs moved to CUDA)."""
    import torch_tensorrt  # noqa: F401  (registers the TensorRT engine ops the program calls)

    from torchkeep.export._inputs import flat_outputs

    module = torch.export.load(str(path)).module()

    def run(call: Call) -> list[Any]:
        from torch.utils import _pytree as pytree

        args, kwargs = pytree.tree_map(lambda t: t.cuda() if isinstance(t, torch.Tensor) else t, call)
        with torch.no_grad():
            return [t.cpu() if isinstance(t, torch.Tensor) else t for t in flat_outputs(module(*args, **kwargs))]

    return run

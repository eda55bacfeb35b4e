"""TorchScript: ``torch.jit.trace`` (default) or ``torch.jit.script``, loaded back with ``torch.jit.load``.

TorchScript is deprecated upstream in favour of ``torch.export``; every export here warns so.
A traced artifact takes the flat tensor inputs positionally, in ``input_names`` order (keyword
inputs included), because tracing records tensors only; outputs keep their structure when
TorchScript can type it (a tensor, tuples, dicts of one value type), else become a flat tuple in
``output_names`` order.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from torchkeep.errors import InvalidArgumentError
from torchkeep.export._failures import capture, failure
from torchkeep.export._inputs import Call, flat_outputs

__all__ = ["DEPRECATION", "export_torchscript", "load_torchscript"]

DEPRECATION = (
    "TorchScript is deprecated upstream and gets no new features; prefer format='torch.export' (.pt2) "
    "or format='onnx' for deployment"
)


class _FlatCall(torch.nn.Module):
    """Calls the model with the call's structure rebuilt from flat tensors (non-tensors are constants)."""

    def __init__(self, model: torch.nn.Module, call: Call, flatten_outputs: bool) -> None:
        super().__init__()
        self.model = model
        leaves, self._spec = pytree.tree_flatten(call)
        self._slots = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
        self._constants = [None if isinstance(v, torch.Tensor) else v for v in leaves]
        self._flatten_outputs = flatten_outputs

    def forward(self, *tensors: torch.Tensor) -> Any:
        leaves = list(self._constants)
        for slot, t in zip(self._slots, tensors, strict=True):
            leaves[slot] = t
        args, kwargs = pytree.tree_unflatten(leaves, self._spec)
        out = self.model(*args, **kwargs)
        return tuple(pytree.tree_leaves(out)) if self._flatten_outputs else out


_META = "torchkeep.json"


def export_torchscript(
    model: torch.nn.Module, call: Call, file: Path, *, method: str = "trace", meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write ``model`` as TorchScript to ``file``; returns ``exporter`` and ``warnings``.

    The file records its calling convention (flat tensors for a trace, the model's signature for a
    script) and ``meta`` (names) in an extra file ``torchkeep.json`` inside the archive.
    """
    if method not in ("trace", "script"):
        raise InvalidArgumentError("method", method, "pass 'trace' (the default) or 'script'")
    notes = [DEPRECATION]
    captured = None
    try:
        with capture() as captured:  # torch's own deprecation and tracer warnings: ours says it once
            if method == "script":
                module = torch.jit.script(model)
            else:
                tensors = tuple(t for t in flat_outputs(call) if isinstance(t, torch.Tensor))
                try:
                    module = _trace(_FlatCall(model, call, False), tensors)
                except RuntimeError as e:
                    if "infer type" not in str(e) and "consistent type" not in str(e):
                        raise
                    module = _trace(_FlatCall(model, call, True), tensors)
                    notes.append(
                        "TorchScript cannot type this output structure: outputs are a flat tuple in output_names order"
                    )
            record = {**(meta or {}), "method": method}
            module.save(str(file), _extra_files={_META: json.dumps(record)})
    except Exception as e:
        hint = (
            "torch.jit.script needs type-annotatable Python: pass method='trace' (checked on other inputs), or "
            "export to another format (torch.export .pt2, or ONNX)."
            if method == "script"
            else None
        )
        raise failure("torchscript", e, captured, hint) from e
    return {"exporter": f"torch.jit.{method}", "fallback": "", "opset": None, "warnings": notes}


def _trace(module: torch.nn.Module, tensors: tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule:
    # check_trace re-runs the model and fails on legitimate differences (e.g. the transformer
    # fast path inside vs outside no_grad); our own verification compares against eager instead
    with torch.no_grad():
        return torch.jit.trace(module, tensors, strict=False, check_trace=False)


def load_torchscript(path: Path) -> Callable[[Call], list[Any]]:
    """``torch.jit.load(path)`` as ``run(call) -> flat outputs`` (the calling convention read from the file)."""
    extra = {_META: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's own deprecation notice
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    try:
        method = json.loads(extra[_META] or "{}").get("method", "trace")
    except ValueError:
        method = "trace"

    def run(call: Call) -> list[Any]:
        with torch.no_grad():
            if method == "script":
                args, kwargs = call
                return flat_outputs(module(*args, **kwargs))
            tensors = [t for t in flat_outputs(call) if isinstance(t, torch.Tensor)]
            return flat_outputs(module(*tensors))

    return run

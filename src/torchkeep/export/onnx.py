"""ONNX: ``torch.onnx.export(dynamo=True)`` (the ``torch.export``-based exporter) with a dynamic
batch through ``dynamic_shapes``; the TorchScript-based exporter only with ``legacy=True`` or as a
recorded fallback. Verified with onnxruntime. Needs the ``torchkeep[onnx]`` extra."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from torchkeep.errors import ExportError, ExportUnavailableError
from torchkeep.export._inputs import Call, dynamic_shapes_for, flat_outputs

__all__ = ["export_onnx", "load_onnx", "require_onnx"]

_INSTALL = 'pip install "torchkeep[onnx]"'


def require_onnx(*, runtime_only: bool = False) -> None:
    """Raise :class:`ExportUnavailableError` naming the missing packages of the ONNX path."""
    needed = ["onnxruntime"] if runtime_only else ["onnx", "onnxscript", "onnxruntime"]
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportUnavailableError("onnx", missing, _INSTALL)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's progress lines and known-noise warnings (real failures still raise)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter._registration")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).strip().splitlines()[:1]) or type(e).__name__
    return f"{type(e).__name__}: {text[:300]}"


def export_onnx(
    model: torch.nn.Module,
    call: Call,
    file: Path,
    *,
    dynamic_batch: bool,
    input_names: list[str],
    output_names: list[str],
    opset: int | None,
    legacy: bool = False,
) -> dict[str, Any]:
    """Write ``model`` as ONNX to ``file``; returns ``exporter``, ``fallback``, ``opset`` and ``warnings``."""
    require_onnx()
    args, kwargs = call
    fallback = ""
    if not legacy:
        try:
            shapes = dynamic_shapes_for(model, call, torch.export.Dim("batch", min=1)) if dynamic_batch else None
            with _quiet():
                program = torch.onnx.export(
                    model,
                    args,
                    kwargs=kwargs or None,
                    dynamo=True,
                    dynamic_shapes=shapes,
                    input_names=input_names,
                    output_names=output_names,
                    opset_version=opset,
                    verbose=False,
                    external_data=True,
                )
                if program is None:  # only when f= is given, which it is not here
                    raise RuntimeError("torch.onnx.export returned no program")
                program.save(str(file))
            return {"exporter": "torch.onnx.export(dynamo=True)", "fallback": "", "opset": _opset(file), "warnings": []}
        except ExportUnavailableError:
            raise
        except Exception as e:  # the fallback is the documented contract: say why, then try the old exporter
            fallback = f"the torch.export-based exporter failed ({_first_line(e)}); used the TorchScript-based one"
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {n: {0: "batch"} for n in [*input_names, *output_names]}
    try:
        with _quiet():
            torch.onnx.export(
                model,
                args if not kwargs else (*args, kwargs),
                str(file),
                dynamo=False,
                input_names=input_names,
                output_names=output_names,
                opset_version=opset,
                dynamic_axes=dynamic_axes,
            )
    except Exception as e:
        raise ExportError("onnx", _first_line(e) + (f" (after: {fallback})" if fallback else "")) from e
    notes = ["the TorchScript-based ONNX exporter is deprecated upstream; prefer the default (legacy=False)"]
    if fallback:
        notes.insert(0, fallback)
    return {
        "exporter": "torch.onnx.export(dynamo=False)",
        "fallback": fallback,
        "opset": _opset(file),
        "warnings": notes,
    }


def _opset(file: Path) -> int | None:
    import onnx

    m = onnx.load(str(file), load_external_data=False)
    return next((int(o.version) for o in m.opset_import if o.domain in ("", "ai.onnx")), None)


def load_onnx(path: Path, input_names: list[str] | None = None) -> Callable[[Call], list[Any]]:
    """An onnxruntime session for ``path`` as ``run(call) -> flat outputs``.

    Inputs are fed by name (``input_names``: the flat tensor inputs in order); inputs the graph
    dropped (unused by the model) are skipped.
    """
    require_onnx(runtime_only=True)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph_inputs = [i.name for i in session.get_inputs()]

    def run(call: Call) -> list[Any]:
        tensors = [t for t in flat_outputs(call) if isinstance(t, torch.Tensor)]
        names = input_names or graph_inputs
        if len(names) != len(tensors):
            names = graph_inputs
        feed = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=False) if n in graph_inputs}
        return [torch.from_numpy(o) if hasattr(o, "dtype") else o for o in session.run(None, feed)]

    return run

"""ONNX: ``torch.onnx.export(dynamo=True)`` (the ``torch.export``-based exporter) with the dynamic
axes through ``dynamic_shapes``, the graph's symbolic dimensions named after them (``batch``, ``seq``); the TorchScript-based exporter only with ``legacy=True`` or as a
recorded, warned fallback when the new exporter breaks down. A model that ``torch.export`` refuses
(a Python branch on a tensor value, a violated shape constraint) is refused here too: tracing it
would freeze one branch silently. Verified with onnxruntime. Needs the ``torchkeep[onnx]`` extra.

External data (weights over the 2 GB protobuf limit) is written beside the model under a name
unique to the export (``model.<token>.onnx.data``), so a re-export never mixes new weights with an
old graph.
"""

from __future__ import annotations

import importlib.util
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from torchkeep.errors import ExportError, ExportUnavailableError
from torchkeep.export._axes import Axes
from torchkeep.export._failures import capture, failure, first_line, refusal
from torchkeep.export._inputs import Call, flat_outputs

__all__ = ["export_onnx", "external_data_files", "load_onnx", "require_onnx"]

_INSTALL = 'pip install "torchkeep[onnx]"'


def require_onnx(*, runtime_only: bool = False) -> None:
    """Raise :class:`ExportUnavailableError` naming the missing packages of the ONNX path."""
    needed = ["onnxruntime"] if runtime_only else ["onnx", "onnxscript", "onnxruntime"]
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportUnavailableError("onnx", missing, _INSTALL)


def export_onnx(
    model: torch.nn.Module,
    call: Call,
    file: Path,
    *,
    axes: Axes,
    input_names: list[str],
    output_names: list[str],
    opset: int | None,
    legacy: bool = False,
    legacy_axes: dict[str, dict[int, str]] | None = None,
) -> dict[str, Any]:
    """Write ``model`` as ONNX to ``file``; returns ``exporter``, ``fallback``, ``opset`` and ``warnings``.

    ``axes``: the dynamic axes (the graph's symbolic dimensions are named after their symbols);
    ``legacy_axes``: the same for the TorchScript-based exporter, outputs included.
    """
    require_onnx()
    args, kwargs = call
    fallback = ""
    if not legacy:
        # a base name unique to this export: the external-data file is named after it
        unique = file.with_name(f"{file.stem}.{secrets.token_hex(4)}{file.suffix}")
        captured = None
        try:
            with capture() as captured:
                program = torch.onnx.export(
                    model,
                    args,
                    kwargs=kwargs or None,
                    dynamo=True,
                    dynamic_shapes=axes.torch_shapes(model, call, names=True),
                    input_names=input_names,
                    output_names=output_names,
                    opset_version=opset,
                    verbose=False,
                    external_data=True,
                )
                if program is None:  # only when f= is given, which it is not here
                    raise RuntimeError("torch.onnx.export returned no program")
                program.save(str(unique))
            unique.replace(file)
            return {"exporter": "torch.onnx.export(dynamo=True)", "fallback": "", "opset": _opset(file), "warnings": []}
        except ExportUnavailableError:
            raise
        except Exception as e:
            hint = refusal(e)
            if hint is not None:  # the model's own problem: tracing it would hide it
                raise failure("onnx", e, captured, hint) from e
            # the exporter itself broke down: the documented fallback, said in the report and as a warning
            fallback = f"the torch.export-based exporter failed ({first_line(e)}); used the TorchScript-based one"
            for leftover in file.parent.iterdir():
                if leftover.name.startswith(unique.name):
                    leftover.unlink(missing_ok=True)
    captured = None
    try:
        with capture() as captured:
            torch.onnx.export(
                model,
                args if not kwargs else (*args, kwargs),
                str(file),
                dynamo=False,
                input_names=input_names,
                output_names=output_names,
                opset_version=opset,
                dynamic_axes=legacy_axes or None,
            )
    except Exception as e:
        raise failure("onnx", e, captured, reason=first_line(e) + (f" (after: {fallback})" if fallback else "")) from e
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


def external_data_files(path: str | Path) -> list[str]:
    """Names of the external-data files ``path`` refers to (beside it), in first-use order; ``[]`` if none.

    Example:
        >>> import onnx, tempfile, os
        >>> from onnx import helper, TensorProto
        >>> graph = helper.make_graph([], "g", [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])])
        >>> path = os.path.join(tempfile.mkdtemp(), "m.onnx")
        >>> onnx.save(helper.make_model(graph), path)
        >>> external_data_files(path)
        []
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names: dict[str, None] = {}

    def tensors(graph: Any) -> Iterator[Any]:
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from tensors(attr.g)
                for g in attr.graphs:
                    yield from tensors(g)

    for t in tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in t.external_data if e.key == "location"), "")
            if location:
                names[location] = None
    return list(names)


_RUNTIME_HINT = (
    "onnxruntime's CPU provider has no kernels for some operators in some dtypes (bfloat16 notably): export the "
    "model in float32 (or float16) for onnxruntime, or pass verify=False to write it unverified for a runtime that "
    "supports it"
)
_SIZE_HINT = (
    "the exported graph fixes the size of an axis that this check changed: make that axis dynamic with "
    "dynamic_axes= (for example {'input_ids': {0: 'batch', 1: 'seq'}}), or feed the sizes of the example inputs"
)


def _run_hint(text: str) -> str:
    """The hint for an onnxruntime error on some inputs: a fixed size, a missing kernel, or none."""
    lowered = text.lower()
    if "invalid dimensions" in lowered or "invalid rank" in lowered:
        return _SIZE_HINT
    if "not_implemented" in lowered or "could not find an implementation" in lowered:
        return _RUNTIME_HINT
    return ""


def load_onnx(path: Path, input_names: list[str] | None = None) -> Callable[[Call], list[Any]]:
    """An onnxruntime session for ``path`` as ``run(call) -> flat outputs``.

    Inputs are fed by name (``input_names``: the flat tensor inputs in order); inputs the graph
    dropped (unused by the model) are skipped. Raises :class:`ExportError` when onnxruntime cannot
    load the model (e.g. no kernel for a bfloat16 operator); a failure to run some inputs is raised
    by ``run`` with the same hint.
    """
    require_onnx(runtime_only=True)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(
            "onnx", f"onnxruntime cannot load the exported model: {first_line(e)}", _RUNTIME_HINT + "."
        ) from e
    graph_inputs = [i.name for i in session.get_inputs()]

    def run(call: Call) -> list[Any]:
        tensors = [t for t in flat_outputs(call) if isinstance(t, torch.Tensor)]
        names = input_names or graph_inputs
        if len(names) != len(tensors):
            names = graph_inputs
        try:
            feed = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=False) if n in graph_inputs}
            outputs = session.run(None, feed)
        except Exception as e:  # onnxruntime's messages are short and their later lines say which sizes: keep all
            text = f"{type(e).__name__}: {' '.join(str(e).split())}"
            hint = _run_hint(text)
            raise RuntimeError(f"{text} ({hint})" if hint else text) from e
        return [torch.from_numpy(o) if hasattr(o, "dtype") else o for o in outputs]

    return run

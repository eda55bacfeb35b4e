"""ONNX: ``torch.onnx.export(dynamo=True)`` (the ``torch.export``-based exporter) with a dynamic
batch through ``dynamic_shapes``; the TorchScript-based exporter only with ``legacy=True`` or as a
recorded, warned fallback when the new exporter breaks down. A model that ``torch.export`` refuses
(a Python branch on a tensor value, a violated shape constraint) is refused here too: tracing it
would freeze one branch silently. Verified with onnxruntime. Needs the ``torchkeep[onnx]`` extra.

External data (weights over the 2 GB protobuf limit) is written beside the model under a name
unique to the export (``model.<token>.onnx.data``), so a re-export never mixes new weights with an
old graph.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import re
import secrets
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from torchkeep.errors import ExportError, ExportUnavailableError
from torchkeep.export._inputs import Call, dynamic_shapes_for, flat_outputs

__all__ = ["export_onnx", "external_data_files", "load_onnx", "require_onnx"]

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
    names = (
        "torch.onnx",
        "torch.onnx._internal.exporter._registration",
        "torch.fx.experimental.symbolic_shapes",
        "torch._dynamo",
        "torch.export",
        "torch._export",
    )
    loggers = [logging.getLogger(n) for n in names]
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


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def _clean(text: str) -> str:
    return _ANSI.sub("", text)


def _chain(e: BaseException) -> list[BaseException]:
    """``e`` and its causes (``raise ... from``, then implicit context), outermost first."""
    out: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in out:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _first_line(e: BaseException) -> str:
    """``Type: first line`` of the innermost cause (the exporter's wrappers only say "step 1/3 failed"),
    without terminal colour codes.

    Example:
        >>> try:
        ...     try:
        ...         raise ValueError("\\x1b[96mdata-dependent\\x1b[0m guard\\nmore")
        ...     except ValueError as inner:
        ...         raise RuntimeError("Failed to export") from inner
        ... except RuntimeError as e:
        ...     _first_line(e)
        'ValueError: data-dependent guard'
    """
    root = _chain(e)[-1]
    lines = [ln.strip() for ln in _clean(str(root)).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return f"{type(root).__name__}: {text[:300]}" if text else type(root).__name__


_BRANCH_HINT = (
    "torch.export refuses a Python branch on a tensor value (such as `if x.sum() > 0:`) because a trace would keep "
    "only the side the example inputs take. Rewrite it with torch.where or torch.cond so that both sides are "
    "exported, or pass legacy=True (CLI: --legacy) to trace it knowingly with the TorchScript-based exporter, "
    "together with verify_inputs= that take the other side."
)
_SHAPE_HINT = (
    "torch.export found a shape constraint the model violates: if the model fixes the batch size, pass "
    "dynamic_batch=False (CLI: --static-batch); or pass legacy=True to trace it with the TorchScript-based exporter."
)
_USER_HINT = (
    "torch.export refused the model (see https://pytorch.org/docs/stable/generated/exportdb/index.html): fix the "
    "model, or pass legacy=True to trace it knowingly with the TorchScript-based exporter."
)


def _refusal(e: BaseException) -> str | None:
    """The hint when ``torch.export`` refused the model for a reason of the model's own (not an exporter bug)."""
    from torch.fx.experimental import symbolic_shapes

    data_dependent = getattr(symbolic_shapes, "GuardOnDataDependentSymNode", ())
    constraint = getattr(symbolic_shapes, "ConstraintViolationError", ())
    try:
        from torch._dynamo.exc import UserError
    except ImportError:  # pragma: no cover - every supported torch has it
        UserError = ()  # type: ignore[assignment,misc]
    for c in _chain(e):
        if data_dependent and isinstance(c, data_dependent):
            return _BRANCH_HINT
        if constraint and isinstance(c, constraint):
            return _SHAPE_HINT
        if UserError and isinstance(c, UserError):
            kind = str(getattr(getattr(c, "error_type", None), "name", ""))
            if "CONSTRAINT" in kind:
                return _SHAPE_HINT
            return _BRANCH_HINT if "data-dependent" in str(c).lower() or "CONTROL_FLOW" in kind else _USER_HINT
    return None


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
        # a base name unique to this export: the external-data file is named after it
        unique = file.with_name(f"{file.stem}.{secrets.token_hex(4)}{file.suffix}")
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
                program.save(str(unique))
            unique.replace(file)
            return {"exporter": "torch.onnx.export(dynamo=True)", "fallback": "", "opset": _opset(file), "warnings": []}
        except ExportUnavailableError:
            raise
        except Exception as e:
            hint = _refusal(e)
            if hint is not None:  # the model's own problem: tracing it would hide it
                raise ExportError("onnx", _first_line(e), hint) from e
            # the exporter itself broke down: the documented fallback, said in the report and as a warning
            fallback = f"the torch.export-based exporter failed ({_first_line(e)}); used the TorchScript-based one"
            for leftover in file.parent.iterdir():
                if leftover.name.startswith(unique.name):
                    leftover.unlink(missing_ok=True)
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
    "model in float32 (or float16) for onnxruntime, or pass verify=False (CLI: --no-verify) to write it unverified "
    "for a runtime that supports it"
)


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
            "onnx", f"onnxruntime cannot load the exported model: {_first_line(e)}", _RUNTIME_HINT + "."
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
        except Exception as e:
            raise RuntimeError(f"{_first_line(e)} ({_RUNTIME_HINT})") from e
        return [torch.from_numpy(o) if hasattr(o, "dtype") else o for o in outputs]

    return run

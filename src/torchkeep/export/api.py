"""``export``: write a deployment artifact atomically, then prove it computes what eager computes.

``verify_export``: the same proof for an artifact already on disk.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from torchkeep.errors import CheckpointNotFoundError, ExportError, ExportVerificationError, InvalidArgumentError
from torchkeep.export._files import staged
from torchkeep.export._inputs import (
    Call,
    as_call,
    batch_size,
    canonical,
    eval_mode,
    flat_outputs,
    input_names_for,
    output_names_for,
    run_eager,
    with_batch,
)
from torchkeep.export.report import Check, ExportReport, OutputError, compare

__all__ = ["FORMATS", "export", "format_for", "verify_export"]

#: The export formats, by their canonical names.
FORMATS = ("onnx", "torchscript", "torch.export", "tensorrt")

_ALIASES = {
    "onnx": "onnx",
    "torchscript": "torchscript",
    "ts": "torchscript",
    "jit": "torchscript",
    "torch.export": "torch.export",
    "torch_export": "torch.export",
    "export": "torch.export",
    "pt2": "torch.export",
    "tensorrt": "tensorrt",
    "trt": "tensorrt",
}
_SUFFIXES = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript", ".pt2": "torch.export"}

PathLike = str | os.PathLike[str]


def format_for(path: PathLike, format: str | None = None) -> str:
    """The canonical format name: ``format`` if given (aliases: ``ts``, ``pt2``, ``trt``), else from the suffix.

    Example:
        >>> format_for("model.onnx"), format_for("m.pt2"), format_for("m.bin", "ts")
        ('onnx', 'torch.export', 'torchscript')
    """
    if format is not None:
        fmt = _ALIASES.get(str(format).lower())
        if fmt is None:
            raise InvalidArgumentError(
                "format",
                format,
                f"unknown export format; pass one of {', '.join(FORMATS)} (aliases: ts, jit, pt2, trt), "
                "or leave it out to pick the format from the file suffix",
            )
        return fmt
    suffix = Path(os.fspath(path)).suffix.lower()
    if suffix not in _SUFFIXES:
        raise InvalidArgumentError(
            "path",
            os.fspath(path),
            f"cannot tell the export format from the suffix {suffix or '(none)'!r}; "
            f"name it .onnx, .pt/.ts (TorchScript) or .pt2 (torch.export), or pass format= ({', '.join(FORMATS)})",
        )
    return _SUFFIXES[suffix]


def export(
    model: torch.nn.Module,
    example_inputs: Any,
    path: PathLike,
    *,
    format: str | None = None,
    dynamic_batch: bool = True,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    opset: int | None = None,
    verify: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
    verify_inputs: Iterable[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    legacy: bool = False,
    method: str = "trace",
) -> ExportReport:
    """Export ``model`` for deployment and check the artifact against the eager model.

    The model is exported in eval mode (every submodule's own train/eval flag is restored
    afterwards, also when the export fails). The artifact is written into a staging directory
    beside ``path``; with ``verify=True`` it is loaded back from there by its own runtime
    (onnxruntime, ``torch.jit.load``, ``torch.export.load``) and run on the example inputs, on
    another batch size when the batch is dynamic, and on each of ``verify_inputs``; every output is
    compared with eager (eval mode, ``torch.no_grad()``), dtype included. Only then is it renamed
    into place (side files first, the main file last, then the previous artifact's side files are
    removed).

    Args:
        model: the module to export.
        example_inputs: a tensor, a tuple of positional inputs, a dict of keyword inputs, or
            ``(args_tuple, kwargs_dict)``.
        path: the artifact. The suffix picks the format unless ``format`` is given:
            ``.onnx``, ``.pt``/``.ts`` (TorchScript), ``.pt2`` (torch.export).
        format: ``"onnx"``, ``"torchscript"``, ``"torch.export"`` or ``"tensorrt"`` (NVIDIA GPU only).
        dynamic_batch: make dim 0 of the batched inputs (those whose dim 0 equals the first input's)
            dynamic. A batch of 1 in the examples is fine: it is exported from a batch of 2.
        input_names / output_names: flat tensor names; default: ``forward``'s parameter names and
            the output's keys (``output`` for a single tensor).
        opset: ONNX opset version (default: the exporter's).
        verify: load and compare the artifact (raises :class:`~torchkeep.errors.ExportVerificationError`).
        rtol / atol: tolerances; default per output dtype (float32: rtol 1e-4, atol 1e-5).
        verify_inputs: more input sets, same forms as ``example_inputs``: pass inputs that take
            other Python branches, so that a trace that froze one branch is caught.
        kwargs: keyword inputs added to ``example_inputs``.
        legacy: ONNX only: use the TorchScript-based exporter (deprecated upstream).
        method: TorchScript only: ``"trace"`` (default) or ``"script"``.

    Returns:
        An :class:`ExportReport`: files, sizes, exporter used, every check's max errors, times.

    Raises:
        ExportVerificationError: the artifact differs from eager (kept at ``path``, with the numbers).
        ExportUnavailableError: the format needs a package or a GPU that is missing.
        ExportError: nothing is written: the exporter failed or refused the model (ONNX and
            torch.export refuse a Python branch on a tensor value: rewrite it with ``torch.where``/
            ``torch.cond``, or trace it knowingly with ``legacy=True`` and ``verify_inputs``), the
            eager model cannot run another batch size (it is fixed: pass ``dynamic_batch=False``),
            or the artifact's runtime cannot load it (onnxruntime and bfloat16).
        InvalidArgumentError: bad arguments (format, names, ``method``, ``verify_inputs`` eager cannot run);
            a ``ValueError``.
        ArgumentTypeError: ``example_inputs`` is not a tensor, tuple/list, dict or ``(args, kwargs)``; a ``TypeError``.

    Example:
        >>> import torch, torchkeep as tk, tempfile, os
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> path = os.path.join(tempfile.mkdtemp(), "model.pt2")
        >>> report = tk.export(model, torch.randn(3, 4), path)
        >>> report.format, report.verified, [c.name for c in report.checks]
        ('torch.export', True, ['example inputs (batch 3)', 'batch 5'])
    """
    fmt = format_for(path, format)
    if method not in ("trace", "script"):
        raise InvalidArgumentError(
            "method", method, "pass 'trace' (the default) or 'script' (TorchScript only; other formats ignore it)"
        )
    if fmt == "tensorrt":
        from torchkeep.export.tensorrt import require_tensorrt

        require_tensorrt()
    elif fmt == "onnx":
        from torchkeep.export.onnx import require_onnx

        require_onnx()
    target = Path(os.fspath(path)).expanduser()
    call = canonical(model, as_call(example_inputs, kwargs))
    extra = [canonical(model, as_call(v)) for v in verify_inputs]
    notes: list[str] = []
    with eval_mode(model):
        want = run_eager(model, call)
        names_in = list(input_names) if input_names is not None else input_names_for(model, call)
        names_out = list(output_names) if output_names is not None else output_names_for(want)
        _check_names("input_names", names_in, len([t for t in flat_outputs(call) if isinstance(t, torch.Tensor)]))
        _check_names("output_names", names_out, len(flat_outputs(want)))
        batch = batch_size(call)
        dynamic = bool(dynamic_batch) and batch is not None
        if fmt == "tensorrt" and dynamic:
            dynamic = False
            notes.append("the TensorRT engine is built for the example shapes (static batch)")
        # torch.export specialises sizes 0 and 1, so a batch of 1 would be frozen: trace a batch of 2
        traced = with_batch(call, 2) if dynamic and batch == 1 else call
        if traced is not call:
            _eager_or_fail(fmt, model, traced, "batch 2")
        plan = _plan(fmt, model, call, want, extra if verify else [], dynamic)
        started = time.perf_counter()
        with staged(target) as stage:
            info = _write(fmt, model, traced, stage.file, dynamic, names_in, names_out, opset, legacy, method)
            export_seconds = time.perf_counter() - started
            notes += info["warnings"]
            if fmt == "torchscript":
                _warn(info["warnings"][0], FutureWarning)
            if info["fallback"]:
                _warn(f"torchkeep.export: {info['fallback']}", UserWarning)
            staged_files = [*sorted(p for p in stage.dir.iterdir() if p != stage.file), stage.file]
            report = ExportReport(
                path=str(target),
                format=fmt,
                exporter=info["exporter"],
                fallback=info["fallback"],
                dynamic_batch=dynamic,
                input_names=names_in,
                output_names=names_out,
                opset=info["opset"],
                files=[str(target.parent / p.name) for p in staged_files[:-1]] + [str(target)],
                bytes=sum(p.stat().st_size for p in staged_files),
                export_seconds=export_seconds,
                rtol=rtol,
                atol=atol,
                warnings=notes,
            )
            failed: ExportVerificationError | None = None
            if verify:  # from the staging directory: an artifact that cannot even be checked is never committed
                try:
                    _verify_into(report, model, plan, stage.file)
                except ExportVerificationError as e:
                    failed = e  # committed all the same, for inspection, as documented
            files = stage.commit(stale=_side_files(fmt, target, previous=True))
        report.files = [str(f) for f in files]
        if failed is not None:
            raise failed
    return report


def _warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first caller outside this package (``tk.export`` goes through
    the package's ``__call__``)."""
    here = os.path.dirname(os.path.abspath(__file__))
    level, frame = 1, sys._getframe(0)
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == here:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def _eager_or_fail(fmt: str, model: torch.nn.Module, call: Call, name: str) -> Any:
    """The eager outputs on inputs torchkeep generated for another batch size; an :class:`ExportError` if the
    model cannot run them (its batch size is baked in)."""
    try:
        return run_eager(model, call)
    except Exception as e:
        first = " ".join(str(e).strip().splitlines()[:1])[:200]
        raise ExportError(
            fmt,
            f"the model cannot run {name} ({type(e).__name__}: {first}): its batch size is fixed",
            "Pass dynamic_batch=False (CLI: --static-batch) to export it for the example batch size only.",
        ) from e


def _plan(
    fmt: str, model: torch.nn.Module, call: Call, want: Any, extra: list[Call], dynamic: bool
) -> list[tuple[str, Call, Any]]:
    """The verification runs ``(name, inputs, eager outputs)``, the eager side computed now, before anything is
    written: the example inputs, another batch size when the batch is dynamic, each of ``verify_inputs``."""
    batch = batch_size(call)
    plan = [(f"example inputs (batch {batch})" if batch is not None else "example inputs", call, want)]
    if dynamic and batch is not None:
        other = with_batch(call, batch + 2, seed=1)
        plan.append((f"batch {batch + 2}", other, _eager_or_fail(fmt, model, other, f"batch {batch + 2}")))
    for i, c in enumerate(extra):
        try:
            out = run_eager(model, c)
        except Exception as e:
            first = " ".join(str(e).strip().splitlines()[:1])[:200]
            raise InvalidArgumentError(
                f"verify_inputs[{i}]",
                c,
                f"the eager model cannot run them ({type(e).__name__}: {first}); pass inputs in the same form as "
                "example_inputs that model(*args, **kwargs) accepts",
            ) from e
        plan.append((f"verify_inputs[{i}]", c, out))
    return plan


def _side_files(fmt: str, path: Path, *, previous: bool = False) -> list[str]:
    """Names of the files beside ``path`` that belong to it (ONNX external data).

    With ``previous``: what an export replacing ``path`` should remove once it is in place, including
    the exporter's default data name ``<name>.data`` of an earlier export.
    """
    if fmt != "onnx" or not path.is_file():
        return []
    from torchkeep.export.onnx import external_data_files

    try:
        names = external_data_files(path)
    except Exception:  # not a readable ONNX file: nothing of it to count or remove
        names = []
    if previous:
        names.append(f"{path.name}.data")
    return [n for n in dict.fromkeys(names) if Path(n).name == n and (path.parent / n).is_file()]


def _check_names(what: str, names: list[str], count: int) -> None:
    if len(names) != count:
        raise InvalidArgumentError(
            what,
            names,
            f"{what} has {len(names)} name(s) but the model has {count} flat tensor(s) there; pass exactly {count} "
            f"name(s), or leave {what} out for the default names",
        )


def _write(
    fmt: str,
    model: torch.nn.Module,
    call: Call,
    file: Path,
    dynamic: bool,
    names_in: list[str],
    names_out: list[str],
    opset: int | None,
    legacy: bool,
    method: str,
) -> dict[str, Any]:
    if fmt == "onnx":
        from torchkeep.export.onnx import export_onnx

        return export_onnx(
            model,
            call,
            file,
            dynamic_batch=dynamic,
            input_names=names_in,
            output_names=names_out,
            opset=opset,
            legacy=legacy,
        )
    if fmt == "torchscript":
        from torchkeep.export.torchscript import export_torchscript

        meta = {"input_names": names_in, "output_names": names_out}
        return export_torchscript(model, call, file, method=method, meta=meta)
    if fmt == "torch.export":
        from torchkeep.export.program import export_program

        return export_program(model, call, file, dynamic_batch=dynamic)
    from torchkeep.export.tensorrt import export_tensorrt

    return export_tensorrt(model, call, file, dynamic_batch=dynamic)  # pragma: no cover - needs a GPU


def _runner(fmt: str, path: Path, input_names: list[str]) -> Callable[[Call], list[Any]]:
    if fmt == "onnx":
        from torchkeep.export.onnx import load_onnx

        return load_onnx(path, input_names)
    if fmt == "torchscript":
        from torchkeep.export.torchscript import load_torchscript

        return load_torchscript(path)
    if fmt == "torch.export":
        from torchkeep.export.program import load_program

        return load_program(path)
    from torchkeep.export.tensorrt import load_tensorrt

    return load_tensorrt(path)  # pragma: no cover - needs a GPU


def _run_check(name: str, run: Callable[[Call], list[Any]], call: Call, eager: Any, report: ExportReport) -> Check:
    want = flat_outputs(eager)
    names = report.output_names if len(report.output_names) == len(want) else output_names_for(want)
    try:
        got = run(call)
    except Exception as e:  # the artifact cannot run these inputs at all: that is the finding
        reason = f"the artifact failed to run: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
        return Check(name, [OutputError(n, [], float("inf"), float("inf"), False, reason) for n in names])
    if len(got) != len(want):
        reason = f"the artifact returned {len(got)} output(s), eager {len(want)}"
        return Check(name, [OutputError(n, [], float("inf"), float("inf"), False, reason) for n in names])
    return Check(name, [compare(n, g, w, report.rtol, report.atol) for n, g, w in zip(names, got, want, strict=True)])


def _verify_into(
    report: ExportReport, model: torch.nn.Module, plan: list[tuple[str, Call, Any]], source: Path | None = None
) -> None:
    """Run the artifact (at ``source``, default ``report.path``) on every planned input set and compare."""
    started = time.perf_counter()
    run = _runner(report.format, source if source is not None else Path(report.path), report.input_names)
    report.checks = [_run_check(name, run, c, eager, report) for name, c, eager in plan]
    report.verify_seconds = time.perf_counter() - started
    if not report.verified:
        raise ExportVerificationError(report.path, report, report.failures())


def verify_export(
    path: PathLike,
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    format: str | None = None,
    dynamic_batch: bool = True,
    verify_inputs: Iterable[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> ExportReport:
    """Check an artifact already on disk against ``model``: the checks of :func:`export`, nothing written.

    Useful in CI and before shipping a file that was exported elsewhere or may have been altered.

    Returns:
        An :class:`ExportReport` with ``verified`` True.

    Raises:
        ExportVerificationError: the artifact differs from eager; the report with the numbers is on it.
        CheckpointNotFoundError: ``path`` does not exist (a ``FileNotFoundError``).
        InvalidArgumentError: bad arguments, as in :func:`export`.

    Example:
        >>> import torch, torchkeep as tk, tempfile, os
        >>> from torchkeep.export import verify_export
        >>> model = torch.nn.Linear(4, 2)
        >>> path = os.path.join(tempfile.mkdtemp(), "model.pt2")
        >>> _ = tk.export(model, torch.randn(2, 4), path, verify=False)
        >>> verify_export(path, model, torch.randn(2, 4)).verified
        True
    """
    fmt = format_for(path, format)
    target = Path(os.fspath(path)).expanduser()
    if not target.exists():
        raise CheckpointNotFoundError(
            target, "Pass the path of an artifact written by tk.export (or export one there first); check the path."
        )
    call = canonical(model, as_call(example_inputs, kwargs))
    extra = [canonical(model, as_call(v)) for v in verify_inputs]
    with eval_mode(model):
        want = run_eager(model, call)
        dynamic = bool(dynamic_batch) and batch_size(call) is not None
        plan = _plan(fmt, model, call, want, extra, dynamic)
        files = [target.parent / n for n in _side_files(fmt, target)] + [target]
        report = ExportReport(
            path=str(target),
            format=fmt,
            exporter="(existing file)",
            dynamic_batch=dynamic,
            input_names=list(input_names) if input_names is not None else input_names_for(model, call),
            output_names=list(output_names) if output_names is not None else output_names_for(want),
            files=[str(f) for f in files],
            bytes=sum(f.stat().st_size for f in files),
            rtol=rtol,
            atol=atol,
        )
        _verify_into(report, model, plan)
    return report

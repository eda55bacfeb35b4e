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
from torchkeep.export._axes import Axes, check_output_keys, resized, resolve
from torchkeep.export._failures import check_outputs, first_line
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
)
from torchkeep.export._transformers import TensorOutputs, output_note, prepare
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
    dynamic_axes: Mapping[str, Any] | None = None,
    dynamic_shapes: Any = None,
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
    other sizes of the dynamic axes (batch and sequence together, e.g. ``batch 4, seq 7`` for an
    example of 2x12), and on each of ``verify_inputs``; every output is compared with eager (eval
    mode, ``torch.no_grad()``), dtype included, and each check records the input shapes it ran.
    Only then is it renamed into place (side files first, the main file last, then the previous
    artifact's side files are removed).

    A transformers model (recognised without importing transformers) gets defaults, listed in the
    report's ``defaults`` with how to override each: ``use_cache=False`` (a key/value cache cannot
    be an output), dynamic ``batch`` and ``seq`` axes on its token inputs (``input_ids``,
    ``attention_mask``, ...), and its ``ModelOutput`` returned as a plain dict of tensors
    (``logits``, ``last_hidden_state``).

    Args:
        model: the module to export.
        example_inputs: a tensor, a tuple of positional inputs, a dict of keyword inputs (named
            inputs such as ``{"input_ids": ids, "attention_mask": mask}``), or ``(args_tuple, kwargs_dict)``.
        path: the artifact. The suffix picks the format unless ``format`` is given:
            ``.onnx``, ``.pt``/``.ts`` (TorchScript), ``.pt2`` (torch.export).
        format: ``"onnx"``, ``"torchscript"``, ``"torch.export"`` or ``"tensorrt"`` (NVIDIA GPU only).
        dynamic_batch: make dim 0 of the batched inputs (those whose dim 0 equals the first input's)
            dynamic. A batch of 1 in the examples is fine: it is exported from a batch of 2.
            ``False``: every size is fixed (also a transformers model's sequence axis).
        dynamic_axes: the dynamic axes by input name, ``{"input_ids": {0: "batch", 1: "seq"}}``
            (input -> axis -> symbol; axes sharing a symbol change size together; a list of axes
            names them ``<input>_dim<axis>``). Replaces ``dynamic_batch``: name every axis that may change.
            ONNX names the graph's dimensions after the symbols; TorchScript records no axes, so its
            trace is only checked at the other sizes.
        dynamic_shapes: torch's own form (``torch.export.Dim`` objects, ``Dim.AUTO``/``Dim.DYNAMIC``),
            passed to ``torch.export``/the ONNX exporter as given, instead of ``dynamic_axes``.
        input_names / output_names: flat tensor names; default: ``forward``'s parameter names and
            the output's keys (``output`` for a single tensor).
        opset: ONNX opset version (default: the exporter's).
        verify: load and compare the artifact (raises :class:`~torchkeep.errors.ExportVerificationError`).
        rtol / atol: tolerances; default per output dtype (float32: rtol 1e-4, atol 1e-5).
        verify_inputs: more input sets, same forms as ``example_inputs``: pass inputs that take
            other Python branches, so that a trace that froze one branch is caught.
        kwargs: keyword inputs of the forward call, added to ``example_inputs`` (e.g.
            ``{"attention_mask": mask}``; non-tensor values such as ``use_cache=False`` are constants).
        legacy: ONNX only: use the TorchScript-based exporter (deprecated upstream).
        method: TorchScript only: ``"trace"`` (default) or ``"script"``.

    Returns:
        An :class:`ExportReport`: files, sizes, exporter used, dynamic axes, defaults chosen, every
        check's input shapes and max errors, times.

    Raises:
        ExportVerificationError: the artifact differs from eager (kept at ``path``, with the numbers).
        ExportUnavailableError: the format needs a package or a GPU that is missing.
        ExportError: nothing is written; the message names the cause: an output no format can carry
            (a transformers cache: ``use_cache=False``), a Python branch on a tensor value (rewrite
            it with ``torch.where``/``torch.cond``, or trace it knowingly with ``legacy=True`` and
            ``verify_inputs``), a size the model fixes (it cannot run another batch size or sequence
            length: ``dynamic_batch=False`` or fewer ``dynamic_axes``), or a runtime that cannot load
            the artifact (onnxruntime and bfloat16). What the exporter printed is on the error
            (``details``) and in the log file its message names, never on the terminal.
        InvalidArgumentError: bad arguments (format, names, ``method``, ``dynamic_axes``, ``verify_inputs``
            eager cannot run); a ``ValueError``.
        ArgumentTypeError: ``example_inputs`` is not a tensor, tuple/list, dict or ``(args, kwargs)``; a ``TypeError``.

    Example:
        >>> import torch, torchkeep as tk, tempfile, os
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> path = os.path.join(tempfile.mkdtemp(), "model.pt2")
        >>> report = tk.export(model, torch.randn(3, 4), path)
        >>> report.format, report.verified, [c.name for c in report.checks]
        ('torch.export', True, ['example inputs (batch 3)', 'batch 5'])
        >>> seq = torch.nn.Embedding(10, 4)
        >>> report = tk.export(seq, torch.randint(0, 10, (2, 12)), path, dynamic_axes={"input": {0: "batch", 1: "seq"}})
        >>> [c.name for c in report.checks], report.checks[1].shapes
        (['example inputs (batch 2, seq 12)', 'batch 4, seq 7'], {'input': [4, 7]})
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
    call = as_call(example_inputs, kwargs)
    extra = [as_call(v) for v in verify_inputs]
    with eval_mode(model):
        try:
            job = _prepare(fmt, model, call, input_names, output_names, dynamic_batch, dynamic_axes, dynamic_shapes)
            # torch.export specialises sizes 0 and 1, so such a dynamic size would be frozen: export from 2
            traced = resized(job.call, job.axes, job.axes.trace_sizes())
            if job.axes.trace_sizes() != job.axes.sizes:
                _eager_or_fail(fmt, job, traced, job.axes.trace_sizes())
            plan = _plan(fmt, job, extra if verify else [])
            legacy_axes = _legacy_axes(job, plan) if fmt == "onnx" else None
            started = time.perf_counter()
            with staged(target) as stage:
                info = _write(fmt, job, traced, stage.file, opset, legacy, method, legacy_axes)
                export_seconds = time.perf_counter() - started
                if fmt == "torchscript":
                    _warn(info["warnings"][0], FutureWarning)
                if info["fallback"]:
                    _warn(f"torchkeep.export: {info['fallback']}", UserWarning)
                staged_files = [*sorted(p for p in stage.dir.iterdir() if p != stage.file), stage.file]
                report = _report(job, target, fmt, rtol, atol, info=info)
                report.files = [str(target.parent / p.name) for p in staged_files[:-1]] + [str(target)]
                report.bytes = sum(p.stat().st_size for p in staged_files)
                report.export_seconds = export_seconds
                failed: ExportVerificationError | None = None
                if verify:  # from the staging directory: an artifact that cannot even be checked is never committed
                    try:
                        _verify_into(report, plan, stage.file)
                    except ExportVerificationError as e:
                        failed = e  # committed all the same, for inspection, as documented
                files = stage.commit(stale=_side_files(fmt, target, previous=True))
        except ExportError as e:
            if e.path is not None:
                raise
            raise ExportError(e.format, e.reason, e.hint, path=target, details=e.details, log=e.log) from (
                e.__cause__ or e
            )
        report.files = [str(f) for f in files]
        if failed is not None:
            raise failed
    return report


class _Job:
    """What one export works on: the module (a transformers model behind :class:`TensorOutputs`), the call, its
    eager outputs, the names, the dynamic axes, and the defaults chosen for the model."""

    def __init__(self, module: torch.nn.Module, call: Call, want: Any, names_in: list[str], names_out: list[str]):
        self.module, self.call, self.want, self.names_in, self.names_out = module, call, want, names_in, names_out
        self.axes = Axes(names_in)
        self.defaults: list[str] = []
        self.notes: list[str] = []


def _prepare(
    fmt: str,
    model: torch.nn.Module,
    call: Call,
    input_names: list[str] | None,
    output_names: list[str] | None,
    dynamic_batch: bool,
    dynamic_axes: Mapping[str, Any] | None,
    dynamic_shapes: Any,
) -> _Job:
    """Run eager once, refuse outputs no format carries, name inputs and outputs, resolve the dynamic axes (and a
    transformers model's defaults)."""
    module, default_axes, defaults = prepare(model, call)
    call = canonical(module, call)
    want = run_eager(module, call)
    check_outputs(fmt, want)
    names_in = list(input_names) if input_names is not None else input_names_for(module, call)
    names_out = list(output_names) if output_names is not None else output_names_for(want)
    _check_names("input_names", names_in, len([t for t in flat_outputs(call) if isinstance(t, torch.Tensor)]))
    _check_names("output_names", names_out, len(flat_outputs(want)))
    job = _Job(module, call, want, names_in, names_out)
    job.axes = resolve(
        module,
        call,
        names_in,
        dynamic_batch=bool(dynamic_batch),
        dynamic_axes=dynamic_axes,
        dynamic_shapes=dynamic_shapes,
        defaults=default_axes,
    )
    check_output_keys(job.axes, names_out)
    job.defaults = list(defaults)
    if isinstance(module, TensorOutputs) and output_note(want):
        job.defaults.append(output_note(want))
    if default_axes and dynamic_batch and dynamic_axes is None and dynamic_shapes is None and job.axes.axes:
        shown = "; ".join(f"{n} {a}" for n, a in job.axes.axes.items())
        job.defaults.append(
            f"dynamic axes: {shown}; to choose others, pass dynamic_axes= (or dynamic_batch=False for fixed shapes)"
        )
    if fmt == "tensorrt" and job.axes.axes:
        job.axes = Axes(names_in)
        job.notes.append("the TensorRT engine is built for the example shapes (static batch)")
    return job


def _report(
    job: _Job, target: Path, fmt: str, rtol: float | None, atol: float | None, info: dict[str, Any] | None = None
) -> ExportReport:
    info = info or {"exporter": "(existing file)", "fallback": "", "opset": None, "warnings": []}
    return ExportReport(
        path=str(target),
        format=fmt,
        exporter=info["exporter"],
        fallback=info["fallback"],
        dynamic_batch=job.axes.batch,
        dynamic_axes={n: dict(a) for n, a in job.axes.axes.items()},
        input_names=job.names_in,
        output_names=job.names_out,
        opset=info["opset"],
        rtol=rtol,
        atol=atol,
        defaults=list(job.defaults),
        warnings=[*job.notes, *info["warnings"]],
    )


def _warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first caller outside this package (``tk.export`` goes through
    the package's ``__call__``)."""
    here = os.path.dirname(os.path.abspath(__file__))
    level, frame = 1, sys._getframe(0)
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == here:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def _eager_or_fail(fmt: str, job: _Job, call: Call, sizes: Mapping[str, int]) -> Any:
    """The eager outputs on inputs torchkeep generated at other sizes of the dynamic axes; an :class:`ExportError` if
    the model cannot run them (a size is baked in)."""
    name = job.axes.label(sizes)
    try:
        return run_eager(job.module, call)
    except Exception as e:
        changed = [sym for sym, n in sizes.items() if job.axes.sizes.get(sym) != n]
        if len(changed) > 1:  # which of them: each one alone
            alone = [sym for sym in changed if not _runs(job, {**job.axes.sizes, sym: sizes[sym]})]
            changed = alone or changed
        if set(changed) <= {"batch"}:
            why, hint = (
                "its batch size is fixed",
                "Pass dynamic_batch=False to export it for the example batch size only.",
            )
        else:
            why = f"the size of {' and '.join(changed)} is fixed"
            hint = (
                "Pass dynamic_axes= naming only the axes that can change, or dynamic_batch=False to export it for the "
                "example shapes only."
            )
        raise ExportError(fmt, f"the model cannot run {name} ({first_line(e)}): {why}", hint) from e


def _runs(job: _Job, sizes: Mapping[str, int]) -> bool:
    try:
        run_eager(job.module, resized(job.call, job.axes, sizes, seed=1))
    except Exception:
        return False
    return True


def _plan(fmt: str, job: _Job, extra: list[Call]) -> list[tuple[str, Call, Any]]:
    """The verification runs ``(name, inputs, eager outputs)``, the eager side computed now, before anything is
    written: the example inputs, other sizes of the dynamic axes (batch and sequence together), each of
    ``verify_inputs``."""
    axes, call = job.axes, job.call
    if axes.sizes:
        first = f"example inputs ({axes.label(axes.sizes)})"
    else:
        batch = batch_size(call)
        first = f"example inputs (batch {batch})" if batch is not None else "example inputs"
    plan = [(first, call, job.want)]
    other = axes.other_sizes()
    if other != axes.sizes:
        inputs = resized(call, axes, other, seed=1)
        plan.append((axes.label(other), inputs, _eager_or_fail(fmt, job, inputs, other)))
    for i, c in enumerate(extra):
        c = canonical(job.module, c)
        try:
            out = run_eager(job.module, c)
        except Exception as e:
            raise InvalidArgumentError(
                f"verify_inputs[{i}]",
                c,
                f"the eager model cannot run them ({first_line(e)}); pass inputs in the same form as "
                "example_inputs that model(*args, **kwargs) accepts",
            ) from e
        plan.append((f"verify_inputs[{i}]", c, out))
    return plan


def _legacy_axes(job: _Job, plan: list[tuple[str, Call, Any]]) -> Any:
    """The TorchScript-based ONNX exporter's ``dynamic_axes``, outputs included (from how they changed size)."""
    if len(plan) < 2 or not job.axes.axes:
        return job.axes.legacy(job.names_out, [], [], {})
    other = flat_outputs(plan[1][2])
    return job.axes.legacy(job.names_out, flat_outputs(job.want), other, job.axes.other_sizes())


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
    job: _Job,
    call: Call,
    file: Path,
    opset: int | None,
    legacy: bool,
    method: str,
    legacy_axes: Any,
) -> dict[str, Any]:
    model, names_in, names_out = job.module, job.names_in, job.names_out
    if fmt == "onnx":
        from torchkeep.export.onnx import export_onnx

        return export_onnx(
            model,
            call,
            file,
            axes=job.axes,
            input_names=names_in,
            output_names=names_out,
            opset=opset,
            legacy=legacy,
            legacy_axes=legacy_axes,
        )
    if fmt == "torchscript":
        from torchkeep.export.torchscript import export_torchscript

        meta = {"input_names": names_in, "output_names": names_out}
        return export_torchscript(model, call, file, method=method, meta=meta)
    if fmt == "torch.export":
        from torchkeep.export.program import export_program

        return export_program(model, call, file, axes=job.axes)
    from torchkeep.export.tensorrt import export_tensorrt

    return export_tensorrt(model, call, file, dynamic_batch=False)  # pragma: no cover - needs a GPU


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
    tensors = [t for t in flat_outputs(call) if isinstance(t, torch.Tensor)]
    shapes = {n: list(t.shape) for n, t in zip(report.input_names, tensors, strict=False)}
    try:
        got = run(call)
    except Exception as e:  # the artifact cannot run these inputs at all: that is the finding
        reason = f"the artifact failed to run: {type(e).__name__}: {' '.join(str(e).split())}"
        return Check(name, [OutputError(n, [], float("inf"), float("inf"), False, reason) for n in names], shapes)
    if len(got) != len(want):
        reason = f"the artifact returned {len(got)} output(s), eager {len(want)}"
        return Check(name, [OutputError(n, [], float("inf"), float("inf"), False, reason) for n in names], shapes)
    outputs = [compare(n, g, w, report.rtol, report.atol) for n, g, w in zip(names, got, want, strict=True)]
    return Check(name, outputs, shapes)


def _verify_into(report: ExportReport, plan: list[tuple[str, Call, Any]], source: Path | None = None) -> None:
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
    dynamic_axes: Mapping[str, Any] | None = None,
    dynamic_shapes: Any = None,
    verify_inputs: Iterable[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> ExportReport:
    """Check an artifact already on disk against ``model``: the checks of :func:`export`, nothing written.

    Useful in CI and before shipping a file that was exported elsewhere or may have been altered.
    The dynamic axes (``dynamic_batch``, ``dynamic_axes``, ``dynamic_shapes``, a transformers model's defaults)
    say at which other sizes the artifact is checked, as in :func:`export`.

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
    call = as_call(example_inputs, kwargs)
    extra = [as_call(v) for v in verify_inputs]
    with eval_mode(model):
        job = _prepare(fmt, model, call, input_names, output_names, dynamic_batch, dynamic_axes, dynamic_shapes)
        plan = _plan(fmt, job, extra)
        files = [target.parent / n for n in _side_files(fmt, target)] + [target]
        report = _report(job, target, fmt, rtol, atol)
        report.files = [str(f) for f in files]
        report.bytes = sum(f.stat().st_size for f in files)
        _verify_into(report, plan)
    return report

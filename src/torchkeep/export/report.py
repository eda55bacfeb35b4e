"""What an export did and how close the artifact came to the eager model: :class:`ExportReport`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["Check", "ExportReport", "OutputError", "compare", "default_tolerances", "json_ready"]

#: Default ``(rtol, atol)`` per output dtype: loose enough for the re-ordered arithmetic of
#: another runtime (fused BatchNorm, other GEMM kernels), tight enough to catch a wrong weight.
_TOLERANCES = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


def default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` for comparing outputs of ``dtype``; ``(0, 0)`` (exact) for integers and bools.

    Example:
        >>> import torch
        >>> default_tolerances(torch.float32), default_tolerances(torch.int64)
        ((0.0001, 1e-05), (0.0, 0.0))
    """
    if dtype in _TOLERANCES:
        return _TOLERANCES[dtype]
    if dtype.is_floating_point or dtype.is_complex:
        return _TOLERANCES[torch.float16]
    return (0.0, 0.0)


@dataclass
class OutputError:
    """The comparison of one output of one check.

    Attributes:
        name: the output's name (``output``, ``logits``, ``aux.0``).
        shape: the eager output's shape.
        max_abs: max absolute difference.
        max_rel: max relative difference over the elements whose eager value exceeds ``atol`` in size.
        ok: within ``atol + rtol * |eager|`` everywhere, same shape, NaNs in the same places.
        reason: why not, when not ok (``"shape (3, 2) != (2, 2)"``, ``"dtype float16 != float32"``,
            ``"values differ"``).
        rtol / atol: the tolerances this output was compared with (the per-dtype defaults unless
            given); ``None`` when no numeric comparison applied.
    """

    name: str
    shape: list[int]
    max_abs: float
    max_rel: float
    ok: bool
    reason: str = ""
    rtol: float | None = None
    atol: float | None = None


@dataclass
class Check:
    """One verification run: the artifact and the eager model on one set of inputs.

    Attributes:
        name: ``"example inputs (batch 2)"``, ``"batch 4"``, ``"batch 4, seq 7"``, ``"verify_inputs[0]"``.
        outputs: one :class:`OutputError` per output.
        shapes: the shape of each tensor input of this run, by input name.
    """

    name: str
    outputs: list[OutputError]
    shapes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)


@dataclass
class ExportReport:
    """The result of :func:`torchkeep.export`: what was written, how, and how well it matches eager.

    Attributes:
        path: the artifact.
        format: ``"onnx"``, ``"torchscript"``, ``"torch.export"`` or ``"tensorrt"``.
        exporter: the call that produced it, e.g. ``"torch.onnx.export(dynamo=True)"``.
        fallback: why the preferred exporter was not used (empty when it was).
        dynamic_batch: whether dim 0 of an input is dynamic in the artifact.
        dynamic_axes: the dynamic axes, input name -> axis -> symbol (``{"input_ids": {0: "batch", 1: "seq"}}``).
        input_names / output_names: the artifact's flat input and output names.
        opset: the ONNX opset (ONNX only).
        files: every file written (an ONNX model may have an external-data file).
        bytes: their total size.
        export_seconds / verify_seconds: wall time of each phase.
        checks: the verification runs (empty with ``verify=False``).
        rtol / atol: the tolerances asked for (``None``: per-dtype defaults; each output records
            the tolerances it was actually compared with).
        defaults: what torchkeep chose for this model and how to override it (a transformers model: no cache
            outputs, dynamic batch and sequence, a dict of tensors as output).
        warnings: notes for the user (deprecations, fallbacks).

    Example:
        >>> r = ExportReport(path="m.onnx", format="onnx", exporter="torch.onnx.export(dynamo=True)")
        >>> r.verified, r.max_abs_error
        (False, 0.0)
    """

    path: str
    format: str
    exporter: str
    fallback: str = ""
    dynamic_batch: bool = False
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    opset: int | None = None
    files: list[str] = field(default_factory=list)
    bytes: int = 0
    export_seconds: float = 0.0
    verify_seconds: float = 0.0
    checks: list[Check] = field(default_factory=list)
    rtol: float | None = None
    atol: float | None = None
    defaults: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        """True when at least one check ran and every check passed."""
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def max_abs_error(self) -> float:
        """The largest absolute difference over every check and output."""
        return max((o.max_abs for c in self.checks for o in c.outputs), default=0.0)

    @property
    def max_rel_error(self) -> float:
        """The largest relative difference over every check and output."""
        return max((o.max_rel for c in self.checks for o in c.outputs), default=0.0)

    def failures(self) -> list[tuple[str, str, float, float, str]]:
        """``(check, output, max_abs, max_rel, reason)`` of every output that failed."""
        return [(c.name, o.name, o.max_abs, o.max_rel, o.reason) for c in self.checks for o in c.outputs if not o.ok]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``torchkeep export --json`` prints).

        Non-finite numbers (the errors of an output that could not be compared) become ``None``,
        so the result is strict JSON (``json.dumps(..., allow_nan=False)`` accepts it).
        """
        d = asdict(self)
        d["verified"] = self.verified
        d["max_abs_error"] = self.max_abs_error
        d["max_rel_error"] = self.max_rel_error
        for c, check in zip(d["checks"], self.checks, strict=True):
            c["ok"] = check.ok
        return json_ready(d)

    def __post_init__(self) -> None:
        self.path = str(Path(self.path))


def json_ready(obj: Any) -> Any:
    """``obj`` with every non-finite float (``inf``, ``nan``) replaced by ``None``, recursively.

    Example:
        >>> json_ready({"a": float("inf"), "b": [1.5, float("nan")], "c": "x"})
        {'a': None, 'b': [1.5, None], 'c': 'x'}
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


def compare(name: str, got: Any, want: Any, rtol: float | None, atol: float | None) -> OutputError:
    """Compare one artifact output with the eager one (tensors; other leaves must be equal)."""
    if not isinstance(want, torch.Tensor):
        same = got == want if not isinstance(got, torch.Tensor) else got.numel() == 1 and got.item() == want
        return OutputError(name, [], 0.0, 0.0, bool(same), "" if same else f"{got!r} != {want!r}")
    if not isinstance(got, torch.Tensor):
        got = torch.as_tensor(got)
    want = want.detach().cpu()
    got = got.detach().cpu()
    shape = list(want.shape)
    d_rtol, d_atol = default_tolerances(want.dtype)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    if tuple(got.shape) != tuple(want.shape):
        why = f"shape {tuple(got.shape)} != {tuple(want.shape)}"
        return OutputError(name, shape, math.inf, math.inf, False, why, rtol, atol)
    if got.dtype != want.dtype:
        why = f"dtype {_dtype_name(got.dtype)} != {_dtype_name(want.dtype)} (eager)"
        return OutputError(name, shape, math.inf, math.inf, False, why, rtol, atol)
    if want.numel() == 0:
        return OutputError(name, shape, 0.0, 0.0, True, "", rtol, atol)
    w = want.double() if not want.is_complex() else want.to(torch.complex128)
    g = got.to(w.dtype)
    nan_w, nan_g = torch.isnan(w), torch.isnan(g)
    if not torch.equal(nan_w, nan_g):
        return OutputError(name, shape, math.nan, math.nan, False, "NaNs in other places", rtol, atol)
    w = torch.where(nan_w, torch.zeros_like(w), w)
    g = torch.where(nan_g, torch.zeros_like(g), g)
    diff = (g - w).abs()
    diff = torch.where(torch.isinf(w) & (g == w), torch.zeros_like(diff), diff)  # inf == inf is a match
    max_abs = float(diff.max())
    big = w.abs() > max(atol, 1e-12)
    max_rel = float((diff[big] / w.abs()[big]).max()) if bool(big.any()) else 0.0
    ok = bool((diff <= atol + rtol * w.abs()).all())
    return OutputError(name, shape, max_abs, max_rel, ok, "" if ok else "values differ", rtol, atol)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")

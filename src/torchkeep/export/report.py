"""What an export did and how close the artifact came to the eager model: :class:`ExportReport`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["Check", "ExportReport", "OutputError", "compare", "default_tolerances"]

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
        reason: why not, when not ok (``"shape (3, 2) != (2, 2)"``, ``"values differ"``).
    """

    name: str
    shape: list[int]
    max_abs: float
    max_rel: float
    ok: bool
    reason: str = ""


@dataclass
class Check:
    """One verification run: the artifact and the eager model on one set of inputs.

    Attributes:
        name: ``"example inputs (batch 2)"``, ``"batch 3"``, ``"verify_inputs[0]"``.
        outputs: one :class:`OutputError` per output.
    """

    name: str
    outputs: list[OutputError]

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
        dynamic_batch: whether dim 0 of the batched inputs is dynamic in the artifact.
        input_names / output_names: the artifact's flat input and output names.
        opset: the ONNX opset (ONNX only).
        files: every file written (an ONNX model may have an external-data file).
        bytes: their total size.
        export_seconds / verify_seconds: wall time of each phase.
        checks: the verification runs (empty with ``verify=False``).
        rtol / atol: the tolerances used (``None``: per-dtype defaults).
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
        """A JSON-ready dict (what ``torchkeep export --json`` prints)."""
        d = asdict(self)
        d["verified"] = self.verified
        d["max_abs_error"] = self.max_abs_error
        d["max_rel_error"] = self.max_rel_error
        for c, check in zip(d["checks"], self.checks, strict=True):
            c["ok"] = check.ok
        return d

    def __post_init__(self) -> None:
        self.path = str(Path(self.path))


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
    if tuple(got.shape) != tuple(want.shape):
        return OutputError(name, shape, math.inf, math.inf, False, f"shape {tuple(got.shape)} != {tuple(want.shape)}")
    d_rtol, d_atol = default_tolerances(want.dtype)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    if want.numel() == 0:
        return OutputError(name, shape, 0.0, 0.0, True)
    w = want.double() if not want.is_complex() else want.to(torch.complex128)
    g = got.to(w.dtype)
    nan_w, nan_g = torch.isnan(w), torch.isnan(g)
    if not torch.equal(nan_w, nan_g):
        return OutputError(name, shape, math.nan, math.nan, False, "NaNs in other places")
    w = torch.where(nan_w, torch.zeros_like(w), w)
    g = torch.where(nan_g, torch.zeros_like(g), g)
    diff = (g - w).abs()
    diff = torch.where(torch.isinf(w) & (g == w), torch.zeros_like(diff), diff)  # inf == inf is a match
    max_abs = float(diff.max())
    big = w.abs() > max(atol, 1e-12)
    max_rel = float((diff[big] / w.abs()[big]).max()) if bool(big.any()) else 0.0
    ok = bool((diff <= atol + rtol * w.abs()).all())
    return OutputError(name, shape, max_abs, max_rel, ok, "" if ok else "values differ")

"""Why an export failed, in one line that names the cause, with everything else kept out of the terminal.

Exporters print a lot while they work and more when they fail (torch.export prints the partial
graph on stderr, the symbolic-shape machinery logs warnings, the ONNX exporter prints progress on
stdout). :func:`capture` collects all of it; :func:`failure` turns an exporter's exception into an
:class:`~torchkeep.errors.ExportError` whose message is the cause and what to do, with the captured
output and the full exception on the error (``details``) and in a log file named in the message.
:func:`check_outputs` refuses, before any exporter runs, outputs that no format can carry (a
transformers key/value cache).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import tempfile
import traceback
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils import _pytree as pytree

from torchkeep.errors import ExportError

__all__ = ["Captured", "capture", "check_outputs", "failure", "first_line", "refusal"]

# loggers whose handlers write to the terminal while an exporter runs
_LOGGERS = ("torch", "onnxscript", "onnx_ir", "onnx", "transformers")


class Captured:
    """What an exporter printed and logged inside :func:`capture`."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.warnings: list[warnings.WarningMessage] = []

    def text(self) -> str:
        lines = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in self.warnings]
        return self.stream.getvalue() + "".join(f"{line}\n" for line in lines)


@contextlib.contextmanager
def capture() -> Iterator[Captured]:
    """Inside the block, stdout, stderr, warnings and the exporters' loggers go to a :class:`Captured`.

    Logger levels are left as they are; only where their records go changes, for the block.

    Example:
        >>> import sys
        >>> with capture() as out:
        ...     print("graph dump", file=sys.stderr)
        >>> out.text()
        'graph dump\\n'
    """
    captured = Captured()
    handler = logging.StreamHandler(captured.stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    saved: list[tuple[logging.Logger, list[logging.Handler], bool]] = []
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        top = name in _LOGGERS
        if isinstance(logger, logging.Logger) and (top or (name.split(".")[0] in _LOGGERS and logger.handlers)):
            saved.append((logger, list(logger.handlers), logger.propagate))
    for name in _LOGGERS:  # the top-level ones even when nothing configured them yet
        logger = logging.getLogger(name)
        if all(s[0] is not logger for s in saved):
            saved.append((logger, list(logger.handlers), logger.propagate))
    try:
        for logger, _, _ in saved:
            logger.handlers = [handler]
            logger.propagate = False
        with (
            warnings.catch_warnings(record=True) as caught,
            contextlib.redirect_stdout(captured.stream),
            contextlib.redirect_stderr(captured.stream),
        ):
            warnings.simplefilter("always")
            try:
                yield captured
            finally:
                captured.warnings = list(caught)
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers = handlers
            logger.propagate = propagate


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def _chain(e: BaseException) -> list[BaseException]:
    """``e`` and its causes (``raise ... from``, then implicit context), outermost first."""
    out: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in out:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def first_line(e: BaseException) -> str:
    """``Type: first line`` of the innermost cause (the exporters' wrappers only say "step 1/3 failed"),
    whole, without terminal colour codes.

    Example:
        >>> try:
        ...     try:
        ...         raise ValueError("\\x1b[96mdata-dependent\\x1b[0m guard\\nmore")
        ...     except ValueError as inner:
        ...         raise RuntimeError("Failed to export") from inner
        ... except RuntimeError as e:
        ...     first_line(e)
        'ValueError: data-dependent guard'
    """
    root = _chain(e)[-1]
    lines = [" ".join(ln.split()) for ln in _ANSI.sub("", str(root)).splitlines() if ln.strip()]
    return f"{type(root).__name__}: {lines[0]}" if lines else type(root).__name__


BRANCH_HINT = (
    "The model takes a Python branch on a tensor value (such as `if x.sum() > 0:`), which torch.export refuses "
    "because a trace would keep only the side the example inputs take. Rewrite it with torch.where or torch.cond "
    "so that both sides are exported, or (ONNX) pass legacy=True to trace it knowingly with the TorchScript-based "
    "exporter and check the artifact on inputs that take the other side."
)
SHAPE_HINT = (
    "The model fixes the size of an axis that was exported as dynamic (a reshape with a literal, a size check): "
    "pass dynamic_batch=False to keep the batch fixed, or pass dynamic_axes= naming only the axes that can change "
    "(and the same axes of every input that must match them)."
)
CACHE_HINT = (
    "It is the key/value cache a transformers model returns with use_cache=True, and no export format can carry it "
    "as an output. Export it with use_cache=False, the default for a transformers model unless kwargs set it: "
    "pass kwargs={'use_cache': False}, or leave use_cache out of kwargs."
)
_USER_HINT = (
    "torch.export refused the model (see https://pytorch.org/docs/stable/generated/exportdb/index.html): fix the "
    "model, or for ONNX pass legacy=True to trace it knowingly with the TorchScript-based exporter."
)
_SPEC_HINT = (
    "The dynamic_shapes passed do not fit the example inputs (see torch's message): give one entry per input "
    "passed, or pass dynamic_axes= by input name instead."
)
_UNKNOWN_OUTPUT = re.compile(r"Found <class '([\w.]+)'> in output")


def _output_hint(type_name: str) -> str:
    if "cache" in type_name.lower():
        return CACHE_HINT
    return (
        f"Return tensors (or tuples, lists and dicts of them) instead, or register {type_name} with "
        "torch.utils._pytree.register_pytree_node."
    )


def refusal(e: BaseException) -> str | None:
    """The hint when an exporter refused the model for a reason of the model's own (not an exporter bug)."""
    from torch.fx.experimental import symbolic_shapes

    data_dependent = getattr(symbolic_shapes, "GuardOnDataDependentSymNode", ())
    constraint = getattr(symbolic_shapes, "ConstraintViolationError", ())
    try:
        from torch._dynamo.exc import UserError
    except ImportError:  # pragma: no cover - every supported torch has it
        UserError = ()  # type: ignore[assignment,misc]
    for c in _chain(e):
        unknown = _UNKNOWN_OUTPUT.search(str(c))
        if unknown:
            return _output_hint(unknown.group(1))
        if data_dependent and isinstance(c, data_dependent):
            return BRANCH_HINT
        if constraint and isinstance(c, constraint):
            return SHAPE_HINT
        if UserError and isinstance(c, UserError):
            kind = str(getattr(getattr(c, "error_type", None), "name", ""))
            if "CONSTRAINT" in kind:
                return SHAPE_HINT
            if kind == "INVALID_INPUT" and "dynamic_shapes" in str(c):
                return _SPEC_HINT
            return BRANCH_HINT if "data-dependent" in str(c).lower() or "CONTROL_FLOW" in kind else _USER_HINT
    return None


def failure(
    fmt: str, e: BaseException, captured: Captured | None, hint: str | None = None, *, reason: str | None = None
) -> ExportError:
    """The :class:`ExportError` for exception ``e`` of the ``fmt`` exporter: its first line as the reason (unless
    given), the hint for the cause (found in ``e`` unless given), and the captured output plus the full exception as
    ``details``, also written to a log file in the temporary directory that the message names."""
    full = "".join(traceback.format_exception(e))
    details = ((captured.text() if captured is not None else "") + "\n" + _ANSI.sub("", full)).strip() + "\n"
    log = ""
    try:
        with tempfile.NamedTemporaryFile(
            "w", prefix="torchkeep-export-", suffix=".log", delete=False, encoding="utf-8"
        ) as f:
            f.write(details)
            log = f.name
    except OSError:  # no writable temporary directory: the details stay on the error
        pass
    hint = hint if hint is not None else refusal(e) or ""
    return ExportError(fmt, reason or first_line(e), hint, details=details, log=log)


_PLAIN = (torch.Tensor, int, float, bool, str, type(None), torch.dtype, torch.device)


def check_outputs(fmt: str, outputs: Any) -> None:
    """Refuse outputs no format can carry (objects that are not tensors, numbers or pytree containers), before
    any exporter runs: the error names the output and the cause (a transformers cache: ``use_cache=False``)."""
    leaves, _ = pytree.tree_flatten_with_path(outputs)
    for path, leaf in leaves:
        if not isinstance(leaf, _PLAIN):
            where = "".join(f".{getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))}" for k in path)[1:]
            where = f"output_{where}" if where[:1].isdigit() else where or "output"  # as output_names_for names it
            kind = f"{type(leaf).__module__}.{type(leaf).__qualname__}"
            raise ExportError(
                fmt,
                f"the model returns a {type(leaf).__name__} ({kind}) at output {where!r}, which is not a tensor",
                _output_hint(type(leaf).__name__),
            )

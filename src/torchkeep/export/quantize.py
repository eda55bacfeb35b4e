"""Dynamic quantization with a size and accuracy report: :func:`quantize`, :class:`QuantizeReport`.

Uses ``torch.ao.quantization.quantize_dynamic``, which PyTorch has deprecated (it warns that
``torch.ao.quantization`` will be removed) in favour of torchao
(``torchao.quantization.quantize_(model, Int8DynamicActivationInt8WeightConfig())``). It is
still the only dynamic quantization that ships with torch itself, runs on any CPU and traces to
TorchScript, so torchkeep keeps using it and silences its deprecation warning.

Saving: the packed int8 weights of a quantized model are ``torch.qint8`` tensors and
``LinearPackedParams`` objects that safetensors (and so torchkeep files) cannot hold without
pickle, so ``tk.save``/``tk.save_model`` refuse a quantized model. Save the float model
and quantize at load: quantization is deterministic, so ``quantize(tk.load_model(path))`` gives
the same int8 weights every time.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from torchkeep.errors import ArgumentTypeError, InvalidArgumentError
from torchkeep.export._inputs import as_call, eval_mode, flat_outputs, output_names_for, run_eager
from torchkeep.export.report import compare, json_ready

__all__ = ["QuantizeReport", "is_quantized", "quantize", "state_bytes"]


@dataclass
class QuantizeReport:
    """What :func:`quantize` did.

    Attributes:
        dtype: ``"qint8"`` or ``"float16"``.
        quantized_modules: names of the submodules that were replaced, sorted.
        bytes_before / bytes_after: size of the saved state dict (``torch.save`` bytes) of the float
            and the quantized model.
        max_abs_error / max_rel_error: largest difference of the quantized model's outputs from the
            float model's on ``example_inputs`` (``None`` without them); the relative error is taken
            over the outputs larger than 1% of the largest output.
        outputs: per-output ``{"name", "max_abs", "max_rel"}`` on the example inputs.

    Example:
        >>> r = QuantizeReport("qint8", ["fc"], 4000, 1100)
        >>> round(r.ratio, 2)
        3.64
    """

    dtype: str
    quantized_modules: list[str]
    bytes_before: int
    bytes_after: int
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    outputs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """``bytes_before / bytes_after``: how many times smaller the saved state is (below 1: larger,
        as with ``float16`` weights of small layers, whose packing overhead outweighs the halved weights)."""
        return self.bytes_before / self.bytes_after if self.bytes_after else float("inf")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``torchkeep quantize --json`` prints); non-finite numbers become ``None``."""
        return json_ready({**asdict(self), "ratio": self.ratio})


def state_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``, written to memory (nothing is unpickled)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def is_quantized(model: nn.Module) -> bool:
    """True when ``model`` holds dynamically quantized submodules.

    Example:
        >>> import torch
        >>> is_quantized(torch.nn.Linear(2, 2))
        False
    """
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())


def quantize(
    model: nn.Module,
    *,
    dtype: torch.dtype = torch.qint8,
    modules: Iterable[type[nn.Module]] = (nn.Linear, nn.LSTM, nn.GRU),
    example_inputs: Any = None,
) -> tuple[nn.Module, QuantizeReport]:
    """Dynamically quantize ``model`` (weights int8, activations quantized on the fly) for CPU inference.

    With ``dtype=torch.float16`` the weights are packed as float16 instead: that is about float16
    arithmetic, not size. Their saved state holds the weights unpacked as float32 plus packing
    metadata, so it comes out slightly larger than the float model's (``report.ratio`` just below 1).

    The input model is not modified: a quantized copy, in eval mode, is returned with a report of
    the saved-state size before and after and, with ``example_inputs``, the largest output
    difference from the float model. The copy cannot be saved in a torchkeep file (its packed
    weights need pickle): save the float model and quantize after loading it.

    Args:
        model: a float model.
        dtype: ``torch.qint8`` (default: about 4x smaller weights) or ``torch.float16`` (weights packed as
            float16; no smaller on disk, see above).
        modules: the module types to replace.
        example_inputs: a tensor, tuple, dict or ``(args, kwargs)`` as in :func:`torchkeep.export`.

    Returns:
        ``(quantized_model, QuantizeReport)``.

    Example:
        >>> import torch, torchkeep as tk
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> qmodel, report = tk.quantize(model, example_inputs=torch.randn(4, 64))
        >>> report.quantized_modules, report.bytes_after < report.bytes_before / 2, report.max_abs_error < 0.1
        (['0', '2'], True, True)
    """
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError("model", model, "an nn.Module (a float model to quantize)")
    if dtype not in (torch.qint8, torch.float16):
        raise InvalidArgumentError(
            "dtype",
            dtype,
            "dynamic quantization supports dtype=torch.qint8 or torch.float16; pass torch.qint8 (the default) "
            "for about 4x smaller weights",
        )
    kinds = tuple(modules)
    if not kinds:
        raise InvalidArgumentError(
            "modules", modules, "modules is empty: pass the module types to quantize, e.g. (torch.nn.Linear,)"
        )
    for k in kinds:
        if not (isinstance(k, type) and issubclass(k, nn.Module)):
            raise ArgumentTypeError(
                "modules", k, "a tuple of nn.Module subclasses (types, not instances), e.g. (torch.nn.Linear,)"
            )
    targets = sorted(name for name, m in model.named_modules() if name and isinstance(m, kinds))
    if not targets:
        raise InvalidArgumentError(
            "modules",
            kinds,
            f"{type(model).__name__} has no submodule of type {', '.join(k.__name__ for k in kinds)} to quantize "
            "(dynamic quantization replaces Linear/LSTM/GRU layers; the root module itself is never replaced): "
            "pass the types of layers the model has, e.g. modules=(torch.nn.Linear,)",
        )
    with eval_mode(model):
        float_copy = copy.deepcopy(model).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation: the docs say what replaces it
            qmodel = torch.ao.quantization.quantize_dynamic(float_copy, set(kinds), dtype=dtype, inplace=True)
        qmodel.eval()
        replaced = sorted(n for n, m in qmodel.named_modules() if n in targets and is_quantized(m))
        report = QuantizeReport(
            dtype=str(dtype).removeprefix("torch."),
            quantized_modules=replaced,
            bytes_before=state_bytes(model),
            bytes_after=_quiet_bytes(qmodel),
        )
        if example_inputs is not None:
            call = as_call(example_inputs)
            want = run_eager(model, call)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = flat_outputs(run_eager(qmodel, call))
            # relative error over the outputs above 1% of the largest one: near-zero outputs would dominate it
            errors = [
                compare(n, g, w, 0.0, 0.01 * float(w.detach().abs().max()) if isinstance(w, torch.Tensor) else 0.0)
                for n, g, w in zip(output_names_for(want), got, flat_outputs(want), strict=True)
            ]
            report.outputs = [{"name": e.name, "max_abs": e.max_abs, "max_rel": e.max_rel} for e in errors]
            report.max_abs_error = max((e.max_abs for e in errors), default=0.0)
            report.max_rel_error = max((e.max_rel for e in errors), default=0.0)
    return qmodel, report


def _quiet_bytes(model: nn.Module) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return state_bytes(model)

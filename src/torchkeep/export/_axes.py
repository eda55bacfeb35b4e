"""Dynamic axes: which axis of which input may change size in the artifact, what each exporter is told, and the
inputs of other sizes the artifact is checked on.

An :class:`Axes` maps flat input names to ``{axis: symbol}``; axes that share a symbol change size together.
It comes from ``dynamic_batch`` (dim 0 of the batched inputs is ``batch``), from ``dynamic_axes`` (input name
-> axis -> symbol, as ``torch.onnx.export`` takes them) or from torch's own ``dynamic_shapes`` (passed to the
exporter as given; read here only to know which sizes to check).

Pure torch: no exporter is imported here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from torchkeep.errors import ArgumentTypeError, InvalidArgumentError
from torchkeep.export._inputs import Call, batch_size, bound_inputs, flat_outputs

__all__ = ["Axes", "check_output_keys", "resized", "resolve"]


@dataclass
class Axes:
    """The dynamic axes of one export.

    Attributes:
        names: the flat tensor inputs' names, in order.
        axes: input name -> axis -> symbol, for the inputs with a dynamic axis.
        sizes: symbol -> its size in the example inputs.
        bounds: symbol -> ``(min, max)`` where torch ``Dim`` objects gave them.
        shapes: the ``dynamic_shapes`` the caller passed, handed to torch as given (``None``: built from ``axes``).
        outputs: output name -> axis -> symbol, where ``dynamic_axes`` named outputs (TorchScript-based ONNX only).
    """

    names: list[str]
    axes: dict[str, dict[int, str]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    bounds: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)
    shapes: Any = None
    outputs: dict[str, dict[int, str]] = field(default_factory=dict)

    @property
    def batch(self) -> bool:
        """Whether dim 0 of some input is dynamic."""
        return any(0 in a for a in self.axes.values())

    def per_input(self) -> list[dict[int, str]]:
        """``{axis: symbol}`` of each flat tensor input, in order (``{}`` for a static one)."""
        return [self.axes.get(n, {}) for n in self.names]

    def other_sizes(self) -> dict[str, int]:
        """Another size for every symbol: a batch axis (dim 0) grows by 2, any other axis shrinks to about half
        (12 -> 7; a size of 2 grows to 4), within the symbol's bounds; a symbol with no other size keeps its own."""
        leading = {a[0] for a in self.axes.values() if 0 in a}
        out = {}
        for sym, n in self.sizes.items():
            lo, hi = self.bounds.get(sym, (None, None))
            lo, hi = max(lo or 2, 2), hi if hi is not None else 1 << 62
            wanted = [n + 2] if sym in leading or n < 3 else [n // 2 + 1, n + 2]
            wanted += [lo, hi, n - 1, n + 1]
            out[sym] = next((w for w in wanted if lo <= w <= hi and w != n), n)
        return out

    def trace_sizes(self) -> dict[str, int]:
        """The sizes to export from: a dynamic size of 0 or 1 would be specialised by torch.export, so it is 2."""
        return {sym: 2 if n < 2 else n for sym, n in self.sizes.items()}

    def label(self, sizes: Mapping[str, int]) -> str:
        """``"batch 4, seq 7"``."""
        return ", ".join(f"{sym} {n}" for sym, n in sizes.items())

    def legacy(self, names_out: list[str], outputs: list[Any], others: list[Any], other_sizes: dict[str, int]) -> Any:
        """``dynamic_axes`` for the TorchScript-based ONNX exporter: the inputs' axes, and the output axes that
        changed size between the example (``outputs``) and the other sizes (``others``), or those given."""
        if not self.axes:
            return None
        spec: dict[str, dict[int, str]] = {n: dict(a) for n, a in self.axes.items()}
        by_sizes = {(n, other_sizes.get(sym, n)): sym for sym, n in self.sizes.items()}
        for name, out, other in zip(names_out, outputs, others, strict=False):
            if name in self.outputs:
                spec[name] = dict(self.outputs[name])
            elif isinstance(out, torch.Tensor) and isinstance(other, torch.Tensor) and out.dim() == other.dim():
                changed = {
                    i: by_sizes.get((int(a), int(b)), f"{name}_dim{i}")
                    for i, (a, b) in enumerate(zip(out.shape, other.shape, strict=True))
                    if a != b
                }
                if changed:
                    spec[name] = changed
        return spec

    def torch_shapes(self, model: torch.nn.Module, call: Call, *, names: bool) -> Any:
        """The ``dynamic_shapes`` argument of ``torch.export``: the caller's own if given, else each dynamic axis
        as ``Dim.DYNAMIC`` (torch infers the range and which axes are equal), or by its symbol when ``names`` (the
        ONNX exporter turns symbols into ``Dim.DYNAMIC`` and names the graph's axes after them)."""
        if self.shapes is not None:
            return self.shapes
        if not self.axes:
            return None
        specs = iter(self.per_input())

        def spec(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return None
            axes = next(specs)
            return {a: sym if names else torch.export.Dim.DYNAMIC for a, sym in axes.items()} or None

        args, kwargs = call
        if not kwargs:
            return tuple(pytree.tree_map(spec, a) for a in args)
        out: dict[str, Any] = {}
        for name, kind, value in bound_inputs(model, call):
            if kind == "**":
                out[name] = {k: pytree.tree_map(spec, v) for k, v in value.items()}
            elif kind == "*":
                out[name] = tuple(pytree.tree_map(spec, v) for v in value)
            else:
                out[name] = pytree.tree_map(spec, value)
        return out


def _tensors(call: Call) -> list[torch.Tensor]:
    return [t for t in flat_outputs(call) if isinstance(t, torch.Tensor)]


def resolve(
    model: torch.nn.Module,
    call: Call,
    names: list[str],
    *,
    dynamic_batch: bool,
    dynamic_axes: Mapping[str, Any] | None,
    dynamic_shapes: Any,
    defaults: Mapping[str, Any] | None = None,
) -> Axes:
    """The :class:`Axes` of an export: ``dynamic_shapes`` if given, else ``dynamic_axes``, else ``defaults`` (a
    transformers model's token inputs) when ``dynamic_batch``, else dim 0 of the batched inputs when ``dynamic_batch``.

    Raises:
        InvalidArgumentError: both ``dynamic_axes`` and ``dynamic_shapes``; an input the model does not have; an
            axis the input does not have; one symbol on axes of different sizes.
        ArgumentTypeError: ``dynamic_axes`` is not a dict of input name -> ``{axis: name}``.
    """
    tensors = _tensors(call)
    if dynamic_axes is not None and dynamic_shapes is not None:
        raise InvalidArgumentError(
            "dynamic_shapes", "...", "pass either dynamic_axes (names) or dynamic_shapes (torch's form), not both"
        )
    if dynamic_shapes is not None:
        axes = _from_shapes(model, call, names, dynamic_shapes)
    elif dynamic_axes is not None:
        axes = _from_axes(dynamic_axes, tensors, names)
    elif dynamic_batch and defaults:
        axes = _from_axes(defaults, tensors, names)
    elif dynamic_batch:
        batch = batch_size(call)
        axes = Axes(names, {n: {0: "batch"} for n, t in zip(names, tensors, strict=False) if _batched(t, batch)})
    else:
        axes = Axes(names)
    for name, t in zip(names, tensors, strict=False):
        for axis, sym in axes.axes.get(name, {}).items():
            size = int(t.shape[axis])
            if axes.sizes.setdefault(sym, size) != size:
                raise InvalidArgumentError(
                    "dynamic_axes",
                    name,
                    f"axis {axis} of input {name!r} has size {size} in the example inputs but {sym!r} has size "
                    f"{axes.sizes[sym]} on another input; give axes of different sizes different names",
                )
    return axes


def _batched(t: torch.Tensor, batch: int | None) -> bool:
    return t.dim() >= 1 and batch is not None and int(t.shape[0]) == batch


def _from_axes(dynamic_axes: Mapping[str, Any], tensors: list[torch.Tensor], names: list[str]) -> Axes:
    if not isinstance(dynamic_axes, Mapping):
        raise ArgumentTypeError("dynamic_axes", dynamic_axes, "a dict of input name -> {axis: name}")
    out = Axes(names)
    ndim = dict(zip(names, (t.dim() for t in tensors), strict=False))
    for name, spec in dynamic_axes.items():
        if spec is None:
            continue
        if isinstance(spec, Mapping):
            pairs = list(spec.items())
        elif isinstance(spec, Sequence) and not isinstance(spec, str):
            pairs = [(a, f"{name}_dim{a}") for a in spec]
        else:
            raise ArgumentTypeError(f"dynamic_axes[{name!r}]", spec, "a dict {axis: name} or a list of axes")
        if name not in ndim:
            out.outputs[str(name)] = {int(a): str(s) for a, s in pairs}  # an output, or a typo found below
            continue
        axes: dict[int, str] = {}
        for axis, sym in pairs:
            if not isinstance(axis, int) or isinstance(axis, bool) or not -ndim[name] <= axis < ndim[name]:
                raise InvalidArgumentError(
                    "dynamic_axes",
                    name,
                    f"input {name!r} has {ndim[name]} dimension(s), so it has no axis {axis!r}; "
                    f"give axes from 0 to {ndim[name] - 1}",
                )
            if not isinstance(sym, str) or not sym.strip():
                raise InvalidArgumentError("dynamic_axes", name, f"name axis {axis} with a non-empty string")
            axes[axis % ndim[name]] = sym.strip()
        if axes:
            out.axes[name] = axes
    return out


def check_output_keys(axes: Axes, names_out: list[str]) -> None:
    """Refuse ``dynamic_axes`` keys that are neither an input nor an output of the model."""
    unknown = sorted(n for n in axes.outputs if n not in names_out)
    if unknown:
        raise InvalidArgumentError(
            "dynamic_axes",
            unknown[0],
            f"the model has no input named {unknown[0]!r}; its inputs are {', '.join(axes.names) or '(none)'}",
        )


def _symbol(dim: Any, name: str, axis: int, bounds: dict[str, tuple[int | None, int | None]]) -> str | None:
    """The symbol of one entry of a torch ``dynamic_shapes`` spec; ``None`` for a static axis."""
    if dim is None or isinstance(dim, int):
        return None
    kind = getattr(getattr(dim, "type", None), "name", "")
    if kind == "STATIC":
        return None
    if isinstance(dim, str):
        return dim
    sym = getattr(dim, "__name__", None) if isinstance(dim, torch.export.Dim) else None
    sym = sym or f"{name}_dim{axis}"
    low, high = getattr(dim, "min", None), getattr(dim, "max", None)
    bounds[sym] = (low if isinstance(low, int) else None, high if isinstance(high, int) and high < 1 << 62 else None)
    return sym


def _from_shapes(model: torch.nn.Module, call: Call, names: list[str], shapes: Any) -> Axes:
    """Which axes torch's ``dynamic_shapes`` makes dynamic, by flat input name (``Dim.AUTO`` counts as dynamic)."""
    inputs = bound_inputs(model, call)
    if isinstance(shapes, Mapping):
        specs = [shapes.get(n) for n, _, _ in inputs]
    elif isinstance(shapes, (tuple, list)) and len(shapes) == len(inputs):
        specs = list(shapes)
    else:
        raise InvalidArgumentError(
            "dynamic_shapes",
            type(shapes).__name__,
            f"pass a dict keyed by forward's parameter names or a tuple with one entry per input ({len(inputs)})",
        )
    per_tensor: list[tuple[Any, int]] = []

    def walk(value: Any, spec: Any) -> None:
        if isinstance(value, torch.Tensor):
            per_tensor.append((spec, value.dim()))
        elif isinstance(value, (list, tuple)):
            subs = spec if isinstance(spec, (list, tuple)) and len(spec) == len(value) else [None] * len(value)
            for v, s in zip(value, subs, strict=True):
                walk(v, s)
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, spec.get(k) if isinstance(spec, Mapping) else None)
        else:
            per_tensor.extend((None, 0) for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor))

    for (_, kind, value), spec in zip(inputs, specs, strict=True):
        walk(value, spec if kind != "**" else {k: (spec or {}).get(k) for k in value})
    out = Axes(names, shapes=shapes)
    for name, (spec, ndim) in zip(names, per_tensor, strict=False):
        if isinstance(spec, Mapping):
            pairs = list(spec.items())
        elif isinstance(spec, (list, tuple)):
            pairs = list(enumerate(spec))
        else:
            continue
        axes = {int(a) % max(ndim, 1): s for a, d in pairs if (s := _symbol(d, name, int(a), out.bounds))}
        if axes:
            out.axes[name] = axes
    return out


def resized(call: Call, axes: Axes, sizes: Mapping[str, int], *, seed: int = 0) -> Call:
    """The call with each dynamic axis at its symbol's size in ``sizes``: positions repeated cyclically to grow,
    the first ones kept to shrink. Floating-point inputs get noise on the repeated positions so that they are not
    copies (integer inputs such as token ids keep valid values). Static inputs are left as they are.
    """
    g = torch.Generator().manual_seed(seed)
    specs = iter(axes.per_input())

    def resize(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        out = t.detach()
        for axis, sym in next(specs).items():
            old, new = int(out.shape[axis]), int(sizes.get(sym, out.shape[axis]))
            if new == old or old == 0:
                continue
            idx = torch.arange(new) % old
            grown = out.index_select(axis, idx).clone()
            if grown.is_floating_point() and new > old:
                scale = float(out.float().std()) if out.numel() > 1 else 1.0
                fresh = grown.narrow(axis, old, new - old)
                noise = torch.randn(fresh.shape, generator=g) * (scale if scale > 0 else 1.0) * 0.5
                fresh += noise.to(grown.dtype)
            out = grown
        return out

    return pytree.tree_map(resize, call)

"""Example inputs: normalising them to ``(args, kwargs)``, binding them to ``forward``, naming inputs and outputs.

Pure torch: no exporter is imported here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils import _pytree as pytree

from torchkeep.errors import ArgumentTypeError

__all__ = [
    "Call",
    "as_call",
    "batch_size",
    "bound_inputs",
    "canonical",
    "eval_mode",
    "flat_outputs",
    "input_names_for",
    "output_names_for",
    "run_eager",
]

#: ``(args, kwargs)`` of one forward call.
Call = tuple[tuple[Any, ...], dict[str, Any]]


def as_call(inputs: Any, kwargs: Mapping[str, Any] | None = None) -> Call:
    """``(args, kwargs)`` from what a user passes as example inputs.

    A tensor is one positional input; a tuple or list holds the positional inputs; a dict holds
    keyword inputs; a pair ``(tuple, dict)`` holds both. ``kwargs`` adds keyword inputs.

    Example:
        >>> import torch
        >>> args, kw = as_call(torch.zeros(2, 3))
        >>> len(args), kw
        (1, {})
        >>> as_call({"x": 1})
        ((), {'x': 1})
    """
    extra = dict(kwargs or {})
    if isinstance(inputs, torch.Tensor):
        return (inputs,), extra
    if isinstance(inputs, Mapping):
        return (), {**dict(inputs), **extra}
    if (
        isinstance(inputs, tuple)
        and len(inputs) == 2
        and isinstance(inputs[0], tuple)
        and isinstance(inputs[1], Mapping)
    ):
        return tuple(inputs[0]), {**dict(inputs[1]), **extra}
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), extra
    raise ArgumentTypeError(
        "example_inputs",
        inputs,
        "a tensor, a tuple/list of positional inputs, a dict of keyword inputs or a pair (args_tuple, kwargs_dict); "
        "wrap a single non-tensor input in a tuple, e.g. (x,)",
    )


def canonical(model: torch.nn.Module, call: Call) -> Call:
    """The call with its keyword inputs in ``forward``'s parameter order (the flat input order of every format)."""
    args, kwargs = call
    if len(kwargs) < 2:
        return call
    try:
        order = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return call
    rank = {n: i for i, n in enumerate(order)}
    return args, dict(sorted(kwargs.items(), key=lambda kv: rank.get(kv[0], len(order))))


def _tensors(call: Call) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(call) if isinstance(t, torch.Tensor)]


def batch_size(call: Call) -> int | None:
    """Dim 0 of the first tensor input with at least one dimension, or ``None``."""
    for t in _tensors(call):
        if t.dim() >= 1:
            return int(t.shape[0])
    return None


def bound_inputs(model: torch.nn.Module, call: Call) -> list[tuple[str, str, Any]]:
    """``(name, kind, value)`` of each argument of the call, in ``forward``'s parameter order: ``kind`` is ``"*"`` for
    ``*args`` (value: a tuple), ``"**"`` for ``**kwargs`` (value: a dict), else ``""``. Without a signature to bind
    to: ``input_0, input_1, ...`` and the keyword names."""
    args, kwargs = call
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return [(f"input_{i}", "", a) for i, a in enumerate(args)] + [(k, "", v) for k, v in kwargs.items()]
    kinds = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return [(name, kinds.get(bound.signature.parameters[name].kind, ""), v) for name, v in bound.arguments.items()]


def input_names_for(model: torch.nn.Module, call: Call) -> list[str]:
    """Names of the flat tensor inputs: the ``forward`` parameter names (``x``, ``mask``), indexed when nested."""
    named: list[tuple[str, Any]] = []
    for name, kind, value in bound_inputs(model, call):
        if kind == "*":
            named += [(f"{name}_{i}", v) for i, v in enumerate(value)]
        elif kind == "**":
            named += list(value.items())
        else:
            named.append((name, value))
    names: list[str] = []
    for name, value in named:
        leaves, _ = pytree.tree_flatten_with_path(value)
        tensors = [(p, v) for p, v in leaves if isinstance(v, torch.Tensor)]
        if len(tensors) == 1 and not tensors[0][0]:
            names.append(name)
        else:
            names += [name + _keystr(p) for p, _ in tensors]
    return names


def _keystr(path: Sequence[Any]) -> str:
    parts = []
    for k in path:
        key = getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
        parts.append(str(key))
    return "".join(f".{p}" for p in parts)


def output_names_for(outputs: Any) -> list[str]:
    """Names of the flat tensor outputs: ``output`` for one tensor, else the keys/indices (``logits``, ``0``, ``aux.1``)."""
    leaves, _ = pytree.tree_flatten_with_path(outputs)
    if len(leaves) == 1 and not leaves[0][0]:
        return ["output"]
    names = [_keystr(p)[1:] or "output" for p, _ in leaves]
    return [n if not n[:1].isdigit() else f"output_{n}" for n in names]


def flat_outputs(outputs: Any) -> list[Any]:
    """The leaves of a (possibly nested) output: tensors, in pytree order."""
    return list(pytree.tree_leaves(outputs))


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside the block; each one's own flag restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def run_eager(model: Callable[..., Any], call: Call) -> Any:
    """``model(*args, **kwargs)`` under ``torch.no_grad()``."""
    args, kwargs = call
    with torch.no_grad():
        return model(*args, **kwargs)

"""Build a model from its class and recorded config, on the meta device where that is safe.

On the meta device a constructor allocates nothing and its weight initialisers compute nothing;
the parameters are then allocated once, uninitialised, for :func:`torchkeep.load_model` to fill
with a strict load. Classes that cannot be built that way (non-persistent buffers, tensors
computed in ``__init__``) are built normally.

Example:
    >>> import torch
    >>> model, on_meta = build(torch.nn.Linear, {"in_features": 3, "out_features": 2}, torch.device("cpu"))
    >>> model.weight.shape, on_meta
    (torch.Size([2, 3]), True)
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["build", "call", "construct", "materialize"]


def call(cls: type, config: dict[str, Any]) -> torch.nn.Module:
    from_config = getattr(cls, "from_config", None)
    if callable(from_config):
        return from_config(config)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    rest = dict(config)
    for p in params:
        if p.name not in rest:
            continue
        v = rest.pop(p.name)
        if p.kind is p.POSITIONAL_ONLY:
            args.append(v)
        elif p.kind is p.VAR_POSITIONAL:
            args.extend(v)
        elif p.kind is p.VAR_KEYWORD:
            kwargs.update(v)
        else:
            kwargs[p.name] = v
    kwargs.update(rest)  # unknown names: let the constructor say so
    return cls(*args, **kwargs)


def _meta_safe(model: torch.nn.Module) -> bool:
    """True when every tensor of a meta-built model will be filled by allocation + a strict load."""
    for m in model.modules():
        if getattr(m, "_non_persistent_buffers_set", None):
            return False  # allocation would leave them uninitialised and the file does not hold them
        for v in m.__dict__.values():
            if isinstance(v, torch.Tensor) and v.is_meta:
                return False  # a plain tensor attribute computed in __init__
    return True


#: Shape-preserving in-place ops that weight initialisers call. On a meta tensor they compute
#: nothing, yet the first one dispatched in a process imports torch._dynamo (~1 s): skip them.
_INIT_OPS = frozenset(
    [
        "normal_",
        "uniform_",
        "fill_",
        "zero_",
        "random_",
        "exponential_",
        "log_normal_",
        "cauchy_",
        "geometric_",
        "bernoulli_",
        "erfinv_",
        "mul_",
        "add_",
        "sub_",
        "div_",
        "clamp_",
        "copy_",
    ]
)


class _SkipMetaInit(torch.overrides.TorchFunctionMode):
    """Thread-local: initialisers' in-place ops on meta tensors return the tensor untouched."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _INIT_OPS:
            # torch.nn.init functions come with their arguments as keywords (tensor=...)
            t = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


def _aliases(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module, str]]:
    """``(module, name, owner, owner_name)`` for each parameter or buffer that is another's object (a tie)."""
    first: dict[int, tuple[torch.nn.Module, str]] = {}
    ties = []
    for m in model.modules():
        for table in (m._parameters, m._buffers):
            for name, t in table.items():
                if t is None:
                    continue
                if id(t) in first:
                    ties.append((m, name, *first[id(t)]))
                else:
                    first[id(t)] = (m, name)
    return ties


def materialize(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Allocate a meta-built model's tensors on ``device``, uninitialised, keeping tied weights tied.

    What ``to_empty`` does, without the symbolic-shape machinery ``empty_like`` pulls in on meta,
    and without its flaw: ``to_empty`` allocates each name of a tied parameter separately, so an
    output layer sharing the embedding's weight would get a weight of its own.
    """
    ties = _aliases(model)
    model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
    for m, name, owner, owner_name in ties:
        table = "_parameters" if name in m._parameters else "_buffers"
        getattr(m, table)[name] = getattr(owner, table)[owner_name]
    return model


def build(cls: type, config: dict[str, Any], device: torch.device) -> tuple[torch.nn.Module, bool]:
    """The model, and whether it was built on the meta device (weights never initialised)."""
    return construct(lambda: call(cls, config), device)


def construct(
    make: Callable[[], torch.nn.Module],
    device: torch.device,
    *,
    real: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> tuple[torch.nn.Module, bool]:
    """``make()`` on the meta device then allocated on ``device``, or, when the model cannot be built
    that way, ``make()`` inside ``real()`` (a library's own skip-initialisation context) and moved."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.device("meta"), _SkipMetaInit():
                model = make()
        if isinstance(model, torch.nn.Module) and _meta_safe(model):
            return materialize(model, device), True
    except Exception:
        pass  # the class cannot be built on meta: build it for real below
    with real():
        return make().to(device), False

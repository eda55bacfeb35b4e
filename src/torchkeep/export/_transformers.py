"""Transformers models: exported without their key/value cache, with dynamic batch and sequence axes on the token
inputs, and with plain tensor outputs.

A model is recognised by the module of a class in its MRO; transformers itself is never imported here.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from torchkeep.export._inputs import Call, bound_inputs, flat_outputs, input_names_for

__all__ = ["TensorOutputs", "is_transformers_model", "output_note", "prepare"]

#: the inputs whose dim 1 is the (encoder) sequence
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "labels")
#: the inputs whose dim 1 is the decoder's sequence (encoder-decoder models)
DECODER_INPUTS = ("decoder_input_ids", "decoder_attention_mask", "decoder_position_ids", "decoder_inputs_embeds")


def is_transformers_model(model: Any) -> bool:
    """Whether ``model`` is (a subclass of) a transformers model, judged without importing transformers.

    Example:
        >>> import torch
        >>> is_transformers_model(torch.nn.Linear(2, 2))
        False
    """
    return any(c.__module__.split(".")[0] == "transformers" for c in type(model).__mro__)


class TensorOutputs(torch.nn.Module):
    """Calls a transformers model with ``defaults`` added to its keyword inputs and returns its output (a
    ``ModelOutput``) as a plain dict of its tensors: an artifact that loads without transformers and whose outputs
    are named (``logits``, ``last_hidden_state``)."""

    def __init__(self, model: torch.nn.Module, defaults: Mapping[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.defaults = dict(defaults)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.model(*args, **{**self.defaults, **kwargs})
        if isinstance(out, Mapping):
            return {k: v for k, v in out.items() if v is not None}
        return out


def _wrapper(model: torch.nn.Module, defaults: Mapping[str, Any]) -> TensorOutputs:
    """A :class:`TensorOutputs` whose ``forward`` has the model's signature, so that inputs keep their names and
    positions (``input_ids`` first) in every format."""
    signature = inspect.signature(model.forward)
    this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)

    def forward(self: TensorOutputs, *args: Any, **kwargs: Any) -> Any:
        return TensorOutputs.forward(self, *args, **kwargs)

    forward.__signature__ = signature.replace(parameters=[this, *signature.parameters.values()])  # type: ignore[attr-defined]
    cls = type(type(model).__name__, (TensorOutputs,), {"forward": forward, "__module__": __name__})
    wrapper = cls(model, defaults)
    wrapper.training = model.training  # its own flag only: the model's submodules keep theirs
    return wrapper


def prepare(model: torch.nn.Module, call: Call) -> tuple[torch.nn.Module, dict[str, dict[int, str]] | None, list[str]]:
    """``(module to export, default dynamic axes, notes)`` for ``model``: for a transformers model a
    :class:`TensorOutputs` around it with ``use_cache=False`` (unless the call sets it), the batch and sequence axes
    of its token inputs (other inputs: the batch axis), and notes saying so and how to override; any other model
    comes back as it is, with no defaults.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 2)
        >>> prepare(model, ((torch.zeros(1, 2),), {}))[0] is model
        True
    """
    if not is_transformers_model(model):
        return model, None, []
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        return model, None, []
    given = {name for name, _, _ in bound_inputs(model, call)} | set(call[1])
    defaults = {"use_cache": False} if "use_cache" in parameters and "use_cache" not in given else {}
    module = _wrapper(model, defaults)
    notes = []
    if defaults:
        notes.append(
            "use_cache=False: the artifact computes no key/value cache (a cache object is not a tensor and no format "
            "can carry it as an output); to decide yourself, pass kwargs={'use_cache': ...}"
        )
    names = input_names_for(module, call)
    tensors = [t for t in flat_outputs(call) if isinstance(t, torch.Tensor)]
    axes: dict[str, dict[int, str]] = {}
    batch = next((int(t.shape[0]) for t in tensors if t.dim() >= 1), None)
    for name, t in zip(names, tensors, strict=False):
        if name in TOKEN_INPUTS and t.dim() >= 2:
            axes[name] = {0: "batch", 1: "seq"}
        elif name in DECODER_INPUTS and t.dim() >= 2:
            axes[name] = {0: "batch", 1: "decoder_seq"}
        elif t.dim() >= 1 and int(t.shape[0]) == batch:
            axes[name] = {0: "batch"}
    return module, axes, notes


def output_note(outputs: Any) -> str:
    """The report's note on the outputs of a :class:`TensorOutputs` (``""`` when the model returned no dict)."""
    if not isinstance(outputs, Mapping):
        return ""
    return (
        f"outputs: a dict of tensors ({', '.join(outputs)}) instead of the model's ModelOutput, so that the artifact "
        "loads without transformers; to return something else, export a module of your own that calls the model"
    )

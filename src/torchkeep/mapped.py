"""Put loaded state into the tensors a target already holds (an optimizer's live state).

:func:`torchkeep.restore` reads most tensors straight into the tensors the targets hold and
the rest into memory of its own; :func:`adopt` then hands an optimizer its state in the
tensors it already has (copying only what was not read there), so ``load_state_dict`` keeps
them. (No tensor handed out is ever a view of a shared file mapping: what was verified is
what is used.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["adopt", "same_memory", "tensor_items"]


def same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` are the same bytes (same address, dtype, shape and strides): copying one into the other is a no-op."""
    return (
        a.device == b.device
        and a.data_ptr() == b.data_ptr()
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
    )


def tensor_items(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        return [(prefix, tree)]
    if isinstance(tree, Mapping):
        return [item for k, v in tree.items() for item in tensor_items(v, (*prefix, k))]
    if isinstance(tree, (list, tuple)):
        return [item for i, v in enumerate(tree) for item in tensor_items(v, (*prefix, i))]
    return []


def adopt(current: Any, loaded: Any, owned: Any) -> Any:
    """Copy ``loaded`` (tensors read from a checkpoint) into the tensors of ``current`` where they match.

    ``current`` is a target's ``state_dict()`` (an optimizer's holds its live state
    tensors); where a path exists in both with the same shape, dtype and a CPU
    contiguous tensor, the values are copied into the existing memory and that tensor
    goes into the result, so ``load_state_dict`` keeps it without another copy.
    Everything else is materialised by ``owned(tensor)``.
    """
    live = {p: t for p, t in tensor_items(current) if t.device.type == "cpu" and t.is_contiguous()}
    used: set[int] = set()

    def walk(node: Any, prefix: tuple[Any, ...]) -> Any:
        if isinstance(node, torch.Tensor):
            dst = live.get(prefix)
            if dst is not None and id(dst) not in used and dst.shape == node.shape and dst.dtype == node.dtype:
                used.add(id(dst))
                if not same_memory(dst, node):
                    with torch.no_grad():
                        dst.copy_(node)
                return dst
            return owned(node)
        if isinstance(node, Mapping):
            return (
                type(node)((k, walk(v, (*prefix, k))) for k, v in node.items())
                if isinstance(node, dict)
                else {k: walk(v, (*prefix, k)) for k, v in node.items()}
            )
        if isinstance(node, list):
            return [walk(v, (*prefix, i)) for i, v in enumerate(node)]
        if isinstance(node, tuple):
            return tuple(walk(v, (*prefix, i)) for i, v in enumerate(node))
        return node

    return walk(loaded, ())

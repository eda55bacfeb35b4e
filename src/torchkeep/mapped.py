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

from torchkeep.errors import ChecksumMismatchError, CorruptCheckpointError

__all__ = ["adopt", "disjoint", "partly_overwritten", "readable_into", "tensor_items"]


def readable_into(dst: Any, src: Any) -> bool:
    """Whether a stored tensor of ``src``'s shape and dtype can be read straight into ``dst``: a
    contiguous, non-empty, plain CPU or CUDA tensor of that very shape and dtype (CUDA through
    page-locked staging buffers, :mod:`torchkeep.staging`).

    Example:
        >>> w = torch.zeros(2, 3)
        >>> readable_into(w, torch.ones(2, 3)), readable_into(w.t(), torch.ones(3, 2))
        (True, False)
    """
    return (
        isinstance(dst, torch.Tensor)
        and (dst.is_cpu or dst.is_cuda)
        and dst.layout is torch.strided
        and dst.dtype is src.dtype
        and dst.shape == src.shape
        and dst.nbytes > 0
        and dst.is_contiguous()
        and not (dst.is_quantized or dst.is_conj() or dst.is_neg())
        # not a wrapper subclass (DTensor, quantized weights); a plain parameter needs no detach to tell
        and (type(dst) in _PLAIN or type(dst.detach()) is torch.Tensor)
    )


_PLAIN = (torch.Tensor, torch.nn.Parameter)
_LEAVES = frozenset({int, float, str, bool, type(None)})


def disjoint(chosen: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``chosen`` without the destinations whose memory overlaps another's (a flat parameter
    buffer): reading both at once would race, so those take the copying path.

    Example:
        >>> flat = torch.zeros(10)
        >>> sorted(disjoint({"a": flat[:6], "b": flat[4:], "c": torch.zeros(3)}))
        ['c']
        >>> sorted(disjoint({"all": flat, "x": flat[1:2], "y": flat[7:9], "own": torch.zeros(3)}))
        ['own']
    """
    out = dict(chosen)
    # runs of spans, in address order, each starting before the furthest end so far: every span
    # of a run of two or more overlaps another (the one reaching furthest when it starts)
    run: list[str] = []
    end = -1
    for start, n, k in sorted((t.data_ptr(), t.nbytes, k) for k, t in chosen.items()):
        if start >= end:
            if len(run) > 1:
                for r in run:
                    del out[r]
            run = []
        run.append(k)
        end = max(end, start + n)
    if len(run) > 1:
        for r in run:
            del out[r]
    return out


def partly_overwritten(e: CorruptCheckpointError) -> CorruptCheckpointError:
    """The same error, saying that the targets already hold some of the file's (damaged) bytes."""
    if not isinstance(e, ChecksumMismatchError):  # truncated while it was read
        return CorruptCheckpointError(
            e.path,
            f"{e.reason}; it was being read straight into the targets, which were partly overwritten: "
            "restore another checkpoint before using them",
        )
    out = ChecksumMismatchError(e.path, e.key, e.expected, e.actual)
    out.args = (
        f"{e.path}: checksum mismatch in tensor {e.key!r} (expected {e.expected}, got {e.actual}): the file is "
        "damaged, or was rewritten in place while it was read. The tensors were read straight into the "
        "targets, so the targets were partly overwritten; restore another checkpoint (an earlier one that "
        "verifies) before using them.",
    )
    return out


def tensor_items(tree: Any) -> list[tuple[tuple[Any, ...], torch.Tensor]]:
    """``(path, tensor)`` for every tensor in nested dicts (mappings), lists and tuples, in order.

    Example:
        >>> [(p, t.item()) for p, t in tensor_items({"a": torch.tensor(1), "b": [2, torch.tensor(3)]})]
        [(('a',), 1), (('b', 1), 3)]
    """
    out: list[tuple[tuple[Any, ...], torch.Tensor]] = []
    Tensor = torch.Tensor

    def walk(node: Any, prefix: tuple[Any, ...]) -> None:
        kind = type(node)  # exact types first: an isinstance() against Mapping is slow, and this sees every node
        if kind is dict or (kind is not list and kind is not tuple and isinstance(node, Mapping)):
            for k, v in node.items():
                if type(v) in _LEAVES:  # most values of an optimizer's state dict are numbers (and an
                    continue  # isinstance() of a non-tensor against torch.Tensor is slow)
                if isinstance(v, Tensor):
                    out.append(((*prefix, k), v))
                else:
                    walk(v, (*prefix, k))
        elif kind is list or kind is tuple or isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                if type(v) in _LEAVES:  # e.g. a param group's list of parameter ids
                    continue
                if isinstance(v, Tensor):
                    out.append(((*prefix, i), v))
                else:
                    walk(v, (*prefix, i))

    if isinstance(tree, Tensor):
        return [((), tree)]
    walk(tree, ())
    return out


def adopt(current: Any, loaded: Any, read: set[int] | frozenset[int] = frozenset()) -> Any:
    """Copy ``loaded`` (tensors read from a checkpoint) into the tensors of ``current`` where they match.

    ``current`` is a target's ``state_dict()`` (an optimizer's holds its live state
    tensors); where a path exists in both with the same shape, dtype and a contiguous CPU
    or CUDA tensor, the values are copied into the existing memory (not those whose ``id``
    is in ``read``: the read landed there already) and that tensor goes into the result, so
    ``load_state_dict`` keeps it without another copy. Everything else goes into the result
    as loaded (in memory of its own already).

    Example:
        >>> live = torch.zeros(2)
        >>> out = adopt({"state": {0: {"m": live}}}, {"state": {0: {"m": torch.ones(2), "lr": 0.1}}})
        >>> out["state"][0]["m"] is live, live.tolist(), out["state"][0]["lr"]
        (True, [1.0, 1.0], 0.1)
    """
    live = {p: t for p, t in tensor_items(current) if (t.is_cpu or t.is_cuda) and t.is_contiguous()}
    used: set[int] = set()
    Tensor = torch.Tensor

    def walk(node: Any, prefix: tuple[Any, ...]) -> Any:
        kind = type(node)
        if kind in _LEAVES:  # most nodes of an optimizer's state dict: hyperparameters, ids
            return node
        if isinstance(node, Tensor):
            dst = live.get(prefix)
            if dst is not None and id(dst) not in used and dst.shape == node.shape and dst.dtype == node.dtype:
                used.add(id(dst))
                if id(dst) not in read:
                    with torch.no_grad():
                        dst.copy_(node)
                return dst
            return node
        if kind is dict:  # leaves kept without a call: most of an optimizer's state dict
            return {k: v if type(v) in _LEAVES else walk(v, (*prefix, k)) for k, v in node.items()}
        if isinstance(node, Mapping):
            return (
                type(node)((k, walk(v, (*prefix, k))) for k, v in node.items())
                if isinstance(node, dict)
                else {k: walk(v, (*prefix, k)) for k, v in node.items()}
            )
        if kind is list or isinstance(node, list):
            return [v if type(v) in _LEAVES else walk(v, (*prefix, i)) for i, v in enumerate(node)]
        if isinstance(node, tuple):
            return tuple(walk(v, (*prefix, i)) for i, v in enumerate(node))
        return node

    return walk(loaded, ())

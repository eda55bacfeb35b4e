"""The limits every reader of a torchkeep/safetensors file enforces, checked by the writer too (pure, no torch).

One table for both sides: a file the writer produces is always a file the reader accepts,
and a file the reader accepts never makes it allocate more than the file holds.

==================  =====================  ==========================================================
limit               value                  why
==================  =====================  ==========================================================
``MAX_HEADER_SIZE``  100,000,000 bytes      the JSON header (tensor table, tree, metadata); the bound
                                           the safetensors reference reader enforces
``MAX_RANK``         64 dimensions          a tensor's shape (and a view's) in a header or a tree
``MAX_DIM``          2**63 - 1              one dimension, and the product of a shape's non-zero
                                           dimensions times the element size (torch's int64 sizes)
==================  =====================  ==========================================================

A view recorded in the tree (``{"T": key, "v": [offset, shape, stride]}``) must lie inside
the tensor it views and hold no more elements than it (:func:`view_error`): the bytes a view
describes are bytes of the file, never more.

Example:
    >>> shape_error([0, 2**63]) is not None, shape_error([2, 3]) is None
    (True, True)
    >>> view_error(6, 0, [2, 3], [3, 1]) is None, view_error(1, 0, [10**12], [0]) is not None
    (True, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torchkeep.errors import InvalidArgumentError

__all__ = ["MAX_DIM", "MAX_HEADER_SIZE", "MAX_RANK", "check_header_size", "shape_error", "view_error"]

#: The same bound the safetensors reference implementation enforces.
MAX_HEADER_SIZE = 100_000_000
MAX_RANK = 64
MAX_DIM = 2**63 - 1


def shape_error(shape: object, itemsize: int = 1) -> str | None:
    """Why ``shape`` cannot be a tensor's shape under the limits (``None`` when it can)."""
    if not isinstance(shape, (list, tuple)):
        return f"the shape {str(shape)[:80]} is not a list"
    if len(shape) > MAX_RANK:
        return f"the shape has {len(shape)} dimensions, more than the limit of {MAX_RANK}"
    for d in shape:
        if type(d) is not int or d < 0:
            return f"the shape {str(shape)[:80]} holds {str(d)[:40]}, not a count of 0 or more"
    if math.prod(d for d in shape if d) * itemsize > MAX_DIM:
        return f"the shape {str(shape)[:80]} holds more elements than an int64 can count (limit {MAX_DIM:,} bytes)"
    return None


def view_error(base_numel: int, offset: object, shape: object, stride: object) -> str | None:
    """Why ``[offset, shape, stride]`` is not a view inside a stored tensor of ``base_numel`` elements.

    A view must use only that tensor's elements (``offset`` >= 0, its last element inside)
    and hold no more elements than it: overlapping (expanded) views are stored as tensors of
    their own by the writer, so a view never asks for more memory than the file holds.
    """
    problem = shape_error(shape)
    if problem:
        return problem
    assert isinstance(shape, (list, tuple))  # shape_error checked it
    if not isinstance(stride, (list, tuple)) or len(stride) != len(shape):
        return f"the strides {str(stride)[:80]} do not match the shape {list(shape)}"
    if any(type(s) is not int or s < 0 or s > MAX_DIM for s in stride):
        return f"the strides {str(stride)[:80]} are not counts of 0 or more"
    if type(offset) is not int or offset < 0:
        return f"the offset {str(offset)[:40]} is not a count of 0 or more"
    numel = math.prod(shape)
    if numel == 0:
        return None if offset <= base_numel else f"the offset {offset} lies past the tensor's {base_numel} elements"
    if numel > base_numel:
        return f"the view holds {numel:,} elements, more than the {base_numel:,} of the tensor it views"
    last = offset + sum((d - 1) * s for d, s in zip(shape, stride, strict=True))
    if last >= base_numel:
        return f"the view reaches element {last:,} of a tensor of {base_numel:,} elements"
    return None


def check_header_size(size: int, tensors: int, where: str) -> None:
    """Refuse to write a header the reader would refuse (``size``: JSON bytes, without the length prefix).

    Raises:
        InvalidArgumentError: the header is over :data:`MAX_HEADER_SIZE`, naming the limit and what to do.
    """
    if size <= MAX_HEADER_SIZE:
        return
    raise InvalidArgumentError(
        where,
        f"<a state tree of {tensors:,} tensors>",
        f"its file header (tensor table, tree and metadata) would be {size:,} bytes, over the {MAX_HEADER_SIZE:,}-byte "
        "limit that torchkeep's and every safetensors reader enforce, so the file could not be loaded; nothing was "
        "written. Pack small tensors into fewer large ones (e.g. torch.cat / a flat buffer per group), keep large "
        "metadata out of the header (a file of its own), or save the state with torchkeep.distributed "
        "(tk.distributed.save), which stores many tensors without one header",
    )


def too_many_dims(shapes: Sequence[Sequence[int]]) -> int | None:
    """The index of the first shape over :data:`MAX_RANK` dimensions (``None``: none)."""
    return next((i for i, s in enumerate(shapes) if len(s) > MAX_RANK), None)

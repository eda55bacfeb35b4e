"""torch dtypes <-> safetensors dtype names, and the bytes of a tensor.

The pure table (names and sizes) is :mod:`torchkeep.format.dtypes`; this module adds the
torch dtype objects, so only code that makes or reads tensors imports torch.

Example:
    >>> import torch
    >>> DTYPE_TO_ST[torch.bfloat16], ST_TO_DTYPE["F32"], dtype_name(torch.int8)
    ('BF16', torch.float32, 'int8')
"""

from __future__ import annotations

import torch

from torchkeep.format.dtypes import PAIRS

__all__ = ["DTYPE_TO_ST", "ST_TO_DTYPE", "buffer_of", "dtype_from_name", "dtype_name"]

#: torch dtype -> safetensors dtype string, for the dtypes this torch build has.
DTYPE_TO_ST: dict[torch.dtype, str] = {
    dt: st for st, name, _ in PAIRS if isinstance(dt := getattr(torch, name, None), torch.dtype)
}
#: safetensors dtype string -> torch dtype.
ST_TO_DTYPE: dict[str, torch.dtype] = {v: k for k, v in DTYPE_TO_ST.items()}

_BY_NAME: dict[str, torch.dtype] = {
    str(dt).removeprefix("torch."): dt for dt in vars(torch).values() if isinstance(dt, torch.dtype)
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the name used in the skeleton JSON)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """``"float32"`` -> ``torch.float32``; raises ``ValueError`` for an unknown name."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}") from None


# dtypes whose numpy view is a buffer that casts to bytes (the rest go through a uint8 view)
_NUMPY_FLOATS = frozenset({torch.float64, torch.float32, torch.float16, torch.complex64, torch.complex128})
_NUMPY_DTYPES = _NUMPY_FLOATS | {torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool}


def buffer_of(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no copy).

    The view keeps ``t``'s memory alive.
    """
    if t.nbytes == 0:
        return memoryview(bytearray())
    if t.dtype in _NUMPY_DTYPES:  # the common case, in one step (this runs once per tensor read or written)
        return memoryview(t.numpy()).cast("B")
    if t.dim() != 1:
        t = t.reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())  # a 1-D uint8 array: already a flat byte view

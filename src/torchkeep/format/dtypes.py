"""Safetensors dtype names, their sizes and the torch dtype names they stand for (pure, no torch).

The torch dtype objects themselves live in :mod:`torchkeep.dtypes`, so header reading,
``inspect`` and ``verify`` answer without importing torch.

Example:
    >>> ITEMSIZE["BF16"], ST_TO_NAME["BF16"], NAME_TO_ST["float32"]
    (2, 'bfloat16', 'F32')
"""

from __future__ import annotations

__all__ = ["ITEMSIZE", "NAME_TO_ST", "PAIRS", "ST_TO_NAME"]

#: (safetensors name, torch dtype name, bytes per element), in safetensors' order.
PAIRS: tuple[tuple[str, str, int], ...] = (
    ("F64", "float64", 8),
    ("F32", "float32", 4),
    ("F16", "float16", 2),
    ("BF16", "bfloat16", 2),
    ("I64", "int64", 8),
    ("I32", "int32", 4),
    ("I16", "int16", 2),
    ("I8", "int8", 1),
    ("U8", "uint8", 1),
    ("U16", "uint16", 2),
    ("U32", "uint32", 4),
    ("U64", "uint64", 8),
    ("BOOL", "bool", 1),
    ("C64", "complex64", 8),
    ("F8_E4M3", "float8_e4m3fn", 1),
    ("F8_E5M2", "float8_e5m2", 1),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz", 1),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz", 1),
)

#: safetensors dtype string -> bytes per element.
ITEMSIZE: dict[str, int] = {st: size for st, _, size in PAIRS}
#: safetensors dtype string -> torch dtype name (``"F32"`` -> ``"float32"``).
ST_TO_NAME: dict[str, str] = {st: name for st, name, _ in PAIRS}
#: torch dtype name -> safetensors dtype string.
NAME_TO_ST: dict[str, str] = {name: st for st, name, _ in PAIRS}

"""Mapping between torch dtypes and safetensors dtype names (pure)."""

from __future__ import annotations

import torch

__all__ = ["DTYPE_TO_ST", "ITEMSIZE", "ST_TO_DTYPE", "dtype_from_name", "dtype_name"]

_PAIRS: list[tuple[str, str]] = [
    ("F64", "float64"),
    ("F32", "float32"),
    ("F16", "float16"),
    ("BF16", "bfloat16"),
    ("I64", "int64"),
    ("I32", "int32"),
    ("I16", "int16"),
    ("I8", "int8"),
    ("U8", "uint8"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("BOOL", "bool"),
    ("C64", "complex64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
]

#: torch dtype -> safetensors dtype string, for the dtypes this torch build has.
DTYPE_TO_ST: dict[torch.dtype, str] = {}
for _st, _name in _PAIRS:
    _dt = getattr(torch, _name, None)
    if isinstance(_dt, torch.dtype):
        DTYPE_TO_ST[_dt] = _st
#: safetensors dtype string -> torch dtype.
ST_TO_DTYPE: dict[str, torch.dtype] = {v: k for k, v in DTYPE_TO_ST.items()}
#: bytes per element of each storable dtype.
ITEMSIZE: dict[str, int] = {st: dt.itemsize for dt, st in DTYPE_TO_ST.items()}

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

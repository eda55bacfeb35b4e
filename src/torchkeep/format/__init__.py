"""Pure byte layout of a torchkeep file: safetensors header, checksums, dtype names."""

from torchkeep.format.dtypes import DTYPE_TO_ST, ITEMSIZE, ST_TO_DTYPE
from torchkeep.format.header import (
    FORMAT_NAME,
    FORMAT_VERSION,
    HashState,
    Header,
    HeaderBuilder,
    TensorSpec,
    digest,
    parse_header,
)

__all__ = [
    "DTYPE_TO_ST",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ITEMSIZE",
    "ST_TO_DTYPE",
    "HashState",
    "Header",
    "HeaderBuilder",
    "TensorSpec",
    "digest",
    "parse_header",
]

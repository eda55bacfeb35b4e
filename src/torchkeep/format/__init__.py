"""Pure byte layout of a torchkeep file: safetensors header, checksums, dtype names."""

from torchkeep.format.dtypes import ITEMSIZE
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
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ITEMSIZE",
    "HashState",
    "Header",
    "HeaderBuilder",
    "TensorSpec",
    "digest",
    "parse_header",
]

"""Small shared fixtures: exact tree comparison and raw safetensors headers."""

from __future__ import annotations

import importlib.util
import json
import math
import struct
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch


def tensor_bits(t: torch.Tensor) -> bytes:
    """The exact bytes of a tensor's values (conj/neg resolved, any layout, any device)."""
    t = t.detach().resolve_conj().resolve_neg().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _float_bits(x: float) -> bytes:
    return struct.pack("<d", x)


def assert_same_tree(got: Any, want: Any, path: str = "<root>") -> None:
    """``got == want`` with exact types (tuple vs list, bool vs int, OrderedDict and its
    ``_metadata``), dict key order and key types, float bit patterns (nan, -0.0) and
    tensors bit for bit with the same dtype, shape, class and ``requires_grad``."""
    assert type(got) is type(want), f"{path}: type {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype, f"{path}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{path}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        assert got.requires_grad == want.requires_grad, f"{path}: requires_grad differs"
        assert tensor_bits(got) == tensor_bits(want), f"{path}: tensor bytes differ"
        if want.dtype != torch.bool and not want.dtype.is_floating_point and not want.dtype.is_complex:
            assert torch.equal(got.cpu(), want.detach().cpu()), f"{path}: values differ"
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape, f"{path}: {got.dtype}{got.shape}"
        assert got.tobytes() == want.tobytes(), f"{path}: array bytes differ"
    elif isinstance(want, np.generic):
        # scalars travel as JSON numbers: nan keeps no sign or payload (tensors do)
        same = got.tobytes() == want.tobytes() or (want.dtype.kind == "f" and np.isnan(got) and np.isnan(want))
        assert got.dtype == want.dtype and same, f"{path}: {got!r} != {want!r}"
    elif isinstance(want, float):
        assert _float_bits(got) == _float_bits(want) or (math.isnan(got) and math.isnan(want)), f"{path}: {got!r}"
    elif isinstance(want, dict):
        gk, wk = list(got), list(want)
        assert gk == wk, f"{path}: keys {gk!r} != {wk!r}"
        for a, b in zip(gk, wk, strict=True):
            assert type(a) is type(b), f"{path}: key {a!r} type {type(a).__name__} != {type(b).__name__}"
        for k in wk:
            assert_same_tree(got[k], want[k], f"{path}[{k!r}]")
        if isinstance(want, OrderedDict):
            assert hasattr(got, "_metadata") == hasattr(want, "_metadata"), f"{path}: _metadata presence"
            if hasattr(want, "_metadata"):
                assert_same_tree(got._metadata, want._metadata, f"{path}._metadata")
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), f"{path}: length {len(got)} != {len(want)}"
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_same_tree(a, b, f"{path}[{i}]")
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


@pytest.fixture(scope="session")
def same_tree() -> Callable[[Any, Any], None]:
    """``same_tree(got, want)``: the exact-equality assertion above, as a fixture."""
    return assert_same_tree


@pytest.fixture(scope="session")
def bits() -> Callable[[torch.Tensor], bytes]:
    """``bits(tensor)``: the exact bytes of a tensor's values."""
    return tensor_bits


def _read_header(path: str | Path) -> tuple[int, dict[str, Any]]:
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n])


@pytest.fixture(scope="session")
def raw_header() -> Callable[[str | Path], tuple[int, dict[str, Any]]]:
    """``raw_header(path) -> (N, header dict)``, parsed independently of torchkeep."""
    return _read_header


def _make_safetensors(head: dict[str, Any] | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    body = head if isinstance(head, bytes) else json.dumps(head).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


@pytest.fixture(scope="session")
def make_safetensors() -> Callable[..., bytes]:
    """``make_safetensors(header dict or raw bytes, data=b"", length=None) -> file bytes``."""
    return _make_safetensors


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests of the ONNX path (named so) skip where the ``onnx`` extra is not installed, as on a
    GPU machine with only the core dependencies; everywhere ``make test`` runs they run."""
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if not missing:
        return
    skip = pytest.mark.skip(reason=f"needs {', '.join(missing)}: pip install 'torchkeep[onnx]'")
    for item in items:
        if "onnx" in item.name.lower():
            item.add_marker(skip)

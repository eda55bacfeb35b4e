"""Tree comparison shared by the tests (on the pytest ``pythonpath``)."""

from __future__ import annotations

import math
from typing import Any

import torch


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Exact equality of two trees: same container types, same dtypes, bitwise-equal tensors."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        )
        assert torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def flat_tensors(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """``{"/a/b/0": tensor}`` for every tensor leaf of a nested dict/list/tuple."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else []
    out: dict[str, torch.Tensor] = {}
    for k, v in items:
        out.update(flat_tensors(v, f"{prefix}/{k}"))
    return out


def assert_bitwise_state(a: Any, b: Any) -> None:
    """Two ``{"model": state dict, "optimizer": optimizer state dict}`` trees: same tensors, bit for bit,
    and the same optimizer hyperparameters (lr, betas, weight decay)."""
    fa, fb = flat_tensors(a), flat_tensors(b)
    assert set(fa) == set(fb) and len(fa) > 10
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and torch.equal(fa[k], fb[k]), k
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]

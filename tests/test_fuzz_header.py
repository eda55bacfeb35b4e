"""Fuzz targets (hypothesis) for the header parser and the skeleton decoders.

Whatever bytes or JSON they are given, they either return something inside the limits of
:mod:`torchkeep.format.limits` (tensors inside the file, views inside their tensor) or raise
a typed :class:`~torchkeep.errors.TorchkeepError`; never another exception, never a hang,
never an allocation larger than the input.

``make test`` runs a brief pass (``TORCHKEEP_FUZZ_EXAMPLES``, default 150 per target). A long
run, for as many seconds per target as you like::

    TORCHKEEP_FUZZ_SECONDS=600 python -m pytest tests/test_fuzz_header.py -p no:cacheprovider \\
        --timeout=0 -s -q

prints how many examples each target ran.
"""

from __future__ import annotations

import json
import math
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchkeep as tk
from torchkeep.errors import CorruptCheckpointError, TorchkeepError
from torchkeep.format.header import parse_header
from torchkeep.format.limits import MAX_RANK
from torchkeep.sources import LazyTensor, decode_lazy
from torchkeep.tree import SkeletonError, unflatten

_EXAMPLES = int(os.environ.get("TORCHKEEP_FUZZ_EXAMPLES", "150"))
_SECONDS = float(os.environ.get("TORCHKEEP_FUZZ_SECONDS", "0"))
_SETTINGS = settings(
    max_examples=_EXAMPLES if not _SECONDS else 2_000,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def _run(name: str, target: Callable[[], None], counter: list[int]) -> None:
    """Run a hypothesis target once, or again and again (fresh random examples) for ``_SECONDS``."""
    stop = time.monotonic() + _SECONDS
    target()
    while time.monotonic() < stop:
        target()
    if _SECONDS:
        print(f"\nfuzz {name}: {counter[0]:,} examples in {_SECONDS:.0f} s")


# -- the header parser ------------------------------------------------------------------------

_GOOD = None


def _good_file() -> bytes:
    global _GOOD
    if _GOOD is None:
        import io

        buf = io.BytesIO()
        tk.save({"w": torch.arange(6.0).view(2, 3), "b": torch.ones(2, dtype=torch.int8), "n": 3}, buf)
        _GOOD = buf.getvalue()
    return _GOOD


_dims = st.one_of(st.integers(0, 8), st.integers(-3, 2**64), st.floats(), st.text(max_size=3), st.none())
_entry = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "I8", "BF16", "F64", "BOOL", "X", ""]),
        "shape": st.one_of(st.lists(_dims, max_size=MAX_RANK + 2), st.integers(), st.none()),
        "data_offsets": st.one_of(st.lists(st.integers(-2, 200), min_size=0, max_size=3), st.none()),
    }
)
_head = st.dictionaries(
    st.text(max_size=8),
    st.one_of(_entry, st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2), st.integers()),
    max_size=6,
)


def _check_header(data: bytes) -> None:
    try:
        h = parse_header(lambda off, n: data[off : off + n], len(data), "fuzz")
    except TorchkeepError:
        return
    data_size = len(data) - h.size
    for s in h.tensors.values():
        assert 0 <= s.start <= s.end <= data_size
        assert len(s.shape) <= MAX_RANK
        torch.empty(s.shape, dtype=torch.uint8, device="meta")  # a shape torch accepts


def test_fuzz_header_parser_on_json_headers() -> None:
    counter = [0]

    @_SETTINGS
    @given(_head, st.binary(max_size=64), st.booleans())
    def target(head: dict[str, Any], data: bytes, meta: bool) -> None:
        counter[0] += 1
        if meta:
            head = {"__metadata__": {"torchkeep.format": "torchkeep/1"}, **head}
        raw = json.dumps(head).encode()
        _check_header(struct.pack("<Q", len(raw)) + raw + data)

    _run("header parser (JSON headers)", target, counter)


def test_fuzz_header_parser_on_damaged_files() -> None:
    counter = [0]
    good = _good_file()

    @_SETTINGS
    @given(
        st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(1, 255)), min_size=1, max_size=8),
        st.integers(0, len(good)),
    )
    def target(flips: list[tuple[int, int]], cut: int) -> None:
        counter[0] += 1
        data = bytearray(good)
        for at, x in flips:
            data[at] ^= x
        _check_header(bytes(data[: max(cut, 8)]))
        _check_header(bytes(data))

    _run("header parser (damaged files)", target, counter)


# -- the skeleton decoders --------------------------------------------------------------------

_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=5)
)
_num = st.one_of(st.integers(-3, 40), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=2))
_view = st.one_of(
    st.tuples(_num, st.lists(_num, max_size=4), st.lists(_num, max_size=4)).map(list),
    st.lists(_num, max_size=4),
    _num,
)
_tensor = st.one_of(
    st.fixed_dictionaries({"T": st.sampled_from(["w", "b", "missing"])}, optional={"v": _view, "P": st.just(1)}),
)
_typed = st.one_of(
    st.fixed_dictionaries({"sz": st.lists(_num, max_size=3)}),
    st.fixed_dictionaries({"f": st.sampled_from(["nan", "inf", "-inf", "x", "1e999"])}),
    st.fixed_dictionaries({"dt": st.sampled_from(["float32", "int8", "bogus"])}),
    st.fixed_dictionaries({"dev": st.sampled_from(["cpu", "cuda:0", "meta", "nope", "cuda:99999999999999999999"])}),
    st.fixed_dictionaries({"ns": st.sampled_from(["int8", "uint8", "float16", "object"]), "v": _num}),
    st.fixed_dictionaries({"V": st.sampled_from(["datetime", "date", "set", "path", "x"]), "v": _leaf}),
)


def _nodes(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.fixed_dictionaries({"d": st.dictionaries(st.text(max_size=3), children, max_size=3)}),
        st.fixed_dictionaries({"l": st.lists(children, max_size=3)}),
        st.fixed_dictionaries({"t": st.lists(children, max_size=3)}),
        st.fixed_dictionaries({"D": st.lists(st.tuples(_leaf, children).map(list), max_size=3)}),
        st.fixed_dictionaries({"o": st.lists(st.tuples(_leaf, children).map(list), max_size=3)}),
        st.fixed_dictionaries({"S": st.text(max_size=3), "v": children}),
        st.lists(children, max_size=2),
    )


_skeleton = st.recursive(st.one_of(_leaf, _tensor, _typed), _nodes, max_leaves=12)
_STORED = {"w": torch.arange(12.0), "b": torch.ones(3, dtype=torch.int8)}


def _sizes(tree: Any) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel()
    if isinstance(tree, LazyTensor):
        return math.prod(tree.shape)
    if isinstance(tree, dict):
        return sum(_sizes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_sizes(v) for v in tree)
    return 0


def test_fuzz_skeleton_decoder() -> None:
    counter = [0]

    @_SETTINGS
    @given(_skeleton)
    def target(skeleton: Any) -> None:
        counter[0] += 1
        skeleton = json.loads(json.dumps(skeleton))  # what a file can hold
        try:
            tree = unflatten(skeleton, _STORED.__getitem__)
        except (SkeletonError, TorchkeepError):
            tree = None
        if tree is not None:
            for t in _tensors(tree):  # every view lies inside its stored tensor, never more elements
                assert t.numel() <= 12
        stored = {k: LazyTensor(tuple(t.shape), t.dtype, None, lambda t=t: t, k) for k, t in _STORED.items()}
        try:
            lazy = decode_lazy(Path("fuzz"), skeleton, stored)
        except CorruptCheckpointError:
            return
        for t in _tensors(lazy):
            if isinstance(t, LazyTensor):
                assert math.prod(t.shape) <= 12
                assert t.load().shape == t.shape

    _run("skeleton decoder", target, counter)


def _tensors(tree: Any) -> list[Any]:
    if isinstance(tree, (torch.Tensor, LazyTensor)):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


@pytest.mark.parametrize("numel", [0, 1, 5])
def test_fuzz_seeds_round_trip(tmp_path: Path, numel: int) -> None:
    """The decoders' happy path, so a fuzz run that finds nothing is also one that decodes something."""
    base = torch.arange(float(numel))
    tree = {"base": base, "view": base[1:], "n": numel}
    back = tk.load(tk.save(tree, tmp_path / "s.safetensors"))
    assert torch.equal(back["view"], base[1:]) and back["n"] == numel

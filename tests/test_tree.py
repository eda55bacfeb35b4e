"""State tree encoding: pure flatten/unflatten, and save -> load round trips (hypothesis)."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import torchkeep as tk
from torchkeep.dtypes import DTYPE_TO_ST
from torchkeep.errors import UnsupportedDtypeError, UnsupportedObjectError
from torchkeep.tree import SkeletonError, flatten, format_path, is_stateful, unflatten

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies -------------------------------------------------------------------------------

STORABLE = sorted(DTYPE_TO_ST, key=str)
ALL_DTYPES = sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)
NP_DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16"]
NP_DTYPES += ["float32", "float64", "complex64"]


@st.composite
def small_tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(STORABLE))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    n = math.prod(shape)
    if dtype == torch.bool:
        t = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool).reshape(shape)
    else:
        raw = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
        t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape) if n else torch.empty(shape)
        t = t.to(dtype) if not n else t
    if (dtype.is_floating_point or dtype.is_complex) and dtype.itemsize >= 2 and draw(st.booleans()):
        kind = draw(st.sampled_from(["param", "param_frozen", "grad"]))
        if kind == "grad":
            return t.requires_grad_(True)
        return torch.nn.Parameter(t, requires_grad=kind == "param")
    return t


@st.composite
def np_arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(NP_DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
    n = math.prod(shape)
    if dtype.kind == "b":
        return np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=dtype).reshape(shape)
    raw = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


np_scalars = st.one_of(
    st.booleans().map(np.bool_),
    st.integers(-(2**63), 2**63 - 1).map(np.int64),
    st.integers(0, 2**64 - 1).map(np.uint64),
    st.integers(-128, 127).map(np.int8),
    st.floats(width=16).map(np.float16),
    st.floats(width=32).map(np.float32),
    st.floats().map(np.float64),
)

floats = st.one_of(st.floats(), st.sampled_from([-0.0, 0.0, math.nan, math.inf, -math.inf, 1.0, 5e-324]))
ints = st.one_of(st.integers(), st.integers(-(2**200), 2**200), st.sampled_from([0, 1, -1, 2**63, 2**64, -(2**63)]))
devices = st.sampled_from(["cpu", "cuda", "cuda:0", "cuda:3", "meta", "mps"]).map(torch.device)
sizes = st.lists(st.integers(0, 2**40), max_size=4).map(torch.Size)

leaves = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    floats,
    st.text(max_size=12),
    st.sampled_from(ALL_DTYPES),
    sizes,
    devices,
    np_scalars,
    np_arrays(),
    small_tensors(),
)
dict_keys = st.one_of(
    st.text(max_size=6), st.integers(-5, 2**65), st.tuples(st.integers(0, 9), st.text(max_size=3)), st.none()
)


def _ordered(items: dict[str, Any], meta: bool) -> OrderedDict:
    od: OrderedDict = OrderedDict(items)
    if meta:  # what nn.Module.state_dict() attaches
        od._metadata = OrderedDict([("", {"version": 1}), ("sub", {"version": 2})])  # type: ignore[attr-defined]
    return od


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
        st.dictionaries(dict_keys, children, max_size=4),
        st.builds(_ordered, st.dictionaries(st.text(max_size=8), children, max_size=3), st.booleans()),
    )


trees = st.recursive(leaves, _containers, max_leaves=16)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("tree") / "t.safetensors"


# -- save -> load round trips -------------------------------------------------------------------


@SETTINGS
@given(tree=trees)
def test_roundtrip_through_file(tree: Any, scratch, same_tree) -> None:
    assume(tree is not None)  # a bare None root has its own test (test_none_root)
    tk.save(tree, scratch, durable=False)
    same_tree(tk.load(scratch), tree)


@SETTINGS
@given(tree=st.dictionaries(st.text(max_size=8), trees, max_size=4))
def test_roundtrip_dict_root_through_file(tree: dict, scratch, same_tree) -> None:
    tk.save(tree, scratch, durable=False)
    same_tree(tk.load(scratch), tree)


@pytest.mark.parametrize(
    "value",
    [True, False, 1, 0, 1.0, -0.0, math.nan, math.inf, -math.inf, 2**64, -(2**100), "", "x", (), [], {}],
    ids=repr,
)
def test_scalar_types_survive(value: Any, tmp_path, same_tree) -> None:
    p = tk.save({"v": value, "in_list": [value], "in_tuple": (value,)}, tmp_path / "s.safetensors")
    got = tk.load(p)
    same_tree(got, {"v": value, "in_list": [value], "in_tuple": (value,)})
    assert type(got["v"]) is type(value)  # True stays bool, 1.0 stays float


@pytest.mark.parametrize("root", [0, "text", [1, 2], (1,), [], 3.5, torch.arange(3)], ids=repr)
def test_non_dict_roots(root: Any, tmp_path, same_tree) -> None:
    p = tk.save(root, tmp_path / "r.safetensors")
    same_tree(tk.load(p), root)


def test_none_root(tmp_path) -> None:
    # A tree that is just None must come back as None (not as an empty flat dict).
    p = tk.save(None, tmp_path / "none.safetensors")
    assert tk.load(p) is None


def test_module_state_dict_is_ordered_dict_with_metadata(tmp_path, same_tree) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    p = tk.save({"model": model}, tmp_path / "m.safetensors")
    got = tk.load(p)["model"]
    want = model.state_dict()
    assert type(got) is OrderedDict
    assert got._metadata == want._metadata
    same_tree(got, want)
    # the metadata is what lets load_state_dict run version-specific upgrade hooks
    fresh = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    fresh.load_state_dict(got)
    assert torch.equal(fresh[0].weight, model[0].weight)


def test_big_int_beyond_json_digit_limit_is_refused_with_path(tmp_path) -> None:
    with pytest.raises(UnsupportedObjectError) as ei:
        tk.save({"cfg": {"huge": 10**5000}}, tmp_path / "x.safetensors")
    assert ei.value.path == "cfg.huge"
    assert not (tmp_path / "x.safetensors").exists()


def test_lone_surrogate_string_is_refused_with_path(tmp_path) -> None:
    with pytest.raises(UnsupportedObjectError) as ei:
        tk.save({"cfg": {"name": "bad \ud800"}}, tmp_path / "x.safetensors")
    assert ei.value.path == "cfg.name"
    with pytest.raises(UnsupportedObjectError):
        tk.save({"cfg": {"bad \udfff": 1}}, tmp_path / "x.safetensors")


@pytest.mark.parametrize(
    "value",
    [np.longdouble(1.5), np.complex64(1 + 2j), np.array([1.0], dtype=">f4"), np.array(["a"]), np.datetime64(1, "D")],
    ids=["longdouble", "complex64 scalar", "big-endian array", "str array", "datetime64"],
)
def test_unsupported_numpy_values_are_refused_with_path(value: Any, tmp_path) -> None:
    with pytest.raises(UnsupportedObjectError) as ei:
        tk.save({"np": [value]}, tmp_path / "x.safetensors")
    assert ei.value.path == "np[0]"


# -- flatten / unflatten, no files ----------------------------------------------------------------


def _through_json(skeleton: Any) -> Any:
    text = json.dumps(skeleton, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return json.loads(text)


@SETTINGS
@given(tree=trees)
def test_flatten_unflatten_pure(tree: Any, same_tree) -> None:
    flat = flatten(tree)
    skeleton = _through_json(flat.skeleton)  # the skeleton is strict JSON (no NaN literals)
    got = unflatten(skeleton, flat.tensors.__getitem__)
    same_tree(got, tree)
    for t in flat.tensors.values():
        assert isinstance(t, torch.Tensor) and t.dtype in DTYPE_TO_ST


@SETTINGS
@given(tree=trees)
def test_flatten_is_deterministic(tree: Any) -> None:
    a, b = flatten(tree), flatten(tree)
    assert json.dumps(a.skeleton, allow_nan=False) == json.dumps(b.skeleton, allow_nan=False)
    assert list(a.tensors) == list(b.tensors)


def test_tensor_keys_are_tree_paths() -> None:
    w, s = torch.zeros(2), torch.ones(1)
    flat = flatten({"model": {"encoder.layers.0.weight": w}, "optimizer": {"state": {3: {"exp_avg": s}}}})
    assert set(flat.tensors) == {"model/encoder.layers.0.weight", "optimizer/state/3/exp_avg"}
    assert flat.tensors["model/encoder.layers.0.weight"] is w


def test_tensor_keys_never_collide() -> None:
    ts = [torch.full((1,), float(i)) for i in range(6)]
    tree = {"a/b": ts[0], "a": {"b": ts[1]}, 1: ts[2], "1": ts[3], "1~2": ts[4], "%2F": ts[5]}
    flat = flatten(tree)
    assert len(flat.tensors) == 6
    got = unflatten(_through_json(flat.skeleton), flat.tensors.__getitem__)
    for k, t in zip(tree, ts, strict=True):
        v = got[k] if k != "a" else got["a"]["b"]
        assert torch.equal(v, t)


def test_shared_tensors_stored_once_and_views_recorded() -> None:
    base = torch.arange(12.0).reshape(3, 4)
    tree = {"base": base, "again": base, "row": base[1], "cols": base[:, 1:3], "t": base.t()}
    flat = flatten(tree)
    assert list(flat.tensors) == ["base"]
    got = unflatten(_through_json(flat.skeleton), flat.tensors.__getitem__)
    assert got["again"] is got["base"]
    for k in ("row", "cols", "t"):
        assert torch.equal(got[k], tree[k]), k
        assert got[k].untyped_storage().data_ptr() == got["base"].untyped_storage().data_ptr()


def test_views_not_covered_by_one_member_are_stored_separately() -> None:
    base = torch.arange(8.0)
    tree = {"lo": base[:4], "hi": base[4:]}
    flat = flatten(tree)
    assert len(flat.tensors) == 2
    got = unflatten(_through_json(flat.skeleton), flat.tensors.__getitem__)
    assert torch.equal(got["lo"], tree["lo"]) and torch.equal(got["hi"], tree["hi"])


def test_conj_and_neg_views_keep_their_values() -> None:
    c = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    x = torch.tensor([1.0, -2.0, 3.0])
    tree = {"c": c, "cc": c.conj(), "x": x, "nx": torch._neg_view(x)}
    flat = flatten(tree)
    got = unflatten(_through_json(flat.skeleton), lambda k: flat.tensors[k].resolve_conj().resolve_neg())
    assert torch.equal(got["cc"], c.conj().resolve_conj())
    assert torch.equal(got["nx"], -x)
    assert torch.equal(got["c"], c) and torch.equal(got["x"], x)


def test_requires_grad_of_one_node_does_not_leak_to_another() -> None:
    x = torch.randn(3, requires_grad=True)
    flat = flatten({"x": x, "plain": x.detach()})
    got = unflatten(_through_json(flat.skeleton), lambda k: flat.tensors[k].detach().clone())
    assert got["x"].requires_grad and not got["plain"].requires_grad
    assert torch.equal(got["x"], got["plain"])


def test_unflatten_calls_get_once_per_key_and_place_per_device() -> None:
    w = torch.ones(2)
    flat = flatten({"a": w, "b": w, "c": w[:1]})
    calls: list[str] = []
    placed: list[Any] = []

    def get(key: str) -> torch.Tensor:
        calls.append(key)
        return flat.tensors[key].clone()

    def place(t: torch.Tensor, dev: str | None) -> torch.Tensor:
        placed.append(dev)
        return t

    got = unflatten(_through_json(flat.skeleton), get, place)
    assert calls == ["a"] and placed == [None]
    assert got["a"] is got["b"]


@pytest.mark.parametrize(
    ("tree", "where", "exc"),
    [
        (
            {"optimizer": {"param_groups": [{"foo": lambda: 0}]}},
            "optimizer.param_groups[0].foo",
            UnsupportedObjectError,
        ),
        ({"config": {"callback": print}}, "config.callback", UnsupportedObjectError),
        ({"f": [object()]}, "f[0]", UnsupportedObjectError),
        # sets, complex numbers and bytes are everyday values now (test_values.py); these are not
        ({"s": {1, 2, object()}}, "s[2]", UnsupportedObjectError),
        ({"c": range(3)}, "c", UnsupportedObjectError),
        ({"b": memoryview(b"bytes")}, "b", UnsupportedObjectError),
        ({"m": {"x.y": torch.zeros(2, device="meta")}}, "m['x.y']", UnsupportedObjectError),
        ({"sp": torch.eye(2).to_sparse()}, "sp", UnsupportedObjectError),
        ({"w": {"c128": torch.zeros(1, dtype=torch.complex128)}}, "w.c128", UnsupportedDtypeError),
        ({7: torch.zeros(1, dtype=torch.complex128)}, "[7]", UnsupportedDtypeError),
    ],
)
def test_unsupported_leaves_name_their_path(tree: Any, where: str, exc: type[Exception]) -> None:
    with pytest.raises(exc) as ei:
        flatten(tree)
    assert ei.value.path == where
    assert where in str(ei.value)


def test_lambda_message_names_the_lambda() -> None:
    with pytest.raises(UnsupportedObjectError, match=r"config\.callback: cannot save <[\w.<>]*lambda>"):
        flatten({"config": {"callback": lambda x: x}})


def test_reference_cycle_is_refused() -> None:
    a: list[Any] = [1]
    a.append(a)
    with pytest.raises(UnsupportedObjectError, match="cycle"):
        flatten({"a": a})


def test_repeated_non_cyclic_container_is_fine(same_tree) -> None:
    shared = [1, 2]
    flat = flatten({"x": shared, "y": shared})
    same_tree(unflatten(_through_json(flat.skeleton), flat.tensors.__getitem__), {"x": [1, 2], "y": [1, 2]})


def test_stateful_leaf_becomes_its_state_dict() -> None:
    class Counter:
        def __init__(self) -> None:
            self.n = 5

        def state_dict(self) -> dict:
            return {"n": self.n, "hist": torch.arange(3)}

        def load_state_dict(self, sd: dict) -> None:
            self.n = sd["n"]

    c = Counter()
    assert is_stateful(c) and not is_stateful(Counter) and not is_stateful({"a": 1})
    flat = flatten({"counter": c})
    got = unflatten(_through_json(flat.skeleton), flat.tensors.__getitem__)
    assert got["counter"]["n"] == 5 and torch.equal(got["counter"]["hist"], torch.arange(3))


def test_generator_roundtrip() -> None:
    g = torch.Generator().manual_seed(123)
    torch.rand(5, generator=g)
    flat = flatten({"g": g})
    got = unflatten(_through_json(flat.skeleton), flat.tensors.__getitem__)["g"]
    assert isinstance(got, torch.Generator)
    assert torch.equal(torch.rand(4, generator=got), torch.rand(4, generator=g))


def test_format_path() -> None:
    assert format_path(("optimizer", "param_groups", 0, "foo")) == "optimizer.param_groups[0].foo"
    assert format_path(()) == ""
    assert format_path((3, "a.b", (1, "x"))) == "[3]['a.b'][(1, 'x')]"


# -- malformed skeletons: only SkeletonError ---------------------------------------------------------

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=6)),
    lambda ch: st.one_of(st.lists(ch, max_size=3), st.dictionaries(st.text(max_size=3), ch, max_size=3)),
    max_leaves=10,
)
node_tags = ["d", "l", "t", "T", "D", "o", "m", "f", "dt", "sz", "dev", "ns", "v", "S", "G", "s", "P", "rg", "np"]
skeleton_nodes = st.recursive(
    json_values,
    lambda ch: st.one_of(
        st.dictionaries(st.sampled_from(node_tags), ch, min_size=1, max_size=3),
        st.lists(ch, max_size=3),
    ),
    max_leaves=12,
)


@SETTINGS
@given(skeleton=skeleton_nodes)
def test_unflatten_malformed_skeleton_raises_only_skeleton_error(skeleton: Any) -> None:
    tensors = {"k": torch.arange(4.0), "g": torch.zeros(3, dtype=torch.uint8)}
    try:
        unflatten(skeleton, tensors.__getitem__)
    except SkeletonError:
        pass

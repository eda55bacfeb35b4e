"""Tensors: every storable dtype bit for bit, layouts and views, sharing, parameters, devices, lazy reads."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch
from loadfile import load_file
from torch import nn

import torchkeep as tk
from torchkeep.errors import ChecksumMismatchError, KeyMismatchError, UnsupportedDtypeError, UnsupportedObjectError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

#: every dtype safetensors holds: the same list the golden file is made from
STORABLE: list[str] = load_file("tk_make_golden", Path(__file__).parent / "fixtures" / "make_golden.py").DTYPES


def _every_pattern(dtype: torch.dtype) -> torch.Tensor:
    """All byte values in every byte position (so nan payloads, -0, subnormals, inf all occur)."""
    if dtype == torch.bool:
        return torch.tensor([[True, False], [False, True]])
    size = dtype.itemsize
    rows = [bytes(((b + i * 97) % 256) for i in range(size)) for b in range(256)]
    raw = bytearray(b"".join(rows))
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(16, 16).clone()


def _keys(path: Path) -> list[str]:
    with safetensors.safe_open(str(path), "pt") as f:
        return list(f.keys())


# -- dtypes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STORABLE)
def test_every_storable_dtype_roundtrips_bit_exact(name: str, tmp_path: Path, bits) -> None:
    dtype = getattr(torch, name)
    t = _every_pattern(dtype)
    tree = {"t": t, "scalar": t.reshape(-1)[3].clone(), "dtype": dtype}
    got = tk.load(tk.save(tree, tmp_path / "d.safetensors"))
    for k in ("t", "scalar"):
        assert got[k].dtype == dtype and got[k].shape == tree[k].shape
        assert bits(got[k]) == bits(tree[k]), k
    assert got["dtype"] is dtype


def test_all_dtypes_in_one_file(tmp_path: Path, bits) -> None:
    tree = {name: _every_pattern(getattr(torch, name))[:3] for name in STORABLE}
    p = tk.save(tree, tmp_path / "all.safetensors")
    got = tk.load(p)
    assert list(got) == STORABLE
    for name in STORABLE:
        assert got[name].dtype == tree[name].dtype and bits(got[name]) == bits(tree[name]), name


UNSUPPORTED = ["complex128", "complex32", "float8_e8m0fnu", "float4_e2m1fn_x2"]


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental:UserWarning")
@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_dtype_names_the_tensor(name: str, tmp_path: Path) -> None:
    dtype = getattr(torch, name, None)
    if dtype is None:
        pytest.skip(f"torch {torch.__version__} has no {name}")
    t = torch.zeros(2, 2, dtype=torch.uint8).view(dtype) if dtype.itemsize == 1 else torch.zeros(2, dtype=dtype)
    with pytest.raises(UnsupportedDtypeError) as ei:
        tk.save({"model": {"layers": [{"w": t}]}}, tmp_path / "u.safetensors")
    assert ei.value.path == "model.layers[0].w"
    assert "model.layers[0].w" in str(ei.value) and str(dtype) in str(ei.value)
    assert not (tmp_path / "u.safetensors").exists()
    assert list(tmp_path.iterdir()) == []  # no temp file left behind


@pytest.mark.filterwarnings("ignore:.*quantize_per_tensor:UserWarning")
def test_quantized_tensor_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    q = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)
    with pytest.raises(UnsupportedObjectError) as ei:
        tk.save({"q": {"w": q}}, tmp_path / "q.safetensors")
    assert ei.value.path == "q.w" and "quantize after loading" in str(ei.value)
    assert not list(tmp_path.iterdir())


# -- shapes, layouts and views -------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.tensor(2.5),
        lambda: torch.tensor(7, dtype=torch.int64),
        lambda: torch.zeros(0, 5),
        lambda: torch.zeros(3, 0, 2, dtype=torch.int16),
        lambda: torch.arange(12.0).reshape(3, 4).t(),
        lambda: torch.arange(24.0).reshape(2, 3, 4).permute(2, 0, 1),
        lambda: torch.arange(20.0)[3:17:2],
        lambda: torch.arange(30).reshape(5, 6)[1:4, ::2],
        lambda: torch.ones(3).expand(4, 3),
        lambda: torch.tensor([1 + 2j, -3 - 4j], dtype=torch.complex64).conj(),
        lambda: torch._neg_view(torch.tensor([1.0, -2.0])),
        lambda: torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64).conj().imag,
        lambda: torch.arange(8, dtype=torch.float32).view(torch.int32),
    ],
    ids=[
        "0-dim",
        "0-dim-int",
        "empty-0xN",
        "empty-middle",
        "transposed",
        "permuted",
        "strided-slice",
        "2d-slice",
        "expanded",
        "conj-view",
        "neg-view",
        "conj-imag",
        "dtype-view",
    ],
)
def test_shapes_and_views_roundtrip(make: Any, tmp_path: Path, bits) -> None:
    t = make()
    got = tk.load(tk.save({"t": t}, tmp_path / "v.safetensors"))["t"]
    assert got.dtype == t.dtype and got.shape == t.shape
    assert bits(got) == bits(t)
    assert not got.is_conj() or torch.equal(got.resolve_conj(), t.resolve_conj())


def test_views_of_one_base_are_stored_once_and_share_storage(tmp_path: Path, bits) -> None:
    base = torch.arange(24.0).reshape(4, 6)
    tree = {"base": base, "row": base[2], "block": base[1:3, 2:5], "t": base.t(), "flat": base.view(-1)}
    p = tk.save(tree, tmp_path / "views.safetensors")
    assert _keys(p) == ["base"]
    assert p.stat().st_size < 8 + 4096 + base.numel() * 4  # the data once, not five times
    got = tk.load(p)
    ptr = got["base"].untyped_storage().data_ptr()
    for k, v in tree.items():
        assert bits(got[k]) == bits(v) and got[k].shape == v.shape, k
        assert got[k].untyped_storage().data_ptr() == ptr, k
    got["base"][2, 0] = -1.0  # really one storage: writes show through the views
    assert got["row"][0] == -1.0 and got["flat"][12] == -1.0


def test_view_without_its_base_stores_only_the_view(tmp_path: Path) -> None:
    big = torch.zeros(1000, 100)
    p = tk.save({"row": big[5]}, tmp_path / "row.safetensors")
    assert p.stat().st_size < 8 + 4096 + 100 * 4
    assert tk.load(p)["row"].shape == (100,)


def test_conj_view_next_to_its_source_keeps_both_values(tmp_path: Path) -> None:
    c = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    x = torch.tensor([1.0, -2.0, 3.0])
    for tree in ({"c": c, "cc": c.conj()}, {"cc": c.conj(), "c": c}, {"x": x, "n": torch._neg_view(x)}):
        got = tk.load(tk.save(tree, tmp_path / "c.safetensors"))
        for k, v in tree.items():
            assert torch.equal(got[k].resolve_conj().resolve_neg(), v.resolve_conj().resolve_neg()), (tree.keys(), k)


def test_same_tensor_twice_is_stored_once_and_comes_back_as_one(tmp_path: Path) -> None:
    w = torch.randn(4, 4)
    p = tk.save({"a": w, "b": [w, {"c": w}]}, tmp_path / "s.safetensors")
    assert len(_keys(p)) == 1
    got = tk.load(p)
    assert got["a"] is got["b"][0] is got["b"][1]["c"]
    assert torch.equal(got["a"], w)


def test_dtype_reinterpreting_views_are_stored_separately(tmp_path: Path, bits) -> None:
    f = torch.arange(4, dtype=torch.float32)
    tree = {"f": f, "i": f.view(torch.int32), "b": f.view(torch.uint8)}
    got = tk.load(tk.save(tree, tmp_path / "dv.safetensors"))
    for k, v in tree.items():
        assert got[k].dtype == v.dtype and bits(got[k]) == bits(v), k


# -- parameters and requires_grad -------------------------------------------------------------------


def test_parameters_and_requires_grad(tmp_path: Path) -> None:
    p_train = nn.Parameter(torch.randn(3))
    p_frozen = nn.Parameter(torch.randn(2), requires_grad=False)
    leaf = torch.randn(2, requires_grad=True)
    plain = torch.randn(2)
    tree = {"p": p_train, "frozen": p_frozen, "leaf": leaf, "plain": plain, "nonleaf": leaf * 2}
    got = tk.load(tk.save(tree, tmp_path / "p.safetensors"))
    assert type(got["p"]) is nn.Parameter and got["p"].requires_grad
    assert type(got["frozen"]) is nn.Parameter and not got["frozen"].requires_grad
    assert type(got["leaf"]) is torch.Tensor and got["leaf"].requires_grad and got["leaf"].is_leaf
    assert type(got["plain"]) is torch.Tensor and not got["plain"].requires_grad
    assert got["nonleaf"].requires_grad and got["nonleaf"].is_leaf  # saved as data: the graph is not kept
    for k, v in tree.items():
        assert torch.equal(got[k].detach(), v.detach()), k
    (got["p"].sum() + got["leaf"].sum()).backward()  # usable for training as loaded
    assert got["p"].grad is not None and got["leaf"].grad is not None


def test_requires_grad_does_not_leak_to_a_detached_alias(tmp_path: Path) -> None:
    x = torch.randn(3, requires_grad=True)
    got = tk.load(tk.save({"x": x, "d": x.detach()}, tmp_path / "g.safetensors"))
    assert got["x"].requires_grad and not got["d"].requires_grad
    assert got["x"].untyped_storage().data_ptr() == got["d"].untyped_storage().data_ptr()


def test_module_parameters_save_as_plain_state(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    got = tk.load(tk.save({"model": model}, tmp_path / "m.safetensors"))["model"]
    assert set(got) == {"weight", "bias"}
    assert type(got["weight"]) is torch.Tensor and not got["weight"].requires_grad
    assert torch.equal(got["weight"], model.weight.detach())


# -- tied weights ----------------------------------------------------------------------------------


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.hidden = nn.Linear(4, 4)
        self.decoder = nn.Linear(4, 11, bias=False)
        self.decoder.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.hidden(self.embed(x)))


def test_tied_weights_stored_once_and_still_tied_after_restore(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.arange(5)).sum().backward()
    opt.step()
    p = tk.save({"model": model}, tmp_path / "tied.safetensors")
    keys = _keys(p)
    assert sum(k in keys for k in ("model/embed.weight", "model/decoder.weight")) == 1, keys
    assert len(keys) == 3  # embed/decoder once, hidden.weight, hidden.bias

    torch.manual_seed(1)
    fresh = Tied()
    tk.restore(p, {"model": fresh})
    assert fresh.decoder.weight is fresh.embed.weight
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    assert torch.equal(fresh.hidden.weight, model.hidden.weight)
    x = torch.arange(5)
    assert torch.equal(fresh(x), model(x))
    loaded = tk.load(p)["model"]
    assert loaded["embed.weight"].untyped_storage().data_ptr() == loaded["decoder.weight"].untyped_storage().data_ptr()


# -- map_location ----------------------------------------------------------------------------------


def _record(calls: list[tuple[str, str]]):
    def fn(t: torch.Tensor, saved: str) -> torch.Tensor:
        calls.append((tuple(t.shape), saved))
        return t * 2

    return fn


@pytest.mark.parametrize(
    "loc", ["cpu", torch.device("cpu"), {"cpu": "cpu"}, None, "default"], ids=["str", "device", "dict", "none", "omit"]
)
def test_map_location_on_cpu(loc: Any, tmp_path: Path) -> None:
    base = torch.arange(6.0)
    p = tk.save({"w": base, "v": base[2:4], "n": 3}, tmp_path / "m.safetensors")
    got = tk.load(p) if loc == "default" else tk.load(p, map_location=loc)
    assert got["w"].device.type == "cpu" and torch.equal(got["w"], base)
    assert torch.equal(got["v"], base[2:4]) and got["n"] == 3
    assert got["v"].untyped_storage().data_ptr() == got["w"].untyped_storage().data_ptr()


def test_map_location_callable(tmp_path: Path) -> None:
    base = torch.arange(6.0)
    p = tk.save({"w": base, "v": base[2:4], "o": torch.ones(1)}, tmp_path / "m.safetensors")
    calls: list[tuple[str, str]] = []
    got = tk.load(p, map_location=_record(calls))
    assert sorted(calls) == [((1,), "cpu"), ((6,), "cpu")]  # once per stored tensor, with the saved device
    assert torch.equal(got["w"], base * 2) and torch.equal(got["v"], base[2:4] * 2)


def test_restore_with_map_location(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    p = tk.save({"model": model}, tmp_path / "r.safetensors")
    fresh = nn.Linear(2, 2)
    tk.restore(p, {"model": fresh}, map_location=torch.device("cpu"))
    assert torch.equal(fresh.weight, model.weight)


def test_saved_device_is_recorded(tmp_path: Path, raw_header) -> None:
    p = tk.save({"w": torch.ones(2)}, tmp_path / "d.safetensors")
    _, head = raw_header(p)
    skeleton = json.loads(head["__metadata__"]["torchkeep.tree"])
    assert "dev" not in skeleton["d"]["w"]  # CPU tensors carry no device tag


@cuda
@pytest.mark.cuda
def test_cuda_save_then_load_to_cpu(tmp_path: Path, bits) -> None:
    t = torch.arange(10.0, device="cuda").reshape(2, 5)
    tree = {"w": t, "v": t[:, 1:3], "p": nn.Parameter(torch.ones(3, device="cuda"))}
    p = tk.save(tree, tmp_path / "cuda.safetensors")
    got = tk.load(p)
    assert got["w"].device.type == "cpu" and bits(got["w"]) == bits(t) and bits(got["v"]) == bits(t[:, 1:3])
    got = tk.load(p, map_location={"cuda:0": "cpu"})
    assert got["w"].device.type == "cpu"
    got = tk.load(p, map_location=None)  # back where it was saved
    assert got["w"].device == t.device and got["p"].device == t.device and type(got["p"]) is nn.Parameter
    assert got["v"].untyped_storage().data_ptr() == got["w"].untyped_storage().data_ptr()
    got = tk.load(p, map_location="cuda")
    assert got["w"].is_cuda and torch.equal(got["w"], t)


@cuda
@pytest.mark.cuda
def test_cpu_save_then_load_to_cuda_and_restore(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    p = tk.save({"model": model}, tmp_path / "m.safetensors")
    got = tk.load(p, map_location={"cpu": "cuda:0"})
    assert got["model"]["weight"].is_cuda
    fresh = nn.Linear(3, 2).cuda()
    tk.restore(p, {"model": fresh})
    assert torch.equal(fresh.weight.cpu(), model.weight)


# -- lazy handle -------------------------------------------------------------------------------------


def _data_offset(path: Path, key: str) -> int:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    head = json.loads(data[8 : 8 + n])
    return 8 + n + head[key]["data_offsets"][0]


def test_open_reads_only_what_is_asked(tmp_path: Path) -> None:
    tree: dict[str, Any] = {"a": torch.arange(100.0), "b": torch.ones(50, dtype=torch.int16), "c": torch.zeros(3)}
    p = tk.save(tree, tmp_path / "lazy.safetensors")
    while p.read_bytes()[0] == 0x80:  # keep clear of the pickle-lookalike length (own test in test_format)
        tree["pad"] = tree.get("pad", "") + "x" * 8
        p = tk.save(tree, tmp_path / "lazy.safetensors")
    raw = bytearray(p.read_bytes())
    raw[_data_offset(p, "a") + 10] ^= 0x01  # damage "a" only
    p.write_bytes(bytes(raw))
    with tk.open(p) as ck:
        assert sorted(ck.keys()) == ["a", "b", "c"]
        assert torch.equal(ck.get("b"), tree["b"])  # not touched by the damage: reading it never looks at "a"
        assert torch.equal(ck.get("c"), tree["c"])
        with pytest.raises(ChecksumMismatchError) as ei:
            ck.get("a")
        assert ei.value.key == "a"
        with pytest.raises(KeyMismatchError):
            ck.get("nope")
    with pytest.raises(ChecksumMismatchError):
        tk.load(p)
    assert torch.equal(tk.load(p, verify=False)["b"], tree["b"])


def test_open_handle_reads_metadata_and_skeleton(tmp_path: Path) -> None:
    p = tk.save({"w": torch.ones(2), "epoch": 3}, tmp_path / "m.safetensors", metadata={"run": "r1", "acc": 0.5})
    with tk.open(p) as ck:
        assert ck.is_torchkeep
        assert ck.metadata == {"run": "r1", "acc": 0.5}
        assert ck.skeleton["d"]["epoch"] == 3
        assert list(ck) == ck.keys() == ["w"]

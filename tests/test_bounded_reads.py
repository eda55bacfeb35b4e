"""Every allocation a file drives is bounded by the file; save refuses what load refuses.

The damaged and malicious files are written here, byte by byte or from a real save
whose tree or DCP metadata is then rewritten.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import torchkeep as tk
from torchkeep.errors import CorruptCheckpointError, InvalidArgumentError, UnsupportedObjectError
from torchkeep.format import limits
from torchkeep.format.meta import TREE_KEY
from torchkeep.writer import provenance_metadata, write_checksummed

# -- helpers ----------------------------------------------------------------------------------


def _craft(path: Path, tensors: dict[str, torch.Tensor], skeleton: Any) -> Path:
    """A well-sealed torchkeep file (valid checksums) holding ``tensors`` and any ``skeleton``."""
    meta = {**provenance_metadata(), TREE_KEY: skeleton if isinstance(skeleton, str) else json.dumps(skeleton)}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_checksummed(fd, tensors, meta)
    finally:
        os.close(fd)
    return path


def _raw_safetensors(path: Path, head: dict[str, Any], data: bytes = b"") -> Path:
    raw = json.dumps(head).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _model_and_opt() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    return model, opt


def _replace_view(node: Any, key_part: str, view: list[Any], base: str) -> Any:
    """The skeleton with the tensor node(s) whose key ends with ``key_part`` turned into ``view`` of ``base``."""
    if isinstance(node, list):
        return [_replace_view(v, key_part, view, base) for v in node]
    if isinstance(node, dict):
        if "T" in node and isinstance(node["T"], str) and node["T"].endswith(key_part):
            return {"T": base, "v": view}
        return {k: _replace_view(v, key_part, view, base) for k, v in node.items()}
    return node


def _expand_view_file(tmp_path: Path, numel: int) -> Path:
    """A small torchkeep file whose optimizer state ``exp_avg`` is an expanded view of one element."""
    model, opt = _model_and_opt()
    good = tk.save({"model": model, "optimizer": opt}, tmp_path / "good.safetensors")
    with tk.open(good) as ck:
        tensors = ck.read()
        skeleton = ck.skeleton
    tensors["one"] = torch.ones(1)
    skeleton = _replace_view(skeleton, "exp_avg", [0, [numel], [0]], "one")
    return _craft(tmp_path / "expand.safetensors", tensors, skeleton)


# -- views in the tree ------------------------------------------------------------------------


@pytest.mark.parametrize("numel", [250_000_000, 10**12])
def test_expanded_view_in_optimizer_state_is_refused_before_allocating(tmp_path: Path, numel: int) -> None:
    path = _expand_view_file(tmp_path, numel)
    assert path.stat().st_size < 8192
    model, opt = _model_and_opt()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(CorruptCheckpointError, match="more than the 1 of the tensor it views"):
        tk.restore(path, {"model": model, "optimizer": opt})
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with pytest.raises(CorruptCheckpointError, match="bad view"):
        tk.load(path)
    with pytest.raises(CorruptCheckpointError, match="bad view"):
        tk.load_into(torch.nn.Linear(4, 3), path, key="optimizer.state.0", strict=False, min_matched=0)


@pytest.mark.parametrize(
    ("view", "why"),
    [
        ([0, [3], [2]], "reaches element 4"),  # past the end of a 4-element tensor
        ([0, [5], [1]], "5 elements, more than the 4"),
        ([3, [2], [1]], "reaches element 4"),
        ([-1, [1], [1]], "offset -1"),
        ([0, [2], [-1]], "strides"),
        ([0, [2, 2], [1]], "do not match"),
        ([0, [2**64], [1]], "more elements than an int64"),
        ([2**70, [1], [1]], "reaches element"),
        ([0, [1.5], [1]], "not a count"),
        ([0, [1] * 65, [1] * 65], "65 dimensions"),
        ("x", "not a view"),
    ],
)
def test_bad_views_are_typed_errors(tmp_path: Path, view: Any, why: str) -> None:
    path = _craft(tmp_path / "v.safetensors", {"w": torch.arange(4.0)}, {"d": {"a": {"T": "w", "v": view}}})
    with pytest.raises(CorruptCheckpointError, match=why):
        tk.load(path)
    with pytest.raises(CorruptCheckpointError, match=why):
        tk.load_into(torch.nn.Module(), path, strict=False, min_matched=0)


def test_views_inside_their_tensor_still_load(tmp_path: Path) -> None:
    base = torch.arange(12.0)
    tree = {"base": base, "row": base.view(3, 4)[1], "col": base.view(3, 4)[:, 2], "empty": base[12:]}
    back = tk.load(tk.save(tree, tmp_path / "ok.safetensors"))
    for k, v in tree.items():
        assert torch.equal(back[k], v), k
    assert back["row"].data_ptr() == back["base"].data_ptr() + 4 * 4  # still a view, not a copy


def test_expanded_views_are_saved_as_tensors_of_their_own(tmp_path: Path) -> None:
    base = torch.arange(4.0)
    tree = {"base": base, "wide": base[:1].expand(1000)}
    path = tk.save(tree, tmp_path / "e.safetensors")
    with tk.open(path) as ck:
        assert sorted(ck.keys()) == ["base", "wide"]
    back = tk.load(path)
    assert torch.equal(back["wide"], torch.zeros(1000)) and torch.equal(back["base"], base)


# -- numbers out of range ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "node",
    [
        {"sz": [2**64]},
        {"sz": [1, 2**63]},
        {"ns": "int8", "v": 1000},
        {"ns": "uint8", "v": -1},
        {"f": "1e999999"},
        {"dt": "float1024"},
        {"dev": "cuda:99999999999999999999"},
        {"V": "datetime", "v": "99999-01-01"},
    ],
)
def test_skeleton_numbers_out_of_range_are_typed(tmp_path: Path, node: Any) -> None:
    path = _craft(tmp_path / "n.safetensors", {"w": torch.ones(1)}, {"d": {"w": {"T": "w"}, "x": node}})
    try:
        got = tk.load(path)
    except CorruptCheckpointError:
        return
    assert "x" in got  # what loads is a value, never a bare OverflowError / RuntimeError


def test_deeply_nested_tree_is_a_typed_error(tmp_path: Path) -> None:
    node = '{"l":[' * 900 + '{"T":"w"}' + "]}" * 900  # as JSON text: too deep for json.dumps here
    path = _craft(tmp_path / "deep.safetensors", {"w": torch.ones(1)}, node)
    for call in (lambda: tk.load(path), lambda: tk.load_into(torch.nn.Module(), path, strict=False, min_matched=0)):
        try:
            call()
        except CorruptCheckpointError:
            pass


@pytest.mark.parametrize(
    ("shape", "why"),
    [
        ([0, 2**63], "more elements than an int64"),
        ([0, 2**62, 4], "more elements than an int64"),
        ([1] * 65, "65 dimensions"),
        ([-1], "not a count"),
    ],
)
def test_header_shapes_beyond_torch_are_corrupt(tmp_path: Path, shape: list[int], why: str) -> None:
    path = _raw_safetensors(tmp_path / "s.safetensors", {"t": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}})
    with pytest.raises(CorruptCheckpointError, match=why):
        tk.load(path)
    with pytest.raises(CorruptCheckpointError, match=why):
        tk.load_into(torch.nn.Module(), path, strict=False, min_matched=0)


def test_zero_sized_but_large_shape_still_loads(tmp_path: Path) -> None:
    path = _raw_safetensors(
        tmp_path / "z.safetensors", {"t": {"dtype": "F32", "shape": [0, 2**40], "data_offsets": [0, 0]}}
    )
    assert tk.load(path)["t"].shape == (0, 2**40)


# -- save refuses what load refuses -----------------------------------------------------------


def test_save_refuses_a_header_over_the_reader_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "MAX_HEADER_SIZE", 20_000)
    tree = {f"t{i}": torch.zeros(1) for i in range(500)}
    target = tmp_path / "many.safetensors"
    with pytest.raises(InvalidArgumentError, match=r"over the 20,000-byte limit.*torchkeep\.distributed") as e:
        tk.save(tree, target)
    assert "500 tensors" in str(e.value)
    assert not target.exists() and not list(tmp_path.iterdir())
    small = tk.save({f"t{i}": torch.zeros(1) for i in range(50)}, tmp_path / "few.safetensors")
    assert len(tk.load(small)) == 50


def test_save_refuses_metadata_that_makes_the_header_too_large(tmp_path: Path) -> None:
    target = tmp_path / "meta.safetensors"
    with pytest.raises(InvalidArgumentError, match="100,000,000-byte limit"):
        tk.save({"w": torch.ones(1)}, target, metadata={"notes": "x" * limits.MAX_HEADER_SIZE})
    assert not target.exists()


def test_every_header_the_writer_accepts_the_reader_accepts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At the limit itself: the largest header save writes is one load reads."""
    monkeypatch.setattr(limits, "MAX_HEADER_SIZE", 4_000)
    monkeypatch.setattr("torchkeep.format.header.MAX_HEADER_SIZE", 4_000)
    written = 0
    for n in range(1, 200):
        try:
            path = tk.save({"pad": "y" * (n * 40), "w": torch.ones(2)}, tmp_path / f"c{n}.safetensors")
        except InvalidArgumentError:
            break
        assert tk.load(path)["pad"] == "y" * (n * 40)
        written = n
    assert 0 < written < 199


def test_save_refuses_more_dimensions_than_load_reads(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedObjectError, match=r"deep: .* 65 dimensions"):
        tk.save({"deep": torch.ones([1] * 65)}, tmp_path / "d.safetensors")
    back = tk.load(tk.save({"ok": torch.ones([1] * 64)}, tmp_path / "ok.safetensors"))
    assert back["ok"].dim() == 64


@pytest.mark.slow
def test_a_million_small_tensors_are_refused_at_save_not_at_load(tmp_path: Path) -> None:
    tree = {"state": {f"buf.{i}": torch.zeros(1) for i in range(1_000_000)}}
    target = tmp_path / "million.safetensors"
    with pytest.raises(InvalidArgumentError, match=r"1,000,000 tensors.*limit"):
        tk.save(tree, target)
    assert not target.exists()


# -- tensors save cannot write ----------------------------------------------------------------


def test_nested_tensor_is_refused_by_path(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        nt = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
        jagged = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged)
    for t in (nt, jagged):
        with pytest.raises(UnsupportedObjectError, match=r"model\.ragged: .*nested tensor.*unbind"):
            tk.save({"model": {"ragged": t}}, tmp_path / "n.safetensors")
    assert not (tmp_path / "n.safetensors").exists()


class _Wrapper(torch.Tensor):
    """A wrapper subclass (like DTensor or a quantized wrapper): no plain memory behind it."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> _Wrapper:
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype)

    def __init__(self, inner: torch.Tensor) -> None:
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        def unwrap(x: Any) -> Any:
            return x.inner if isinstance(x, _Wrapper) else x

        return func(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in (kwargs or {}).items()})


def test_wrapper_tensor_subclass_is_refused_by_path(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedObjectError, match=r"opt\[0\]: .*tensor subclass .*_Wrapper"):
        tk.save({"opt": [_Wrapper(torch.ones(2))]}, tmp_path / "w.safetensors")


class _Plain(torch.Tensor):
    pass


def test_plain_tensor_subclass_still_saves(tmp_path: Path) -> None:
    t = torch.arange(3.0).as_subclass(_Plain)
    assert torch.equal(tk.load(tk.save({"t": t}, tmp_path / "p.safetensors"))["t"], torch.arange(3.0))


def test_dtensor_is_refused_with_the_distributed_fix(tmp_path: Path) -> None:
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not built")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        dt = distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)])
        model = torch.nn.Linear(2, 4)
        model.weight = torch.nn.Parameter(dt)
        with pytest.raises(UnsupportedObjectError, match=r"model\.weight: .*DTensor.*torchkeep\.distributed"):
            tk.save({"model": model}, tmp_path / "d.safetensors")
        with pytest.raises(UnsupportedObjectError, match="DTensor"):
            tk.save({"w": dt}, tmp_path / "d.safetensors")
    finally:
        dist.destroy_process_group()
    assert not (tmp_path / "d.safetensors").exists()


# -- plain DCP directories --------------------------------------------------------------------


def _dcp_dir(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    import torch.distributed.checkpoint as dcp

    d = tmp_path / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(d), no_dist=True)
    return d


def _edit_metadata(d: Path, edit: Any) -> None:
    """Rewrite ``.metadata`` (written by this test, so unpickling it here is safe) through ``edit(md)``."""
    raw = (d / ".metadata").read_bytes()
    md = pickle.loads(raw)  # our own file from _dcp_dir, never an untrusted one
    edit(md)
    (d / ".metadata").write_bytes(pickle.dumps(md))


def _chunk(offsets: list[int], sizes: list[int]) -> Any:
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    return ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))


def test_dcp_chunks_that_leave_a_gap_are_refused(tmp_path: Path) -> None:
    d = _dcp_dir(tmp_path, {"w": torch.arange(8.0)})

    def grow(md: Any) -> None:  # the tensor is declared 4,096 long; its one chunk covers 8 elements
        m = md.state_dict_metadata["w"]
        m.size = torch.Size([4096])

    _edit_metadata(d, grow)
    with pytest.raises(CorruptCheckpointError, match=r"'w'.*cover 8 of its 4,096 elements"):
        tk.load(d)
    with pytest.raises(CorruptCheckpointError, match="cover"):
        tk.load_into(torch.nn.Module(), d, strict=False, min_matched=0)


def test_dcp_tensor_of_terabytes_is_refused_before_allocating(tmp_path: Path) -> None:
    d = _dcp_dir(tmp_path, {"w": torch.arange(8.0)})

    def huge(md: Any) -> None:
        m = md.state_dict_metadata["w"]
        m.size = torch.Size([2**40])
        m.chunks = [_chunk([0], [2**40])]

    _edit_metadata(d, huge)
    assert sum(p.stat().st_size for p in d.iterdir()) < 8192
    with pytest.raises(CorruptCheckpointError, match="'w'"):
        tk.load(d)


def test_dcp_overlapping_chunks_are_refused(tmp_path: Path) -> None:
    d = _dcp_dir(tmp_path, {"w": torch.arange(8.0).reshape(2, 4)})

    def overlap(md: Any) -> None:  # two chunks over the same row, none over the other
        from torch.distributed.checkpoint.metadata import MetadataIndex

        m = md.state_dict_metadata["w"]
        m.chunks = [_chunk([0, 0], [1, 4]), _chunk([0, 0], [1, 4])]
        info = md.storage_data[MetadataIndex("w", torch.Size([0, 0]))]
        md.storage_data = {MetadataIndex("w", torch.Size([0, 0])): info}

    _edit_metadata(d, overlap)
    with pytest.raises(CorruptCheckpointError, match="'w'"):
        tk.load(d)


def test_dcp_chunk_outside_its_tensor_or_without_data_is_refused(tmp_path: Path) -> None:
    d = _dcp_dir(tmp_path, {"w": torch.arange(8.0), "b": torch.ones(2)})

    def outside(md: Any) -> None:
        md.state_dict_metadata["w"].chunks = [_chunk([4], [8])]

    _edit_metadata(d, outside)
    with pytest.raises(CorruptCheckpointError, match="outside"):
        tk.load(d)

    d2 = _dcp_dir(tmp_path / "2", {"w": torch.arange(8.0)})

    def no_data(md: Any) -> None:
        md.state_dict_metadata["w"].chunks = [_chunk([0], [4]), _chunk([4], [4])]

    _edit_metadata(d2, no_data)
    with pytest.raises(CorruptCheckpointError, match="no data"):
        tk.load(d2)


def test_dcp_chunks_sharing_one_byte_range_are_refused(tmp_path: Path) -> None:
    """Many chunks reading one stored blob would turn a small file into a large allocation."""
    d = _dcp_dir(tmp_path, {"w": torch.arange(4.0)})

    def reuse(md: Any) -> None:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        m = md.state_dict_metadata["w"]
        info = md.storage_data[MetadataIndex("w", torch.Size([0]))]
        m.size = torch.Size([4 * 64])
        m.chunks = [_chunk([4 * i], [4]) for i in range(64)]
        md.storage_data = {MetadataIndex("w", torch.Size([4 * i])): info for i in range(64)}

    _edit_metadata(d, reuse)
    with pytest.raises(CorruptCheckpointError, match="same bytes"):
        tk.load(d)


def test_dcp_sharded_like_fsdp_still_loads(tmp_path: Path) -> None:
    """Chunks that tile a tensor (rows split across ranks) are exactly what DCP writes."""
    d = _dcp_dir(tmp_path, {"w": torch.arange(12.0).reshape(3, 4), "s": torch.tensor(3.0)})
    got = tk.load(d)
    assert torch.equal(got["w"], torch.arange(12.0).reshape(3, 4)) and got["s"].item() == 3.0

"""Reads into device memory through host staging buffers (:mod:`torchkeep.staging`).

The CUDA path preads each chunk into a page-locked buffer of the reading thread, hashes it
there, and copies it to the device while the thread fills its second buffer. Without a GPU, the
same code runs with host destinations routed through the staging buffers (``reader._stage_host``):
chunking, runs of small tensors, hashing, copies out, errors. The CUDA tests run where a GPU is.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cuda_events import Events
from damage import flip

import torchkeep as tk
from torchkeep import reader, staging
from torchkeep.errors import ChecksumMismatchError, CorruptCheckpointError
from torchkeep.format.header import TensorSpec

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def staged(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Host destinations go through Stage buffers of 64 KiB (runs of small tensors: up to 16 KiB);
    returns the byte counts sent out of them."""
    sent: list[int] = []
    send = staging.Stage.send

    def counted(self: staging.Stage, dst: torch.Tensor, src: torch.Tensor) -> None:
        sent.append(src.numel())
        send(self, dst, src)

    monkeypatch.setattr(staging.Stage, "send", counted)
    monkeypatch.setattr(reader, "_stage_host", True)
    monkeypatch.setattr(staging, "STAGE", 64 << 10)
    monkeypatch.setattr(reader, "STAGE", 64 << 10)
    monkeypatch.setattr(reader, "_SMALL", 8 << 10)
    monkeypatch.setattr(reader, "_RUN", 16 << 10)
    return sent


def _tree() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tree = {f"small{i}": torch.randn(i * 37 + 1, generator=g) for i in range(60)}  # runs of adjacent tensors
    tree["mid"] = torch.randn(5_000, generator=g)  # above _SMALL, within one staging buffer
    tree["big"] = torch.randn(100_003, generator=g)  # ~400 KB: many staging buffers, a ragged last chunk
    tree["half"] = torch.randn(3_000, generator=g).to(torch.bfloat16)
    tree["mask"] = torch.rand(999, generator=g) > 0.5
    tree["empty"] = torch.empty(0, 3)
    tree["scalar"] = torch.tensor(7)
    return tree


def test_a_staged_load_is_exact(tmp_path: Path, staged: list[int]) -> None:
    tree = _tree()
    path = tk.save(tree, tmp_path / "c.safetensors")
    got = tk.load(path)
    assert list(got) == list(tree)
    assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in tree.items())
    assert sum(staged) == sum(t.nbytes for t in tree.values())  # every byte went through a staging buffer
    assert max(staged) == 64 << 10  # the big tensor in full buffers


@pytest.mark.usefixtures("staged")
@pytest.mark.parametrize("where", ["run", "big_first_chunk", "big_last_byte"])
def test_a_flipped_bit_in_a_staged_read_is_refused(tmp_path: Path, where: str) -> None:
    tree = _tree()
    path = tk.save(tree, tmp_path / "c.safetensors")
    with tk.open(path) as ck:
        base = ck.header.size
        spec = ck.header.tensors["big" if where.startswith("big") else "small30"]
    flip(path, base + (spec.end - 1 if where == "big_last_byte" else spec.start), 0x04)
    with pytest.raises(ChecksumMismatchError, match="'big'" if where.startswith("big") else "'small30'"):
        tk.load(path)


@pytest.mark.usefixtures("staged")
def test_a_staged_read_cut_short_is_a_typed_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tk.save(_tree(), tmp_path / "c.safetensors")
    original = reader.read_into

    def truncate_then_read(fd: int, offset: int, bufs: Any) -> Any:
        os.truncate(path, path.stat().st_size // 2)
        return original(fd, offset, bufs)

    monkeypatch.setattr(reader, "read_into", truncate_then_read)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        tk.load(path)


@pytest.mark.timeout(60)  # a lost turn would hang the readers: fail instead
@pytest.mark.parametrize("damage", ["none", "first", "middle", "last", "truncated"])
def test_a_large_device_tensor_is_read_by_every_thread_and_hashed_in_order(
    tmp_path: Path, staged: list[int], monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    monkeypatch.setattr(reader, "_SPLIT", 128 << 10)
    monkeypatch.setenv("TORCHKEEP_READ_THREADS", "3")
    flat = torch.randn(300_007, generator=torch.Generator().manual_seed(3))  # 1.2 MB: 19 chunks, ragged last
    path = tk.save({"flat": flat, "small": torch.arange(3)}, tmp_path / "c.safetensors")
    with tk.open(path) as ck:
        spec, base = ck.header.tensors["flat"], ck.header.size
    threads: set[int] = set()
    original = reader.read_into

    def record(fd: int, offset: int, bufs: Any) -> Any:
        threads.add(threading.get_ident())
        time.sleep(0.001)  # every thread gets chunks
        if damage == "truncated" and offset > base + spec.start + spec.nbytes // 2:
            os.truncate(path, base + spec.start + spec.nbytes // 2)
        return original(fd, offset, bufs)

    monkeypatch.setattr(reader, "read_into", record)
    if damage in ("first", "middle", "last"):
        flip(
            path,
            base + {"first": spec.start, "middle": spec.start + spec.nbytes // 2, "last": spec.end - 1}[damage],
            0x04,
        )
    if damage == "none":
        got = tk.load(path)
        assert torch.equal(got["flat"], flat) and len(threads) == 3
        assert sum(staged) == flat.nbytes + 3 * 8
    elif damage == "truncated":
        with pytest.raises(CorruptCheckpointError, match="truncated"):
            tk.load(path)
    else:
        with pytest.raises(ChecksumMismatchError, match="'flat'"):
            tk.load(path)


def _trained(seed: int, device: str, width: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.Linear(2 * width, 3)).to(device)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, width, device=device)).sum().backward()
    opt.step()
    return model, opt


def _restore_then_load_into(tmp_path: Path, device: str, width: int) -> torch.nn.Module:
    """Restore into a model + Adam that stepped on ``device``, then ``load_into`` a fresh model:
    both exact, the restored parameters still at their addresses. Returns the saved model."""
    saved, opt = _trained(0, device, width)
    path = tk.save({"model": saved, "optimizer": opt}, tmp_path / "c.safetensors")
    model, opt2 = _trained(1, device, width)
    ptrs = [p.data_ptr() for p in model.parameters()]
    tk.restore(path, {"model": model, "optimizer": opt2})
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), saved.parameters(), strict=True))
    for s1, s2 in zip(opt2.state.values(), opt.state.values(), strict=True):
        assert all(torch.equal(s1[k], s2[k]) for k in s2)
    other = _trained(2, device, width)[0]
    assert tk.load_into(other, path, key="model").ok
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), saved.parameters(), strict=True))
    return saved


def test_restore_and_load_into_through_staging_write_into_the_live_tensors(tmp_path: Path, staged: list[int]) -> None:
    saved = _restore_then_load_into(tmp_path, "cpu", 300)
    assert sum(staged) >= 4 * sum(p.nbytes for p in saved.parameters())  # restore x3 (Adam), load_into x1


def test_a_staging_buffer_is_refilled_only_after_the_copy_out_of_it_finished(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    st = staging.Stage(torch.device("cpu"))
    events = Events()
    st.cuda, st.events = True, [events(), events()]  # the CUDA bookkeeping with stand-in events
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    dst = torch.zeros(8, dtype=torch.uint8)
    first, view = st.take()
    view[:4] = b"abcd"
    st.send(dst[:4], first[:4])
    st.sent()  # event 1 fences buffer 0
    second, view = st.take()  # buffer 1: nothing in flight, no wait
    assert second.data_ptr() != first.data_ptr() and events.log == [("record", 1)]
    view[:4] = b"efgh"
    st.send(dst[4:], second[:4])
    st.sent()  # event 2 fences buffer 1
    again, _ = st.take()  # buffer 0 again: its copy must have finished first
    assert again.data_ptr() == first.data_ptr() and events.log[-1] == ("wait", 1)
    st.drain()  # waits for what is still in flight (event 2), once
    assert events.log[-1] == ("wait", 2) and events.log.count(("wait", 2)) == 1
    assert bytes(dst.numpy()) == b"abcdefgh"


def test_a_run_of_small_tensors_stays_on_one_device() -> None:
    specs = [TensorSpec(f"t{i}", "F32", (4,), 16 * i, 16 * i + 16) for i in range(5)]
    host = memoryview(bytearray(16))
    cpu, meta = torch.empty(16, dtype=torch.uint8), torch.empty(16, dtype=torch.uint8, device="meta")
    units = reader._units(specs, [host, host, cpu, meta, meta])
    assert sorted(sorted(idx) for _, idx in units) == [[0, 1], [2], [3, 4]]  # adjacent, but split by place


def test_a_failed_copy_to_the_device_fails_the_read(
    tmp_path: Path, staged: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tk.save(_tree(), tmp_path / "c.safetensors")

    def broken(self: staging.Stage) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(staging.Stage, "drain", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        tk.load(path)


@pytest.mark.cuda
@cuda
def test_load_to_cuda_reads_through_staging_exactly(tmp_path: Path) -> None:
    tree = _tree()
    tree["huge"] = torch.randn(3 << 20)  # 12 MiB: several staging buffers
    path = tk.save(tree, tmp_path / "c.safetensors")
    got = tk.load(path, map_location="cuda")
    assert all(got[k].is_cuda and torch.equal(got[k].cpu(), v) for k, v in tree.items())
    arrays = tk.load(tk.save({"w": torch.ones(3), "a": np.arange(4)}, tmp_path / "np.safetensors"), map_location="cuda")
    assert arrays["w"].is_cuda and isinstance(arrays["a"], np.ndarray) and arrays["a"].tolist() == [0, 1, 2, 3]
    with tk.open(path) as ck:
        at = ck.header.size + ck.header.tensors["huge"].end - 1
    flip(path, at, 0x04)
    with pytest.raises(ChecksumMismatchError, match="'huge'"):
        tk.load(path, map_location="cuda")


@pytest.mark.cuda
@cuda
def test_restore_and_load_into_write_straight_into_cuda_tensors(tmp_path: Path) -> None:
    _restore_then_load_into(tmp_path, "cuda", 1000)


def test_a_read_to_a_device_that_is_not_one_is_a_typed_error(tmp_path: Path) -> None:
    path = tk.save({"w": torch.ones(2)}, tmp_path / "c.safetensors")
    with tk.open(path) as ck, pytest.raises(tk.errors.InvalidArgumentError, match="device"):
        ck.read(device="gpu7")
    with tk.open(path) as ck:
        assert torch.equal(ck.read(device="cpu")["w"], torch.ones(2))

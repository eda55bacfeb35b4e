"""Copying loads on a lower floor: restore reads straight into live tensors, every read hashes
its bytes as they land, fresh memory comes from :mod:`torchkeep.alloc`; integrity on every path."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from damage import flip

import torchkeep as tk
from torchkeep import alloc, reader
from torchkeep.errors import ChecksumMismatchError


def _trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 4))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 32)).sum().backward()
    opt.step()
    return model, opt


def _live(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model/{k}": v for k, v in model.state_dict().items()}
    for i, s in enumerate(opt.state.values()):
        out.update({f"opt/{i}/{k}": v for k, v in s.items()})
    return out


def _record_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Addresses of the destinations the caller handed to ``Checkpoint.read(into=...)``."""
    seen: list[int] = []
    original = reader.Checkpoint.read

    def read(self: Any, keys: Any = None, *, into: Any = None, **kw: Any) -> Any:
        seen.extend(t.data_ptr() for t in (into or {}).values())
        return original(self, keys, into=into, **kw)

    monkeypatch.setattr(reader.Checkpoint, "read", read)
    return seen


def _sharded(tmp_path: Path, tree: Any) -> Path:
    src = tk.save(tree, tmp_path / "whole.safetensors")
    index = tk.convert(src, tmp_path / "sh" / "ckpt.safetensors", max_shard_size=4096)
    assert index.name.endswith(".index.json") and len(json.loads(index.read_text())["weight_map"]) > 3
    return index


@pytest.mark.parametrize("sharded", [False, True])
def test_restore_reads_straight_into_the_live_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sharded: bool
) -> None:
    saved, saved_opt = _trained(0)
    tree = {"model": saved, "optimizer": saved_opt, "epoch": 5, "ema": {"w": torch.arange(6.0)}}
    path = _sharded(tmp_path, tree) if sharded else tk.save(tree, tmp_path / "c.safetensors")
    model, opt = _trained(1)
    live = _live(model, opt)
    ptrs = {k: v.data_ptr() for k, v in live.items()}
    objects = {k: id(v) for k, v in live.items()}
    seen = _record_reads(monkeypatch)
    got = tk.restore(path, {"model": model, "optimizer": opt})
    after = _live(model, opt)
    assert {k: v.data_ptr() for k, v in after.items()} == ptrs, "the targets keep their memory"
    assert {k: id(v) for k, v in after.items() if k.startswith("opt/")} == {
        k: i for k, i in objects.items() if k.startswith("opt/")
    }, "the optimizer keeps its state tensors"
    assert set(ptrs.values()) <= set(seen), "every target tensor was the destination of the read itself"
    for k, v in _live(saved, saved_opt).items():
        assert torch.equal(after[k], v), k
    assert got["epoch"] == 5 and torch.equal(got["ema"]["w"], torch.arange(6.0))
    assert got["model"]["0.weight"].data_ptr() == ptrs["model/0.weight"]  # the target's state dict


def test_restore_of_tied_and_viewed_tensors_takes_the_copying_path(tmp_path: Path) -> None:
    base = torch.arange(12.0)
    path = tk.save({"w": {"a": base[:6].view(2, 3), "b": base[6:].view(2, 3)}}, tmp_path / "v.safetensors")

    class Two(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Parameter(torch.zeros(2, 3))
            self.b = torch.nn.Parameter(torch.zeros(2, 3))

    m = Two()
    tk.restore(path, {"w": m})
    assert torch.equal(m.a, base[:6].view(2, 3)) and torch.equal(m.b, base[6:].view(2, 3))


def test_targets_whose_memory_overlaps_are_loaded_in_order_not_read_at_once(tmp_path: Path) -> None:
    """A flat parameter and buffers that are views into it, one far from the other: read at once
    they would race, and one read before the flat parameter's copy would be overwritten by it. All
    take the copying path, in state-dict order, as ``load_state_dict`` would."""

    class Flat(torch.nn.Module):
        def __init__(self, aliased: bool) -> None:
            super().__init__()
            self.flat = torch.nn.Parameter(torch.zeros(400))
            store = self.flat.data if aliased else torch.zeros(400)
            self.register_buffer("x", store[10:20])
            self.register_buffer("y", store[300:360])

    saved = Flat(aliased=False)
    with torch.no_grad():
        saved.flat.copy_(torch.arange(400.0))
        saved.x.fill_(-1.0)
        saved.y.fill_(-2.0)
    path = tk.save({"model": saved}, tmp_path / "c.safetensors")
    target = Flat(aliased=True)
    tk.restore(path, {"model": target})
    expected = Flat(aliased=True)
    expected.load_state_dict(saved.state_dict())
    assert torch.equal(expected.y, torch.full((60,), -2.0))  # flat first, then the views over it
    assert torch.equal(target.flat, expected.flat)
    assert torch.equal(target.x, expected.x) and torch.equal(target.y, expected.y)
    assert target.y.data_ptr() == target.flat.data_ptr() + 1200  # still views of the flat parameter
    into = Flat(aliased=True)
    tk.load_into(into, tk.save(saved.state_dict(), tmp_path / "sd.safetensors"))
    assert all(
        torch.equal(a, b) for a, b in zip(into.state_dict().values(), expected.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize("how", ["load", "restore", "restore_sharded", "load_into"])
def test_a_flipped_bit_is_refused_on_every_copying_path(tmp_path: Path, how: str) -> None:
    saved, saved_opt = _trained(0)
    tree = {"model": saved, "optimizer": saved_opt}
    if how == "restore_sharded":
        index = _sharded(tmp_path, tree)
        shard = sorted(index.parent.glob("*-of-*.safetensors"))[-1]
        flip(shard, -1)
        path = index
    else:
        path = tk.save(tree if how != "load_into" else {"model": saved}, tmp_path / "c.safetensors")
        flip(path, -1)
    model, opt = _trained(1)
    with pytest.raises(ChecksumMismatchError, match="checksum mismatch in tensor") as err:
        if how == "load":
            tk.load(path)
        elif how == "load_into":
            tk.load_into(model, path)
        else:
            tk.restore(path, {"model": model, "optimizer": opt})
    msg = str(err.value)
    if how.startswith("restore"):  # read straight into the targets, checked as read: the error says so
        assert "partly overwritten; restore another checkpoint" in msg
    else:  # load reads into its own memory; load_into checks over a map of the file before it reads
        assert "Nothing was loaded" in msg
        assert how == "load" or not torch.equal(model[0].weight, saved[0].weight)  # the model is untouched


@pytest.mark.parametrize("sharded", [False, True])
def test_load_into_reads_straight_into_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sharded: bool
) -> None:
    saved, _ = _trained(0)
    tree = {"model": saved, "epoch": 1}
    path = _sharded(tmp_path, tree) if sharded else tk.save(tree, tmp_path / "c.safetensors")
    model, _ = _trained(1)
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    seen = _record_reads(monkeypatch)
    report = tk.load_into(model, path)
    assert report.ok
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == ptrs
    assert set(ptrs.values()) <= set(seen), "every parameter was the destination of the read itself"
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in model.state_dict().items())


def test_load_into_with_a_cast_verifies_before_touching_the_model(tmp_path: Path) -> None:
    saved, _ = _trained(0)
    path = tk.save({"model": saved}, tmp_path / "c.safetensors")
    flip(path, -1)
    model = _trained(1)[0].double()  # float64 parameters: every tensor is cast, so none is read in place
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ChecksumMismatchError, match="Nothing was loaded"):
        tk.load_into(model, path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_many_small_tensors_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tree = {f"t{i}": torch.randn(i % 7, 3) if i % 5 else torch.randint(0, 9, (i % 11,)) for i in range(3000)}
    tree["big"] = torch.randn(700_000)  # one large tensor among them (chunked, hashed as read)
    tree["empty"] = torch.empty(0)
    path = tk.save(tree, tmp_path / "w2.safetensors")
    got = tk.load(path)
    assert list(got) == list(tree)
    assert all(torch.equal(got[k], v) for k, v in tree.items())


def test_huge_pages_are_off_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHKEEP_HUGE_PAGES", raising=False)
    monkeypatch.setattr(alloc, "_state", {})
    assert not alloc.huge_pages_on()  # measured slower on the reference VM: opt-in only
    monkeypatch.setenv("TORCHKEEP_HUGE_PAGES", "0")
    monkeypatch.setattr(alloc, "_state", {})
    assert not alloc.huge_pages_on()


def test_huge_page_advice_is_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    before = alloc.huge_pages_on()
    alloc.set_huge_pages(False)
    try:
        t = alloc.empty((alloc.HUGE_FROM // 4 + 3,), torch.float32)
        t.fill_(1.0)
        assert t.sum().item() == t.numel()
        alloc.set_huge_pages(True)  # on only where the kernel offers THP; a no-op elsewhere
        monkeypatch.setattr(alloc, "STALL_S", -1.0)  # every first fault "stalls": advice turns itself off
        u = alloc.empty((alloc.HUGE_FROM,), torch.uint8)
        u.fill_(2)
        assert not alloc.huge_pages_on()
        assert int(u[-1]) == 2
    finally:
        alloc.set_huge_pages(before)


_RSS = """
import resource, sys, torch, torchkeep as tk
def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))
# the high-water mark starts at the parent's size when forked: reset it (Linux >= 4.0), then measure
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS:")
tree = tk.load(sys.argv[1])
print(base, status("VmHWM:"), sum(t.numel() * t.element_size() for t in tree.values()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_peak_rss_of_a_load_stays_near_the_file_size(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tk.save({f"w{i}": torch.randn(1 << 20) for i in range(24)}, tmp_path / "m.safetensors")  # 96 MiB
    out = subprocess.run([sys.executable, "-c", _RSS, str(path)], capture_output=True, text=True, check=True)
    base, peak, nbytes = map(int, out.stdout.split())
    size = path.stat().st_size
    assert nbytes == 96 << 20
    assert peak - base <= 1.05 * size + (16 << 20), (peak - base, size)


class _Holder:
    """An object target (an EMA tracker) whose state holds the same tensor as a module parameter."""

    def __init__(self, w: torch.Tensor | None) -> None:
        self.w = w

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.w = sd["w"].clone()


def test_a_tensor_shared_with_another_target_or_left_untargeted_is_read_into_its_own_memory(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = torch.nn.Linear(4, 4)
    path = tk.save(
        {"model": src, "holder": _Holder(src.weight.detach()), "copy": src.weight.detach()}, tmp_path / "c.safetensors"
    )
    model, holder = torch.nn.Linear(4, 4), _Holder(None)
    got = tk.restore(path, {"model": model, "holder": holder})
    assert torch.equal(model.weight, src.weight) and torch.equal(holder.w, src.weight)  # not the old bytes
    assert got["copy"].data_ptr() != model.weight.data_ptr()  # untargeted: memory of its own
    with torch.no_grad():
        model.weight.add_(1.0)
    assert torch.equal(got["copy"], src.weight.detach())


@pytest.mark.parametrize("how", ["restore", "load_into"])
def test_direct_reads_count_as_in_place_writes_for_autograd(tmp_path: Path, how: str) -> None:
    path = tk.save({"model": torch.nn.Linear(4, 1, bias=False)}, tmp_path / "c.safetensors")
    model = torch.nn.Linear(4, 1, bias=False)
    loss = model(torch.randn(3, 4, requires_grad=True)).sum()  # saves the weight for backward
    before = model.weight._version
    tk.restore(path, {"model": model}) if how == "restore" else tk.load_into(model, path)
    assert model.weight._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("how", ["restore", "load_into"])
def test_wrapper_subclass_parameters_take_the_copying_path(tmp_path: Path, how: str) -> None:
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")
    src = torch.nn.Linear(4, 2, bias=False)
    path = tk.save({"model": src}, tmp_path / "c.safetensors")
    model = torch.nn.Linear(4, 2, bias=False)
    model.weight = torch.nn.Parameter(two_tensor.TwoTensor(torch.zeros(2, 4), torch.zeros(2, 4)))
    tk.restore(path, {"model": model}) if how == "restore" else tk.load_into(model, path)
    assert torch.equal(model.weight.a, src.weight.detach()) and torch.equal(model.weight.b, src.weight.detach())


@pytest.mark.parametrize("how", ["restore", "load_into"])
def test_a_file_truncated_while_read_into_the_targets_says_they_were_partly_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    saved, saved_opt = _trained(0)
    path = tk.save({"model": saved, "optimizer": saved_opt}, tmp_path / "c.safetensors")
    with tk.open(path) as ck:  # load_into reads only the model, at the start of the data
        keep = path.stat().st_size // 2 if how == "restore" else ck.header.size + 16
    original = reader.read_into

    def truncate_then_read(fd: int, offset: int, bufs: Any) -> Any:
        os.truncate(path, keep)
        return original(fd, offset, bufs)

    monkeypatch.setattr(reader, "read_into", truncate_then_read)
    model, opt = _trained(1)
    with pytest.raises(tk.errors.CorruptCheckpointError, match="partly overwritten"):
        tk.restore(path, {"model": model, "optimizer": opt}) if how == "restore" else tk.load_into(model, path)


def _small_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors of 64 KiB and more are read by every thread at once, in 16 KiB chunks (16 KiB and more: alone)."""
    monkeypatch.setattr(reader, "_SMALL", 16 << 10)
    monkeypatch.setattr(reader, "_SPLIT", 64 << 10)
    monkeypatch.setattr(reader, "_CHUNK", 16 << 10)


def test_a_lone_large_tensor_is_read_by_both_threads_and_hashed_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _small_split(monkeypatch)
    torch.manual_seed(0)
    tree = {"flat": torch.randn(1_000_003), "small": torch.arange(5)}  # ragged last chunk
    path = tk.save(tree, tmp_path / "c.safetensors")
    threads: set[int] = set()
    original = reader.read_into

    def record(fd: int, offset: int, bufs: Any) -> Any:
        threads.add(threading.get_ident())
        if len(threads) < 2:
            time.sleep(0.001)  # let the second thread join in before the first reads every chunk alone
        return original(fd, offset, bufs)

    monkeypatch.setattr(reader, "read_into", record)
    got = tk.load(path)
    assert all(torch.equal(got[k], v) for k, v in tree.items())  # and every checksum matched
    assert len(threads) == 2
    model = torch.nn.Linear(1000, 1000)
    src = tk.save({"model": model}, tmp_path / "m.safetensors")
    other = torch.nn.Linear(1000, 1000)
    ptr = other.weight.data_ptr()
    tk.restore(src, {"model": other})
    assert other.weight.data_ptr() == ptr and torch.equal(other.weight, model.weight)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_flipped_bit_in_a_split_tensor_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    _small_split(monkeypatch)
    torch.manual_seed(0)
    path = tk.save({"model": torch.nn.Linear(600, 500, bias=False)}, tmp_path / "c.safetensors")  # 1.2 MB weight
    with tk.open(path) as ck:
        start = ck.header.size
    size = path.stat().st_size
    flip(path, {"first": start, "middle": (start + size) // 2, "last": size - 1}[where], 0x01)
    with pytest.raises(ChecksumMismatchError, match="'model/weight'"):
        tk.load(path)
    with pytest.raises(ChecksumMismatchError, match="partly overwritten"):
        tk.restore(path, {"model": torch.nn.Linear(600, 500, bias=False)})


def test_a_split_tensor_cut_short_is_a_typed_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _small_split(monkeypatch)
    path = tk.save({"flat": torch.randn(300_000)}, tmp_path / "c.safetensors")
    original = reader.read_into
    size = path.stat().st_size

    def truncate_then_read(fd: int, offset: int, bufs: Any) -> Any:
        os.truncate(path, size - 100_000)
        return original(fd, offset, bufs)

    monkeypatch.setattr(reader, "read_into", truncate_then_read)
    with pytest.raises(tk.errors.CorruptCheckpointError, match="truncated"):
        tk.load(path)


def test_read_threads_follow_the_cores_the_ranks_and_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchkeep import runtime

    monkeypatch.delenv("TORCHKEEP_READ_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(runtime, "CPU_MAX", str(tmp_path / "cpu.max"))  # no cgroup limit: no such file
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(32)))
    assert runtime.read_threads() == runtime.MAX_READ_THREADS  # bounded: memory bandwidth, not cores
    (tmp_path / "cpu.max").write_text("max 100000\n")  # a cgroup without a limit
    assert runtime.read_threads() == runtime.MAX_READ_THREADS
    (tmp_path / "cpu.max").write_text("250000 100000\n")  # a container limited to 2.5 CPUs: 3 threads
    assert runtime.read_threads() == 3
    (tmp_path / "cpu.max").unlink()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun's ranks on this machine share its cores
    assert runtime.read_threads() == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0})
    assert runtime.read_threads() == 2  # one reads while the other hashes
    monkeypatch.setenv("TORCHKEEP_READ_THREADS", "3")
    assert runtime.read_threads() == 3
    monkeypatch.setenv("TORCHKEEP_READ_THREADS", "lots")  # not a count: ignored, said once
    with pytest.warns(UserWarning, match="TORCHKEEP_READ_THREADS='lots' is not a count from 1 to 64"):
        assert runtime.read_threads() == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert runtime.read_threads() == 2


@pytest.mark.parametrize("threads", ["1", "5"])
def test_reads_are_exact_on_any_number_of_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: str
) -> None:
    _small_split(monkeypatch)
    monkeypatch.setenv("TORCHKEEP_READ_THREADS", threads)
    torch.manual_seed(0)
    tree = {f"t{i}": torch.randn(i * 997) for i in range(40)}  # small runs, chunked and split tensors
    tree["flat"] = torch.randn(200_003)
    path = tk.save(tree, tmp_path / "c.safetensors")
    seen: set[int] = set()
    original = reader.read_into

    def record(fd: int, offset: int, bufs: Any) -> Any:
        seen.add(threading.get_ident())
        time.sleep(0.0005)  # slow enough that every thread takes work
        return original(fd, offset, bufs)

    monkeypatch.setattr(reader, "read_into", record)
    got = tk.load(path)
    assert all(torch.equal(got[k], v) for k, v in tree.items())
    assert len(seen) == int(threads)
    assert all(torch.equal(t, tree[k]) for k, t in tk.load(path, mmap=True).items())


def test_an_interrupted_read_stops_its_threads_soon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader, "_RUN", 4096)  # many small units
    tree = {f"t{i}": torch.full((1000,), float(i)) for i in range(400)}
    path = tk.save(tree, tmp_path / "c.safetensors")
    reads: list[int] = []
    original = reader.read_into

    def slow(fd: int, offset: int, bufs: Any) -> Any:
        reads.append(offset)
        time.sleep(0.002)
        return original(fd, offset, bufs)

    monkeypatch.setattr(reader, "read_into", slow)
    calls = []

    def interrupted(self: Any, timeout: Any = None) -> Any:  # Ctrl-C arrives while the caller waits
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(concurrent.futures.Future, "exception", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tk.load(path)
    assert calls and len(reads) < 40  # of 400: the readers stopped instead of reading everything


def test_read_into_refuses_a_destination_that_cannot_take_the_bytes(tmp_path: Path) -> None:
    path = tk.save({"x": torch.ones(6, dtype=torch.complex64), "w": torch.arange(6.0)}, tmp_path / "c.safetensors")
    bad = {
        "x": torch.zeros(6, dtype=torch.complex64).conj(),  # a lazy conjugate: its memory is not its values
        "w": torch.zeros(12)[::2],  # not contiguous
    }
    with tk.open(path) as ck:
        for key, dst in [*bad.items(), ("w", torch.zeros(6, dtype=torch.float64)), ("w", torch.zeros(5))]:
            before = dst.clone()
            with pytest.raises(tk.errors.InvalidArgumentError, match=rf"into=.*{key}: .*leave '{key}' out of into="):
                ck.read([key], into={key: dst})
            assert torch.equal(dst, before)  # refused before anything was read
        param = torch.nn.Parameter(torch.zeros(6))  # a parameter that requires grad is fine
        ck.read(["w"], into={"w": param})
        assert torch.equal(param.detach(), torch.arange(6.0))

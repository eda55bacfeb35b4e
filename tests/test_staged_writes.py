"""Saves of CUDA tensors through host staging buffers (:class:`torchkeep.staging.Fetch`).

A checksummed save brings device tensors to the host a piece at a time, through two small
page-locked buffers, hashing and writing each piece while the next one is copied. Without a
GPU, the same code runs with host tensors routed through the buffers (``writer._stage_host``):
pieces that span tensors and tensors that span pieces, mixed host and staged tensors, the
digests, the file's bytes, errors. The CUDA tests run where a GPU is.
"""

from __future__ import annotations

import errno
import os
import random
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import registered_models as rm
import torch
from cuda_events import Event, Events

import torchkeep as tk
from torchkeep import staging, writer
from torchkeep.headers import HeaderFile

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
STAGE = 64 << 10


@pytest.fixture
def staged(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every tensor of a save goes through Fetch buffers of 64 KiB; returns the bytes of each piece fetched."""
    fetched: list[int] = []
    run = staging.Fetch.run

    def counted(
        self: staging.Fetch, srcs: list[torch.Tensor], plan: list[list[staging.Segment]], flat: Any
    ) -> Iterator[Any]:
        for segs, view in zip(plan, run(self, srcs, plan, flat), strict=True):
            fetched.append(sum(n for _, _, n, _ in segs))
            yield view

    monkeypatch.setattr(staging.Fetch, "run", counted)
    monkeypatch.setattr(writer, "_stage_host", True)
    monkeypatch.setattr(staging, "STAGE", STAGE)
    return fetched


def _tree() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    tree: dict[str, Any] = {f"small{i}": torch.randn(i * 37 + 1, generator=g) for i in range(60)}
    tree["big"] = torch.randn(100_003, generator=g)  # ~400 KB: spans many pieces, a ragged last one
    tree["half"] = torch.randn(3_000, generator=g).to(torch.bfloat16)
    tree["mask"] = torch.rand(999, generator=g) > 0.5
    tree["empty"] = torch.empty(0, 3)
    tree["scalar"] = torch.tensor(7)
    tree["transposed"] = torch.randn(300, 200, generator=g).t()  # not contiguous: made so on its device
    tree["conj"] = torch.randn(500, dtype=torch.complex64, generator=g).conj()  # a lazy conjugate: resolved
    tree["meta"] = {"epoch": 3, "name": "run"}
    return tree


def _data(path: Path) -> bytes:
    with HeaderFile(path) as f:
        start = f.header.size
    return path.read_bytes()[start:]


def test_pieces_cover_every_byte_once_in_order() -> None:
    rng = random.Random(0)
    for _ in range(200):
        sizes = [rng.choice([0, 1, 7, 100, 1000]) for _ in range(rng.randint(0, 12))]
        piece = rng.choice([1, 8, 64, 1000])
        plan = staging.pieces(sizes, piece)
        seen: list[tuple[int, int]] = []
        for segs in plan:
            assert 0 < sum(n for _, _, n, _ in segs) <= piece
            at = 0
            for i, lo, n, off in segs:
                assert off == at and n > 0  # back to back in the buffer
                at += n
                seen += [(i, b) for b in range(lo, lo + n)]
        assert seen == [(i, b) for i, n in enumerate(sizes) for b in range(n)]
        assert all(sum(n for _, _, n, _ in segs) == piece for segs in plan[:-1])  # only the last is short


def test_a_staged_save_writes_the_same_file_as_a_host_save(tmp_path: Path, staged: list[int]) -> None:
    tree = _tree()
    path = tk.save(tree, tmp_path / "staged.safetensors")
    total = sum(t.numel() * t.element_size() for k, t in tree.items() if isinstance(t, torch.Tensor))
    assert sum(staged) == total and max(staged) == STAGE and len(staged) == -(-total // STAGE)
    writer._stage_host = False  # the fixture's monkeypatch restores it after the test either way
    plain = tk.save(tree, tmp_path / "plain.safetensors")
    assert _data(path) == _data(plain)
    with tk.open(path) as a, tk.open(plain) as b:
        assert a.header.checksums == b.header.checksums
    got = tk.load(path)  # verified against the checksums written beside the staged pieces
    for k, v in tree.items():
        if isinstance(v, torch.Tensor):
            assert got[k].dtype == v.dtype and torch.equal(got[k], v.resolve_conj()), k
    assert got["meta"] == {"epoch": 3, "name": "run"}


def test_host_and_staged_tensors_mix_in_one_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Staged tensors between host ones: each kind is written at its own offsets (a CUDA model's
    optimizer keeps its ``step`` counters on the CPU)."""
    tree = _tree()
    monkeypatch.setattr(staging, "STAGE", STAGE)
    monkeypatch.setattr(writer, "_staged", lambda t: t.dtype is torch.float32 and t.numel() % 2 == 1)
    assert {writer._staged(t) for t in tree.values() if isinstance(t, torch.Tensor)} == {True, False}
    path = tk.save(tree, tmp_path / "mixed.safetensors")
    monkeypatch.setattr(writer, "_staged", lambda t: False)
    assert _data(path) == _data(tk.save(tree, tmp_path / "plain.safetensors"))
    got = tk.load(path)
    assert all(torch.equal(got[k], v.resolve_conj()) for k, v in tree.items() if isinstance(v, torch.Tensor))


def test_staged_saves_from_the_manager_and_to_a_file_object(tmp_path: Path, staged: list[int]) -> None:
    model = torch.nn.Linear(300, 200)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 300)).sum().backward()
    opt.step()
    manager = tk.CheckpointManager(tmp_path / "run")
    manager.save({"model": model, "optimizer": opt}, step=1)
    assert sum(staged) > 300 * 200 * 4 * 3  # weights, exp_avg, exp_avg_sq
    fresh = torch.nn.Linear(300, 200)
    fresh_opt = torch.optim.Adam(fresh.parameters())
    manager.restore({"model": fresh, "optimizer": fresh_opt})
    assert torch.equal(fresh.weight, model.weight)
    assert torch.equal(fresh_opt.state[fresh.weight]["exp_avg"], opt.state[model.weight]["exp_avg"])
    with open(tmp_path / "stream.safetensors", "wb") as f:  # a stream: whole host copies, not staged
        tk.save({"w": model.weight}, f)
    assert torch.equal(tk.load(tmp_path / "stream.safetensors")["w"], model.weight.detach())


def test_model_files_and_shard_sets_are_staged_too(
    tmp_path: Path, staged: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    whole: list[int] = []  # tensors copied to the host whole, before any staging
    host_copies = writer.host_copies
    monkeypatch.setattr(writer, "host_copies", lambda ts: whole.append(len(ts)) or host_copies(ts))
    torch.manual_seed(0)
    model = rm.TinyNet(sizes=(64, 300, 8), opts={"act": "tanh"}, names=("x",)).eval()
    x = torch.randn(3, 64)
    one = tk.save_model(model, tmp_path / "m.safetensors")
    assert sum(staged) == sum(t.nbytes for t in model.state_dict().values())
    shards = tk.save_model(model, f"{tmp_path / 'sharded'}/", max_shard_size=40_000)
    assert len(list(shards.glob("model-*.safetensors"))) > 1
    assert sum(staged) == 2 * sum(t.nbytes for t in model.state_dict().values())
    for path in (one, shards):
        assert torch.equal(tk.load_model(path)(x), model(x))
    assert whole == []


def test_a_failed_copy_from_the_device_leaves_the_old_file(
    tmp_path: Path, staged: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tk.save({"w": torch.ones(10)}, tmp_path / "c.safetensors")
    before = path.read_bytes()
    run = staging.Fetch.run

    def broken(
        self: staging.Fetch, srcs: list[torch.Tensor], plan: list[list[staging.Segment]], flat: Any
    ) -> Iterator[Any]:
        gen = run(self, srcs, plan, flat)
        yield next(gen)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(staging.Fetch, "run", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        tk.save(_tree(), path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["c.safetensors"]  # no temporary file left behind


def test_a_piece_is_handed_out_after_its_copy_and_refilled_after_its_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA bookkeeping, with stand-in events: piece j+1 is issued before piece j is handed
    out, each piece's event is waited for before its bytes are, and an early stop waits for what
    is still in flight."""
    fetch = staging.Fetch(torch.device("cpu"))
    fetch.cuda = True
    events = Events()
    monkeypatch.setattr(torch.cuda, "Event", events)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    src = torch.arange(3 * staging.STAGE // 2, dtype=torch.int64).to(torch.uint8)  # a piece and a half
    plan = staging.pieces([src.numel()])
    gen = fetch.run([src], plan, staging.device_bytes)
    first = next(gen)
    assert events.log == [("record", 1), ("record", 2), ("wait", 1)]  # both issued; only the first waited for
    assert bytes(first[:4]) == bytes(src[:4].numpy())
    second = next(gen)
    assert events.log[-1] == ("wait", 2) and bytes(second[:4]) == bytes(src[staging.STAGE : staging.STAGE + 4].numpy())
    with pytest.raises(StopIteration):
        next(gen)
    events.log.clear()
    gen = fetch.run([src], plan, staging.device_bytes)
    next(gen)
    gen.close()  # the consumer failed: the copy of the second piece is still in flight
    assert events.log == [("record", 3), ("record", 4), ("wait", 3), ("wait", 4)]


def test_a_failed_wait_still_waits_for_every_copy_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    fetch = staging.Fetch(torch.device("cpu"))
    fetch.cuda = True
    events = Events()

    class Failing(Event):
        def synchronize(self) -> None:
            super().synchronize()
            if self.n == 1:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "Event", lambda blocking=False: Failing(events, events(blocking).n))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    src = torch.zeros(3 * staging.STAGE // 2, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        list(fetch.run([src], staging.pieces([src.numel()]), staging.device_bytes))
    assert ("wait", 2) in events.log  # the second piece's copy, issued before the first was waited for


def test_contiguous_copies_live_only_while_their_pieces_are_copied(staged: list[int]) -> None:
    """A non-contiguous tensor gets a contiguous copy on its device to send from: made when its
    first piece is copied and dropped after its last, not all of them for the whole save."""
    made: list[weakref.ref[torch.Tensor]] = []

    def flat(t: torch.Tensor) -> torch.Tensor:
        out = staging.device_bytes(t.contiguous())
        made.append(weakref.ref(out))
        return out

    srcs = [torch.randn(96, 128).t() for _ in range(6)]  # 48 KiB each: 3 in 2 staging buffers of 64 KiB
    plan = staging.pieces([t.nbytes for t in srcs])
    alive = []
    got = b""
    for view in staging.Fetch(torch.device("cpu")).run(srcs, plan, flat):
        alive.append(sum(r() is not None for r in made))
        got += bytes(view[: sum(n for _, _, n, _ in plan[len(alive) - 1])])
    assert len(made) == 6 and max(alive) <= 2  # not 6
    assert got == b"".join(bytes(staging.device_bytes(t.contiguous()).numpy()) for t in srcs)


def test_a_full_disk_during_a_staged_save_says_what_the_whole_file_needs(
    tmp_path: Path, staged: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = {f"w{i}": torch.randn(64 << 10) for i in range(4)}  # 1 MiB, in 16 pieces
    pwritev = os.pwritev
    written = [0]

    def full_after_256k(fd: int, buffers: list[Any], offset: int) -> int:
        if written[0] >= 256 << 10:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = pwritev(fd, buffers, offset)
        written[0] += n
        return n

    monkeypatch.setattr(os, "pwritev", full_after_256k)
    with pytest.raises(OSError) as info:
        tk.save(tree, tmp_path / "c.safetensors")
    assert info.value.errno == errno.ENOSPC
    assert getattr(info.value, "needed", 0) >= 1 << 20  # the file, not the piece that failed (~64 KiB)
    assert list(tmp_path.iterdir()) == []


def test_whole_host_copies_wait_for_every_gpu_they_copy_from(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device-to-host copy runs on its source device's stream: a model spread over two GPUs
    needs both waited for, not only the current one (stand-in tensors and devices, no GPU)."""

    class OnGpu:
        is_cuda = True

        def __init__(self, index: int) -> None:
            self.device = torch.device("cuda", index)

    waited: list[Any] = []
    monkeypatch.setattr(writer, "_cpu_bytes", lambda t: t)  # the copies themselves are not the point here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    tensors: dict[str, Any] = {"a": OnGpu(0), "b": OnGpu(1), "c": OnGpu(1), "d": torch.ones(2)}
    writer.host_copies(tensors)
    assert sorted(d.index for d in waited) == [0, 1]


@pytest.mark.cuda
@cuda
def test_a_cuda_save_holds_two_staging_buffers_of_pinned_memory(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.Linear(2048, 2048)).cuda()  # 32 MiB
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 2048, device="cuda")).sum().backward()
    opt.step()
    torch.cuda.synchronize()
    stats = hasattr(torch.cuda, "reset_peak_host_memory_stats")  # where this torch counts pinned memory
    if stats:
        torch.cuda.reset_peak_host_memory_stats()
    path = tk.save({"model": model, "optimizer": opt}, tmp_path / "c.safetensors")
    if stats:
        peak = torch.cuda.host_memory_stats().get("active_bytes.peak", 0)
        assert peak <= 2 * staging.STAGE + (1 << 20), peak  # not a host copy of the 96 MiB saved
    got = tk.load(path)
    for k, v in model.state_dict().items():
        assert torch.equal(got["model"][k], v.cpu()), k
    fresh = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.Linear(2048, 2048)).cuda()
    fresh_opt = torch.optim.Adam(fresh.parameters())
    tk.restore(path, {"model": fresh, "optimizer": fresh_opt})
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters(), strict=True))

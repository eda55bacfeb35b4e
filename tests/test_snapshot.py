"""Asynchronous saves: the snapshot is consistent, one write in flight, errors surface as themselves."""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import pytest
import torch

import torchkeep as tk
from torchkeep.snapshot import AsyncWriter
from torchkeep.writer import save_flat


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))


def test_mutations_after_submit_never_reach_the_file(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_avg = opt.state_dict()["state"][0]["exp_avg"].clone()
    gate = threading.Event()

    def slow_write(flat: tk.tree.Flat) -> Path:
        gate.wait(5)  # the write starts only after the loop has changed everything
        return save_flat(flat, tmp_path / "a.safetensors")

    writer = AsyncWriter()
    writer.submit({"model": model, "optimizer": opt}, slow_write)
    assert writer.busy
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    gate.set()
    writer.close()
    state = tk.load(tmp_path / "a.safetensors")
    for k, v in expected.items():
        assert torch.equal(state["model"][k], v), k
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], expected_avg)


def test_one_write_in_flight(tmp_path: Path) -> None:
    order: list[str] = []
    gate = threading.Event()

    def first(flat: tk.tree.Flat) -> None:
        gate.wait(5)
        order.append("first done")

    def second(flat: tk.tree.Flat) -> None:
        order.append("second")

    writer = AsyncWriter()
    writer.submit({"w": torch.ones(3)}, first)
    t = threading.Thread(target=writer.submit, args=({"w": torch.zeros(3)}, second))
    t.start()
    t.join(0.2)
    assert t.is_alive()  # the second submit waits for the first write
    gate.set()
    t.join(5)
    writer.close()
    assert order == ["first done", "second"]


def test_background_error_surfaces_as_itself(tmp_path: Path) -> None:
    def full_disk(flat: tk.tree.Flat) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    writer = AsyncWriter()
    writer.submit({"w": torch.ones(2)}, full_disk)
    with pytest.raises(OSError) as info:
        writer.submit({"w": torch.ones(2)}, lambda flat: None)
    assert info.value.errno == errno.ENOSPC
    writer.submit({"w": torch.ones(2)}, full_disk)
    with pytest.raises(OSError):
        writer.wait()
    writer.close()  # the error was raised once; nothing left


def test_done_runs_only_after_a_successful_write(tmp_path: Path) -> None:
    committed: list[Path] = []
    with AsyncWriter() as writer:
        writer.submit({"w": torch.arange(4)}, lambda f: save_flat(f, tmp_path / "x.safetensors"), done=committed.append)
    assert committed == [tmp_path / "x.safetensors"]
    assert torch.equal(tk.load(committed[0])["w"], torch.arange(4))
    with pytest.raises(RuntimeError), AsyncWriter() as writer:
        writer.submit(
            {"w": torch.ones(1)}, lambda f: (_ for _ in ()).throw(RuntimeError("boom")), done=committed.append
        )
        writer.wait()
    assert len(committed) == 1


def test_buffers_are_reused_between_snapshots(tmp_path: Path) -> None:
    writer = AsyncWriter()
    model = _model()
    seen: list[int] = []
    writer.submit({"model": model}, lambda f: seen.append(f.tensors["model/0.weight"].data_ptr()))
    writer.submit({"model": model}, lambda f: seen.append(f.tensors["model/0.weight"].data_ptr()))
    writer.close()
    assert len(seen) == 2 and seen[0] == seen[1]

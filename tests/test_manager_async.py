"""CheckpointManager(async_save=True): consistent snapshots, errors surface, retention after commit."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

import torchkeep as tk
import torchkeep.writer
from torchkeep.errors import InsufficientSpaceError


def _state() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 32)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt}


def test_mutating_after_save_never_changes_the_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = _state()
    model = state["model"]
    expected = [{k: v.clone() for k, v in model.state_dict().items()}]
    gate = threading.Event()
    real = torchkeep.writer.write_checksummed  # what every checkpoint file is written by

    held: list[bool] = []

    def slow(*args, **kwargs):  # the write starts only after the loop has moved on
        held.append(gate.wait(5))
        return real(*args, **kwargs)

    monkeypatch.setattr(torchkeep.writer, "write_checksummed", slow)
    with tk.CheckpointManager(tmp_path / "run", keep_last=2, async_save=True) as mgr:
        mgr.save(state, step=0)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-3.0)
        gate.set()
        expected.append({k: v.clone() for k, v in model.state_dict().items()})
        mgr.save(state, step=1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(7.0)
    assert held and held[0]  # the first write really waited for the mutation
    with tk.CheckpointManager(tmp_path / "run") as mgr:
        infos = mgr.checkpoints()
        assert [i.step for i in infos] == [0, 1]
        for info, want in zip(infos, expected, strict=True):
            got = tk.load(info.path)["model"]
            for k, v in want.items():
                assert torch.equal(got[k], v), (info.step, k)


def test_background_error_surfaces_on_the_next_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = tk.CheckpointManager(tmp_path / "run", keep_last=1, async_save=True)
    state = _state()
    first = mgr.save(state, step=0)
    mgr.wait()

    class Full:
        f_bavail, f_frsize = 1, 1

    monkeypatch.setattr(os, "statvfs", lambda path: Full())
    mgr.save(state, step=1)  # returns: the space check runs in the background
    monkeypatch.undo()
    with pytest.raises(InsufficientSpaceError):
        mgr.save(state, step=2)
    # nothing was deleted for the failed save: the first checkpoint is still there and restores
    assert [i.step for i in mgr.checkpoints()] == [0]
    assert first.path.exists()
    assert mgr.restore(_state()).step == 0
    mgr.close()


def test_close_waits_and_retention_runs_after_commit(tmp_path: Path) -> None:
    state = _state()
    with tk.CheckpointManager(tmp_path / "run", keep_last=2, async_save=True) as mgr:
        for step in range(5):
            mgr.save(state, step=step, metrics={"loss": 1.0 / (step + 1)})
    files = sorted(p.name for p in (tmp_path / "run").glob("*.safetensors") if not p.is_symlink())
    assert files == ["ckpt_000003.safetensors", "ckpt_000004.safetensors"]
    with tk.CheckpointManager(tmp_path / "run") as mgr:
        assert mgr.latest().step == 4 and mgr.latest().size > 0

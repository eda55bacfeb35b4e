"""tk.save / tk.load on file objects (io.BytesIO, open files), and weights_only= for migration from torch.load."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

import torchkeep as tk
from torchkeep.errors import ChecksumMismatchError, InvalidArgumentError, UnsupportedSourceError


def _state() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    return {"model": model, "epoch": 3, "cfg": {"lr": 0.1}}


def test_bytesio_round_trip_is_the_same_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    state = _state()
    buf = io.BytesIO()
    assert tk.save(state, buf) is buf
    on_disk = tk.save(state, tmp_path / "c.safetensors")
    assert buf.getvalue() == on_disk.read_bytes()  # byte for byte what a path save writes
    buf.seek(0)
    back = tk.load(buf)
    assert back["epoch"] == 3 and back["cfg"] == {"lr": 0.1}
    for k, v in state["model"].state_dict().items():
        assert torch.equal(back["model"][k], v)


def test_open_files_both_ways(tmp_path: Path) -> None:
    path = tmp_path / "f.safetensors"
    with open(path, "wb") as f:
        tk.save({"w": torch.arange(5)}, f)
    assert tk.verify(path)["ok"]
    with open(path, "rb") as f:
        assert torch.equal(tk.load(f)["w"], torch.arange(5))


def test_a_damaged_stream_is_refused_and_a_pickle_stream_is_not_unpickled() -> None:
    buf = io.BytesIO()
    tk.save({"w": torch.ones(4)}, buf)
    raw = bytearray(buf.getvalue())
    raw[-1] ^= 0x01
    with pytest.raises(ChecksumMismatchError):
        tk.load(io.BytesIO(bytes(raw)))
    legacy = io.BytesIO()
    torch.save({"w": torch.ones(1)}, legacy)
    legacy.seek(0)
    with pytest.raises(UnsupportedSourceError, match="write the bytes to a file"):
        tk.load(legacy)


def test_weights_only_is_accepted_and_false_alone_is_refused(tmp_path: Path) -> None:
    old = tmp_path / "old.pt"
    torch.save({"w": torch.ones(2)}, old)
    assert torch.equal(tk.load(old, weights_only=True)["w"], torch.ones(2))
    with pytest.raises(InvalidArgumentError, match="trust_pickle=True") as err:
        tk.load(old, weights_only=False)
    assert isinstance(err.value, ValueError)
    assert torch.equal(tk.load(old, weights_only=False, trust_pickle=True)["w"], torch.ones(2))

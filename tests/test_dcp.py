"""torch.distributed.checkpoint directories as sources: read without running their pickle, only when complete."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import torchkeep as tk
from torchkeep.errors import CorruptCheckpointError, MissingShardError, UnsafeCheckpointError


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))


def _save_dcp(state: dict, directory: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(directory), no_dist=True)
    return directory


def test_load_into_reads_a_dcp_directory(tmp_path: Path) -> None:
    src = _model()
    d = _save_dcp({"model": src.state_dict(), "epoch": 3}, tmp_path / "ckpt")
    dst = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    report = tk.load_into(dst, d)
    assert report.ok
    assert any(r[0] == "model." for r in report.renamed), report.renamed  # DCP flattens {"model": sd}
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_load_returns_the_flat_tensors(tmp_path: Path) -> None:
    src = _model()
    d = _save_dcp({"model": src.state_dict()}, tmp_path / "ckpt")
    flat = tk.load(d)
    assert set(flat) == {f"model.{k}" for k in src.state_dict()}
    assert torch.equal(flat["model.0.weight"], src[0].weight.detach())


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.makedirs, (str(self.marker),))


def test_malicious_metadata_is_refused_without_running(tmp_path: Path) -> None:
    d = _save_dcp({"w": torch.ones(2)}, tmp_path / "ckpt")
    marker = tmp_path / "pwned"
    (d / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    assert pickle.loads(pickle.dumps(_Payload(tmp_path / "control"))) is None  # the payload is live
    assert (tmp_path / "control").exists()
    with pytest.raises(UnsafeCheckpointError, match=r"os\.makedirs"):
        tk.load(d)
    with pytest.raises(UnsafeCheckpointError):
        tk.load_into(torch.nn.Linear(2, 2), d)
    assert not marker.exists()


def test_missing_data_file_is_named(tmp_path: Path) -> None:
    d = _save_dcp({"w": torch.ones(2)}, tmp_path / "ckpt")
    data = next(d.glob("*.distcp"))
    data.unlink()
    with pytest.raises(MissingShardError) as info:
        tk.load(d)
    assert info.value.missing == [data.name]


def test_truncated_data_file_is_refused(tmp_path: Path) -> None:
    d = _save_dcp({"w": torch.ones(1000)}, tmp_path / "ckpt")
    data = next(d.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError, match="shorter than the metadata"):
        tk.load(d)

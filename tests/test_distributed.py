"""Sharded save/restore across processes (gloo on CPU): resharding 2 -> 1, 2 -> 4, 1 -> 2, FSDP2 and DDP,
per-rank RNG, async snapshots and errors, and a rank killed mid-save."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

import torchkeep as tk
import torchkeep.distributed as tkd
from torchkeep.errors import CheckpointNotFoundError, CorruptCheckpointError, UnverifiedCheckpointError

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from compare import assert_bitwise_state
from dist_launch import launch
from dist_worker import full, net

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _trained():
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.1)
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        model(torch.randn(5, 8, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-rank job: saves FSDP2 and DDP checkpoints, restores at 2 (and 1 -> 2), async checks."""
    out = tmp_path_factory.mktemp("dist")
    model, opt = _trained()
    tkd.save({"model": model, "optimizer": opt}, out / "ws1")
    tk.save(full(model, opt), out / "ref-ws1.safetensors")
    results = launch("save2", 2, out, timeout=150)
    for code, tail in results:
        assert code == 0, tail
    return out


def _checks(out: Path, scenario: str, rank: int) -> dict:
    return json.loads((out / f"checks-{scenario}-{rank}.json").read_text())


@pytest.mark.timeout(200)
@pytest.mark.parametrize("kind", ["fsdp", "ddp"])
def test_same_world_size_is_bitwise_and_restores_each_ranks_rng(saved: Path, kind: str) -> None:
    assert_bitwise_state(tk.load(saved / f"ref-{kind}.safetensors"), tk.load(saved / f"same-{kind}.safetensors"))
    for rank in (0, 1):
        c = _checks(saved, "save2", rank)
        assert c[f"{kind}-after-restore"] == c[f"{kind}-after-save"]  # the rank's own RNG stream resumed
        assert c[f"{kind}-epoch"] == 5
    assert _checks(saved, "save2", 0)[f"{kind}-after-save"] != _checks(saved, "save2", 1)[f"{kind}-after-save"]


@pytest.mark.timeout(200)
@pytest.mark.parametrize("kind", ["fsdp", "ddp"])
def test_saved_at_2_restores_at_1(saved: Path, kind: str) -> None:
    model = net()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    with pytest.warns(tkd.RankStateWarning, match="saved on 2 ranks, restored on 1"):
        got = tkd.restore(saved / kind, {"model": model, "optimizer": opt, "rng": tk.RNGState()})
    assert got["epoch"] == 5 and got["config"] == {"lr": 0.01}
    assert_bitwise_state(tk.load(saved / f"ref-{kind}.safetensors"), full(model, opt))
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias", "3.weight", "3.bias"]


@pytest.mark.timeout(200)
def test_saved_at_1_restores_at_2_into_fsdp_shards(saved: Path) -> None:
    assert_bitwise_state(tk.load(saved / "ref-ws1.safetensors"), tk.load(saved / "from1.safetensors"))


@pytest.mark.timeout(200)
def test_async_save_snapshots_at_return_and_errors_propagate(saved: Path) -> None:
    for rank in (0, 1):
        c = _checks(saved, "save2", rank)
        assert c["async-result"] == str(saved / "async")
        assert c["async-error"] is not None and "DistributedSaveError" in c["async-error"], c
        assert "rank 1" in c["async-error"] and "disk on fire" in c["async-error"]
        assert c["broken-exists"] is False
    assert _checks(saved, "save2", 0)["async-equal"] is True
    assert not list(saved.glob(".broken.tmp-*"))  # rank 0 cleaned up the failed save


@pytest.mark.timeout(300)
def test_saved_at_2_restores_at_4(saved: Path) -> None:
    for code, tail in launch("restore4", 4, saved, timeout=240):
        assert code == 0, tail
    for kind in ("fsdp", "ddp"):
        assert_bitwise_state(tk.load(saved / f"ref-{kind}.safetensors"), tk.load(saved / f"at4-{kind}.safetensors"))
        for rank in range(4):
            c = _checks(saved, "restore4", rank)
            assert c[f"{kind}-epoch"] == 5
            assert len(c[f"{kind}-warned"]) == 1 and "saved on 2 ranks, restored on 4" in c[f"{kind}-warned"][0]


@pytest.mark.timeout(120)
def test_a_rank_killed_mid_save_leaves_no_checkpoint(tmp_path: Path) -> None:
    results = launch("killed", 2, tmp_path, timeout=60)
    assert results[1][0] == -9  # rank 1 died by SIGKILL after writing its shard
    assert results[0][0] not in (0, None), results[0][1]  # rank 0 noticed the dead peer by itself; no commit
    assert not (tmp_path / "ckpt").exists()
    with pytest.raises(CheckpointNotFoundError):
        tkd.restore(tmp_path / "ckpt", {"model": net()})
    for leftover in tmp_path.glob(".ckpt.tmp-*"):  # hidden, and never accepted as a checkpoint
        assert not (leftover / "torchkeep-manifest.json").exists()
        with pytest.raises((UnverifiedCheckpointError, CorruptCheckpointError)):
            tkd.restore(leftover, {"model": net()})


@pytest.mark.timeout(60)
def test_rank_state_policy_error_and_reuse(saved: Path) -> None:
    model = net()
    with pytest.raises(tk.errors.KeyMismatchError, match="per_rank_policy"):
        tkd.restore(saved / "fsdp", {"model": model, "rng": tk.RNGState()}, per_rank_policy="error")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tkd.restore(saved / "fsdp", {"model": model, "rng": tk.RNGState()}, per_rank_policy="reuse")
    assert any("takes saved rank 0" in str(w.message) for w in caught)
    assert torch.rand(3).tolist() == _checks(saved, "save2", 0)["fsdp-after-save"]

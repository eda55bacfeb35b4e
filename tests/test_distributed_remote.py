"""Sharded checkpoints on object storage: 2 gloo ranks save FSDP2 + Adam to a local S3-compatible server,
restore on 2 ranks and on 1 process bitwise; uncommitted prefixes and damaged objects are refused."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

import torchkeep as tk
import torchkeep.distributed as tkd
from torchkeep.distributed.remote import Store
from torchkeep.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FileChecksumError,
    UnverifiedCheckpointError,
)

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from compare import assert_bitwise_state
from dist_launch import launch
from dist_worker import net
from s3server import S3Server

HELPERS = Path(__file__).parent / "helpers"

pytest.importorskip("s3fs")
pytest.importorskip("moto")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
WORKER = HELPERS / "dist_remote_worker.py"


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        yield server


@pytest.fixture(scope="module")
def job(s3, tmp_path_factory):
    """One 2-rank job (save, same-size restore, refusals, async), checked by several tests."""
    out = tmp_path_factory.mktemp("remote2")
    url = s3.bucket("ckpts") + "/run"
    results = launch("save2", 2, out, timeout=240, worker=WORKER, args=[url], env=s3.env)
    for rank, (code, tail) in enumerate(results):
        assert code == 0, f"rank {rank} exited {code}:\n{tail}"
    checks = [json.loads((out / f"checks-save2-{r}.json").read_text()) for r in range(2)]
    return out, url, checks


def _copy(s3: S3Server, src: str, dst: str, *, skip: tuple[str, ...] = (), flip: str = "") -> None:
    """Copy a checkpoint prefix object by object, leaving out ``skip`` and flipping one bit of ``flip``."""
    a, b = Store(src, s3.options), Store(dst, s3.options)
    for name in a.sizes():
        if name in skip:
            continue
        raw = bytearray(a.read(name) or b"")
        if name == flip:
            raw[len(raw) // 2] ^= 1
        b.fs.pipe_file(b.p(name), bytes(raw))


@pytest.mark.timeout(300)
def test_two_ranks_save_and_restore_bitwise(job) -> None:
    out, url, checks = job
    assert [c["saved"] for c in checks] == [f"{url}/step-1"] * 2
    ref, same = tk.load(out / "ref.safetensors"), tk.load(out / "same.safetensors")
    assert_bitwise_state(ref, same)
    for c in checks:
        assert c["epoch"] == 5 and c["config"] == {"lr": 0.01}
        assert c["after-restore"] == c["after-save"]  # per-rank RNG came back on each rank
    assert checks[0]["after-save"] != checks[1]["after-save"]


@pytest.mark.timeout(300)
def test_layout_on_the_store(job, s3) -> None:
    _, url, _ = job
    sizes = Store(f"{url}/step-1", s3.options).sizes()
    assert set(sizes) == {
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "rank-00000.safetensors",
        "rank-00001.safetensors",
        "torchkeep-manifest.json",
        "tree.safetensors",
    }
    manifest = json.loads(Store(f"{url}/step-1", s3.options).read("torchkeep-manifest.json") or b"")
    assert manifest["world_size"] == 2
    assert {k: v["bytes"] for k, v in manifest["files"].items()} == {
        k: v for k, v in sizes.items() if k != "torchkeep-manifest.json"
    }
    assert tkd.is_torchkeep_dcp(f"{url}/step-1", storage_options=s3.options)
    assert not tkd.is_torchkeep_dcp(f"{url}/nothing", storage_options=s3.options)


@pytest.mark.timeout(300)
def test_restore_on_one_process_bitwise(job, s3) -> None:
    out, url, _ = job
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    got = tkd.restore(f"{url}/step-1", {"model": model, "optimizer": opt}, storage_options=s3.options)
    assert got["epoch"] == 5
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    assert_bitwise_state(
        tk.load(out / "ref.safetensors"),
        {"model": dict(model.state_dict()), "optimizer": get_optimizer_state_dict(model, opt)},
    )
    tree = tkd.load_tree(f"{url}/step-1", storage_options=s3.options)
    assert torch.equal(tree["model"]["0.weight"], model[0].weight.detach())


@pytest.mark.timeout(300)
def test_committed_prefix_is_never_rewritten(job, s3) -> None:
    _, url, checks = job
    assert checks[0]["again"].startswith("CheckpointExistsError")
    assert "CheckpointExistsError" in checks[1]["again"]  # rank 1 hears rank 0's refusal
    with pytest.raises(CheckpointExistsError, match=r"step-1: a committed checkpoint already exists"):
        tkd.save({"w": torch.ones(1)}, f"{url}/step-1", storage_options=s3.options)
    got = tkd.restore(f"{url}/step-1", {}, storage_options=s3.options)  # unchanged
    assert got["epoch"] == 5


@pytest.mark.timeout(300)
def test_a_failed_rank_commits_nothing_and_async_snapshots(job) -> None:
    _, url, checks = job
    for c in checks:  # every rank raises, naming the rank that failed and why
        assert c["broken"].startswith("DistributedSaveError") and "rank 1: OSError: bucket on fire" in c["broken"]
    assert checks[0]["broken-left"] == {} and checks[1]["broken-left"] == {}
    assert [c["async"] for c in checks] == [f"{url}/step-3"] * 2
    assert checks[0]["async-equal"] is True


@pytest.mark.timeout(300)
def test_prefix_without_manifest_is_refused(job, s3) -> None:
    _, url, _ = job
    _copy(s3, f"{url}/step-1", f"{url}/no-manifest", skip=("torchkeep-manifest.json",))
    with pytest.raises(UnverifiedCheckpointError, match=r"no-manifest: refused.*killed before its commit.*pickle"):
        tkd.restore(f"{url}/no-manifest", {"model": net()}, storage_options=s3.options)
    assert not tkd.is_torchkeep_dcp(f"{url}/no-manifest", storage_options=s3.options)
    with pytest.raises(CheckpointNotFoundError):
        tkd.restore(f"{url}/never-written", {}, storage_options=s3.options)


@pytest.mark.timeout(120)
def test_a_killed_save_leaves_nothing_restorable_and_can_be_redone(s3, tmp_path) -> None:
    url = s3.bucket("killed") + "/run/step-1"
    ((code, tail),) = launch("killed", 1, tmp_path, timeout=90, worker=WORKER, args=[url], env=s3.env, group=False)
    assert code == -9, tail
    left = Store(url, s3.options).sizes()
    assert "__0_0.distcp" in left and "torchkeep-manifest.json" not in left  # data uploaded, never committed
    with pytest.raises(CorruptCheckpointError, match=r"killed before its commit"):
        tkd.restore(url, {"model": net()}, storage_options=s3.options)
    model = net()
    tkd.save({"model": model, "epoch": 2}, url, storage_options=s3.options)  # leftovers are overwritten
    fresh = net()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    assert tkd.restore(url, {"model": fresh}, storage_options=s3.options)["epoch"] == 2
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))


@pytest.mark.timeout(300)
def test_corrupted_object_is_found_before_loading(job, s3) -> None:
    _, url, _ = job
    _copy(s3, f"{url}/step-1", f"{url}/corrupt", flip="__1_0.distcp")
    target = net()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(FileChecksumError, match=r"corrupt/__1_0\.distcp: does not match") as info:
        tkd.restore(f"{url}/corrupt", {"model": target}, storage_options=s3.options)
    assert info.value.key == "__1_0.distcp" and info.value.path == f"{url}/corrupt/__1_0.distcp"
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())  # nothing was loaded
    _copy(s3, f"{url}/step-1", f"{url}/corrupt-tree", flip="tree.safetensors")
    with pytest.raises(FileChecksumError, match=r"corrupt-tree/tree\.safetensors"):
        tkd.restore(f"{url}/corrupt-tree", {"model": net()}, storage_options=s3.options)


@pytest.mark.timeout(60)
def test_memory_filesystem_round_trip_single_process() -> None:
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    url = f"memory://tk-dist-{os.getpid()}/run/step-1"
    assert tkd.save({"model": model, "optimizer": opt, "epoch": 2, "ema": torch.arange(4.0)}, url) == url
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.5, momentum=0.9)
    got = tkd.restore(url, {"model": fresh, "optimizer": fresh_opt})
    assert got["epoch"] == 2 and torch.equal(got["ema"], torch.arange(4.0))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(opt.state[p]["momentum_buffer"], fresh_opt.state[q]["momentum_buffer"])
    with pytest.raises(CheckpointExistsError):
        tkd.save({"epoch": 3}, url)
    job = tkd.save({"model": model}, url.replace("step-1", "step-2"), async_save=True)
    assert job.result(timeout=30) == url.replace("step-1", "step-2")
    assert torch.equal(tkd.load_tree(job.path)["model"]["1.bias"], model[1].bias.detach())


@pytest.mark.timeout(60)
def test_plain_dcp_prefix_is_refused_unless_trusted() -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    src = torch.nn.Linear(3, 2)
    url = f"memory://tk-dist-{os.getpid()}/plain"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": src.state_dict()}, storage_writer=FsspecWriter(url, sync_files=False), no_dist=True)
    target = torch.nn.Linear(3, 2)
    with pytest.raises(UnverifiedCheckpointError, match=r"plain: refused.*pickle.*trust_pickle=True"):
        tkd.restore(url, {"model": target})
    assert not torch.equal(target.weight, src.weight)
    tkd.restore(url, {"model": target}, trust_pickle=True)
    assert torch.equal(target.weight, src.weight) and torch.equal(target.bias, src.bias)

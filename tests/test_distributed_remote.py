"""Sharded checkpoints on object storage: 2 gloo ranks save FSDP2 + Adam to a local S3-compatible server,
restore on 2 ranks and on 1 process bitwise; uncommitted prefixes and damaged objects are refused; of two saves
to one prefix at once, the one that loses the exclusive commit leaves the winner's objects untouched."""

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
import torchkeep.distributed.remote as tkr
from torchkeep.distributed.remote import Store
from torchkeep.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DistributedSaveError,
    FileChecksumError,
    UnverifiedCheckpointError,
)
from torchkeep.storage.dcp_manifest import MANIFEST, manifest_bytes

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


def _objects(url: str, options: dict | None = None) -> dict[str, bytes]:
    """``{path under url: bytes}`` of every object under ``url`` (sub-prefixes included), freshly listed."""
    store = Store(url, options or {})
    store.fs.invalidate_cache()
    return {p[len(store.root) + 1 :]: bytes(store.fs.cat_file(p)) for p in store.fs.find(store.root)}


def _copy(
    src: str, dst: str, options: dict | None = None, *, skip: tuple[str, ...] = (), flip: str = "", flat: bool = False
) -> None:
    """Copy a checkpoint prefix object by object, leaving out the names in ``skip`` and flipping one bit of
    ``flip``; ``flat`` puts the data objects directly under ``dst`` (no sub-prefix)."""
    b = Store(dst, options or {})
    for path, raw in _objects(src, options).items():
        name = path.rsplit("/", 1)[-1]
        if name in skip:
            continue
        if name == flip:
            raw = bytearray(raw)
            raw[len(raw) // 2] ^= 1
        b.fs.pipe_file(b.p(name if flat else path), bytes(raw))


def _manifest(url: str, options: dict | None = None) -> dict:
    return json.loads(Store(url, options or {}).read(MANIFEST) or b"")


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
    store = Store(f"{url}/step-1", s3.options)
    manifest = _manifest(f"{url}/step-1", s3.options)
    sub = manifest["data"]  # the manifest at the prefix, this save's objects in its own sub-prefix
    assert sub.startswith(".data-") and len(sub) == len(".data-") + 16
    assert set(_objects(store.url, s3.options)) == {MANIFEST} | {
        f"{sub}/{n}"
        for n in (
            ".metadata",
            "__0_0.distcp",
            "__1_0.distcp",
            "rank-00000.safetensors",
            "rank-00001.safetensors",
            "tree.safetensors",
        )
    }
    sizes = store.child(sub).sizes()
    assert manifest["world_size"] == 2
    assert {k: v["bytes"] for k, v in manifest["files"].items()} == sizes
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
    assert checks[1]["again"].startswith("CheckpointExistsError")  # rank 1 hears rank 0's refusal
    for c in checks:  # a save that lost the race to the commit: refused on every rank, step-1 untouched
        assert c["race"].startswith("CheckpointExistsError") and "another save committed here" in c["race"]
        assert c["race-unchanged"] is True
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
    _copy(f"{url}/step-1", f"{url}/no-manifest", s3.options, skip=(MANIFEST,))
    with pytest.raises(CorruptCheckpointError, match=r"no-manifest: .*killed before its commit"):
        tkd.restore(f"{url}/no-manifest", {"model": net()}, storage_options=s3.options)
    assert not tkd.is_torchkeep_dcp(f"{url}/no-manifest", storage_options=s3.options)
    _copy(f"{url}/step-1", f"{url}/plain", s3.options, skip=(MANIFEST,), flat=True)  # a DCP layout, no manifest
    with pytest.raises(UnverifiedCheckpointError, match=r"plain: refused.*foreign DCP save.*pickle"):
        tkd.restore(f"{url}/plain", {"model": net()}, storage_options=s3.options)
    with pytest.raises(CheckpointNotFoundError):
        tkd.restore(f"{url}/never-written", {}, storage_options=s3.options)


@pytest.mark.timeout(120)
def test_a_killed_save_leaves_nothing_restorable_and_can_be_redone(s3, tmp_path) -> None:
    url = s3.bucket("killed") + "/run/step-1"
    ((code, tail),) = launch("killed", 1, tmp_path, timeout=90, worker=WORKER, args=[url], env=s3.env, group=False)
    assert code == -9, tail
    left = _objects(url, s3.options)
    (killed,) = {p.split("/")[0] for p in left}  # data uploaded to the save's own sub-prefix, never committed
    assert killed.startswith(".data-") and f"{killed}/__0_0.distcp" in left and MANIFEST not in left
    with pytest.raises(CorruptCheckpointError, match=r"killed before its commit"):
        tkd.restore(url, {"model": net()}, storage_options=s3.options)
    model = net()
    tkd.save({"model": model, "epoch": 2}, url, storage_options=s3.options)  # leftovers are left, never read
    assert _manifest(url, s3.options)["data"] != killed
    assert {p: v for p, v in _objects(url, s3.options).items() if p.startswith(killed)} == left
    fresh = net()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    assert tkd.restore(url, {"model": fresh}, storage_options=s3.options)["epoch"] == 2
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))


@pytest.mark.timeout(300)
def test_corrupted_object_is_found_before_loading(job, s3) -> None:
    _, url, _ = job
    _copy(f"{url}/step-1", f"{url}/corrupt", s3.options, flip="__1_0.distcp")
    sub = _manifest(f"{url}/corrupt", s3.options)["data"]
    target = net()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(FileChecksumError, match=r"corrupt/\.data-[0-9a-f]+/__1_0\.distcp: does not match") as info:
        tkd.restore(f"{url}/corrupt", {"model": target}, storage_options=s3.options)
    assert info.value.key == "__1_0.distcp" and info.value.path == f"{url}/corrupt/{sub}/__1_0.distcp"
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())  # nothing was loaded
    _copy(f"{url}/step-1", f"{url}/corrupt-tree", s3.options, flip="tree.safetensors")
    with pytest.raises(FileChecksumError, match=r"corrupt-tree/\.data-[0-9a-f]+/tree\.safetensors"):
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


@pytest.fixture(params=["memory", "memory-check-then-write", "s3"])
def where(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> tuple[str, dict]:
    if request.param == "memory-check-then-write":  # a file system without pipe_file(mode="create")
        monkeypatch.setattr(tkr, "exclusive_create", lambda fs: False)
    if request.param == "s3":
        s3 = request.getfixturevalue("s3")
        return s3.bucket("race") + "/run/step-1", s3.options
    return f"memory://tk-race-{os.getpid()}-{request.param}/run/step-1", {}


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Bitwise equal state dicts (same keys, dtypes, values)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def _zeroed() -> torch.nn.Module:
    model = net()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


@pytest.mark.timeout(120)
def test_a_save_that_loses_the_race_leaves_the_winner_untouched(where, monkeypatch) -> None:
    """B passes its start check, uploads its shards and pauses; A saves to the same prefix and commits; then B
    resumes: its commit is refused, its objects are deleted, and A's are byte for byte what A committed."""
    url, opts = where
    a = net()
    b = net()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    seen: dict[str, dict[str, bytes]] = {}
    original = tkr._Writer.write_data

    def b_pauses(self, plan, planner):
        fut = original(self, plan, planner)
        monkeypatch.setattr(tkr._Writer, "write_data", original)
        seen["b"] = _objects(url, opts)
        tkd.save({"model": a, "epoch": 1}, url, storage_options=opts)  # A, from start to commit
        seen["a"] = _objects(url, opts)
        return fut

    monkeypatch.setattr(tkr._Writer, "write_data", b_pauses)
    with pytest.raises(CheckpointExistsError, match=r"another save committed here while this one ran"):
        tkd.save({"model": b, "epoch": 2}, url, storage_options=opts)
    (b_sub,) = {p.split("/")[0] for p in seen["b"]}  # B had uploaded its tree and shard, no manifest
    assert b_sub.startswith(".data-") and f"{b_sub}/__0_0.distcp" in seen["b"] and MANIFEST not in seen["b"]
    a_manifest = json.loads(seen["a"][MANIFEST])
    named = {MANIFEST} | {f"{a_manifest['data']}/{n}" for n in a_manifest["files"]}
    assert a_manifest["data"] != b_sub and named <= set(seen["a"])
    after = _objects(url, opts)
    assert not any(p.startswith(f"{b_sub}/") for p in after)  # B removed its own objects
    assert after == {p: v for p, v in seen["a"].items() if not p.startswith(f"{b_sub}/")}
    assert {p: after[p] for p in named} == {p: seen["a"][p] for p in named}  # nothing A's manifest names changed
    target = _zeroed()
    assert tkd.restore(url, {"model": target}, storage_options=opts)["epoch"] == 1
    assert _same(a, target)


@pytest.mark.timeout(60)
def test_a_lost_reply_to_the_commit(monkeypatch) -> None:
    """A manifest PUT that landed but reported an error commits; one that failed leaves the data (it may land)."""
    from fsspec.implementations.memory import MemoryFileSystem

    original = MemoryFileSystem.pipe_file
    state = {"land": True}

    def flaky(self, path, value, mode="overwrite", **kwargs):
        if str(path).endswith(MANIFEST):
            if state["land"]:
                original(self, path, value, mode=mode, **kwargs)
            raise OSError("connection reset")
        return original(self, path, value, mode=mode, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "pipe_file", flaky)
    url = f"memory://tk-lost-{os.getpid()}/run"
    assert tkd.save({"w": torch.arange(3.0)}, f"{url}/landed") == f"{url}/landed"
    assert torch.equal(tkd.load_tree(f"{url}/landed")["w"], torch.arange(3.0))
    state["land"] = False
    with pytest.raises(DistributedSaveError, match=r"the commit .*connection reset"):
        tkd.save({"w": torch.arange(3.0)}, f"{url}/lost")
    left = _objects(f"{url}/lost")
    assert MANIFEST not in left and any(p.endswith("/tree.safetensors") for p in left)


@pytest.mark.timeout(60)
def test_manifest_data_location_is_checked_and_the_flat_layout_still_reads() -> None:
    url = f"memory://tk-layout-{os.getpid()}"
    model = net()
    tkd.save({"model": model, "epoch": 4}, f"{url}/step-1")
    manifest = _manifest(f"{url}/step-1")
    body = {k: v for k, v in manifest.items() if k not in ("format", "hash", "torchkeep", "torch", "created")}
    files, world = body.pop("files"), body.pop("world_size")
    body.pop("digest")
    # data objects directly under the prefix, a manifest without "data": read as before
    _copy(f"{url}/step-1", f"{url}/flat", skip=(MANIFEST,), flat=True)
    flat = Store(f"{url}/flat", {})
    flat.fs.pipe_file(flat.p(MANIFEST), manifest_bytes(files, world_size=world, extra={**body, "data": None}))
    target = _zeroed()
    assert tkd.restore(f"{url}/flat", {"model": target})["epoch"] == 4
    assert _same(model, target)
    # a manifest (with a valid digest) naming a location outside the prefix is refused
    for bad in ("..", "../step-1", "a/b", ""):
        store = Store(f"{url}/bad", {})
        store.fs.pipe_file(store.p(MANIFEST), manifest_bytes(files, world_size=world, extra={**body, "data": bad}))
        with pytest.raises(CorruptCheckpointError, match=r"not a child"):
            tkd.restore(f"{url}/bad", {"model": _zeroed()})

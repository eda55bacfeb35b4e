"""CheckpointManager in distributed runs: one 2-rank gloo job (FSDP2 on CPU, 127.0.0.1) checked by several
tests, plus single-process checks of distributed checkpoint directories in a run (``distributed=True``
without a process group)."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

import torchkeep as tk
from torchkeep.errors import CorruptCheckpointError
from torchkeep.manager import CheckpointSkippedWarning, manifest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from compare import assert_bitwise_state, flat_tensors
from dist_launch import launch
from dist_worker import full, net

WORKER = Path(__file__).parent / "helpers" / "dist_manager_worker.py"


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """The 2-rank job: saves with retention, reopen + restore, corrupt + fall back, async saves."""
    out = tmp_path_factory.mktemp("dist-manager")
    results = launch("manager", 2, out, timeout=240, worker=WORKER)
    for code, tail in results:
        assert code == 0, tail
    return out, [json.loads((out / f"checks-manager-{r}.json").read_text()) for r in range(2)]


def assert_differs(a, b) -> None:
    fa, fb = flat_tensors(a), flat_tensors(b)
    assert any(not torch.equal(fa[k], fb[k]) for k in fa)


EXPECTED = ["ckpt_000001.dcp", "ckpt_000003.dcp", "ckpt_000004.dcp"]  # keep_last=2 + keep_best=1 (acc 0.9)


@pytest.mark.timeout(300)
def test_every_rank_sees_the_same_checkpoints_latest_and_best(job) -> None:
    _, (r0, r1) = job
    assert r0["mode"] is True and r1["mode"] is True  # auto: a 2-rank process group
    assert r0["steps"] == r1["steps"]  # names, steps, metrics, lists, latest/best after every save
    last = r0["steps"][-1]
    assert last["files"] == EXPECTED and last["latest"] == "ckpt_000004.dcp" and last["best"] == "ckpt_000001.dcp"
    # rank 1 passed acc + 1: rank 0 decides what is recorded
    assert [s["info_metrics"]["acc"] for s in r1["steps"]] == [0.5, 0.9, 0.6, 0.7, 0.65]
    assert last["metrics"] == [{"acc": 0.9}, {"acc": 0.7}, {"acc": 0.65}]
    assert [s["file"] for s in r0["steps"]] == [f"ckpt_00000{i}.dcp" for i in range(5)]
    assert all(size > 0 for s in r0["steps"] for size in s["sizes"])
    assert r0["reopened"] == r1["reopened"] and r0["reopened"]["files"] == EXPECTED


@pytest.mark.timeout(300)
def test_retention_deletes_directories_only_after_the_manifest_drops_them(job) -> None:
    out, (r0, _) = job
    deleted = [d["name"] for d in r0["deletes"]]
    assert deleted == ["ckpt_000000.dcp", "ckpt_000002.dcp"]
    for d, step in zip(r0["deletes"], (2, 4), strict=True):
        assert d["was_dir"] and d["gone"]
        assert d["name"] not in d["listed"]  # the manifest on disk no longer named it
        assert d["listed"][-1] == f"ckpt_00000{step}.dcp"  # and already named the new checkpoint
    for s in r0["steps"]:  # what is on disk is what the manifest lists
        assert s["dirs"] == s["files"]
    assert sorted(n for n in os.listdir(out / "run") if n.endswith(".dcp") and n != "last.dcp") == EXPECTED


@pytest.mark.timeout(300)
def test_reopened_restore_returns_the_newest_bitwise_and_cleans_leftovers(job) -> None:
    out, (r0, r1) = job
    assert r0["restored"] == r1["restored"] == "ckpt_000004.dcp"
    assert_bitwise_state(tk.load(out / "restored-latest.safetensors"), tk.load(out / "ref-4.safetensors"))
    # the killed save's temp directory and a deletion's leftover are removed; someone else's is not
    assert r0["after_open_hidden"] == [".lock", ".notours.tmp-01"]


@pytest.mark.timeout(300)
def test_corrupt_newest_makes_every_rank_fall_back_to_the_same_older_one(job) -> None:
    out, (r0, r1) = job
    assert r0["fallback"] == r1["fallback"] == "ckpt_000003.dcp"
    for r in (r0, r1):
        assert len(r["skipped_warnings"]) == 1 and "ckpt_000004.dcp" in r["skipped_warnings"][0]
        assert "falling back to ckpt_000003.dcp" in r["skipped_warnings"][0]
    fallback = tk.load(out / "restored-fallback.safetensors")
    assert_bitwise_state(fallback, tk.load(out / "ref-3.safetensors"))
    assert_differs(fallback, tk.load(out / "ref-4.safetensors"))
    assert r0["strict_error"] == "FileChecksumError" and r1["strict_error"] == "FileChecksumError"


@pytest.mark.timeout(300)
def test_async_saves_are_indexed_on_the_next_call_and_errors_reach_every_rank(job) -> None:
    out, (r0, r1) = job
    for r in (r0, r1):
        # each save indexes the previous one, so latest() lags by one save until wait()
        assert r["async_lagging"] == [["ckpt_000000.dcp", None], ["ckpt_000001.dcp", "ckpt_000000.dcp"],
                                      ["ckpt_000002.dcp", "ckpt_000001.dcp"]]  # fmt: skip
        assert r["async_after_wait"]["files"] == r["async_after_wait"]["dirs"] == ["ckpt_000002.dcp"]
        # the injected failure of step 3's commit, raised by wait() on every rank; nothing of it is left
        assert r["async_final"]["files"] == r["async_final"]["dirs"] == ["ckpt_000004.dcp"]
        assert r["async_hidden"] == []
    assert r0["async_error"] == "OSError" and r1["async_error"] == "DistributedSaveError"
    assert [e["file"] for e in json.loads((out / "run-async" / manifest.MANIFEST).read_text())["entries"]] == [
        "ckpt_000004.dcp"
    ]


@pytest.mark.timeout(300)
def test_saved_on_two_ranks_restores_on_one_process_through_the_manager(job) -> None:
    out, _ = job
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.1)
    with tk.CheckpointManager(out / "run", keep_last=2, keep_best=1, monitor="acc") as mgr:
        assert mgr.checkpoints()[-1].file == "ckpt_000004.dcp" and not mgr._dist
        assert mgr.restore({"model": model, "optimizer": opt}, step="best").file == "ckpt_000001.dcp"
        assert_bitwise_state(full(model, opt), tk.load(out / "ref-1.safetensors"))
        with pytest.warns(CheckpointSkippedWarning, match="ckpt_000004.dcp"):
            assert mgr.restore({"model": model, "optimizer": opt}).file == "ckpt_000003.dcp"  # corrupt newest
        assert_bitwise_state(full(model, opt), tk.load(out / "ref-3.safetensors"))


# -- one process, distributed=True: directory checkpoints in a run ------------------------------


def _state(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.timeout(60)
def test_unindexed_directory_is_adopted_and_lost_manifest_rebuilt(tmp_path: Path) -> None:
    model, opt = _state(0)
    with tk.CheckpointManager(tmp_path, distributed=True) as mgr:
        for step in range(3):
            mgr.save({"model": model, "optimizer": opt}, step=step, metrics={"loss": 1.0 / (step + 1)})
        saved = mgr.checkpoints()
    assert [c.file for c in saved] == ["ckpt_000000.dcp", "ckpt_000001.dcp", "ckpt_000002.dcp"]
    # a crash between the directory's commit and the manifest write: the manifest lacks the newest
    doc = json.loads((tmp_path / manifest.MANIFEST).read_text())
    doc["entries"] = doc["entries"][:-1]
    (tmp_path / manifest.MANIFEST).write_text(json.dumps(doc))
    with tk.CheckpointManager(tmp_path, distributed=True) as mgr:
        assert mgr.checkpoints() == saved  # adopted with the same size and digest
    (tmp_path / manifest.MANIFEST).unlink()
    with tk.CheckpointManager(tmp_path, distributed=True) as mgr:
        assert mgr.checkpoints() == saved and mgr.latest().metrics == {"loss": 1.0 / 3}
    assert [e["file"] for e in json.loads((tmp_path / manifest.MANIFEST).read_text())["entries"]] == [
        c.file for c in saved
    ]


@pytest.mark.timeout(60)
def test_directory_without_torchkeep_manifest_is_never_indexed_or_deleted(tmp_path: Path) -> None:
    model, _ = _state(0)
    with tk.CheckpointManager(tmp_path, keep_last=1, distributed=True) as mgr:
        mgr.save({"model": model}, step=0)
    # a copy missing the manifest written last (an uncommitted directory under a visible name)
    copy = tmp_path / "ckpt_000005.dcp"
    copy.mkdir()
    for f in (tmp_path / "ckpt_000000.dcp").iterdir():
        if f.name != "torchkeep-manifest.json":
            (copy / f.name).write_bytes(f.read_bytes())
    with tk.CheckpointManager(tmp_path, keep_last=1, distributed=True) as mgr:
        assert [c.file for c in mgr.checkpoints()] == ["ckpt_000000.dcp"]
        assert mgr.save({"model": model}, step=5).file == "ckpt_000005-v1.dcp"  # the name is taken
        assert [c.file for c in mgr.checkpoints()] == ["ckpt_000005-v1.dcp"]
    assert copy.is_dir() and not (tmp_path / "ckpt_000000.dcp").exists()


@pytest.mark.timeout(60)
def test_files_and_directories_in_one_run_restore_by_step(tmp_path: Path) -> None:
    a, _ = _state(1)
    b, _ = _state(2)
    with tk.CheckpointManager(tmp_path) as mgr:
        assert mgr.save({"model": a}, step=0).file == "ckpt_000000.safetensors"
    with tk.CheckpointManager(tmp_path, distributed=True) as mgr:
        assert mgr.save({"model": b}, step=1).file == "ckpt_000001.dcp"
        assert mgr.prune(dry_run=True) == []
    target, _ = _state(3)
    with tk.CheckpointManager(tmp_path, keep_last=1) as mgr:
        assert mgr.restore({"model": target}, step=0).file == "ckpt_000000.safetensors"
        assert torch.equal(target.weight, a.weight)
        assert mgr.restore({"model": target}).file == "ckpt_000001.dcp"
        assert torch.equal(target.weight, b.weight)
        assert [c.file for c in mgr.prune()] == ["ckpt_000000.safetensors"]
    assert sorted(n for n in os.listdir(tmp_path) if not n.startswith(".")) == [
        "ckpt_000001.dcp",
        "last.dcp",
        "manifest.json",
    ]


@pytest.mark.timeout(60)
def test_every_directory_corrupt_raises_and_strict_raises_the_first(tmp_path: Path) -> None:
    model, _ = _state(0)
    with tk.CheckpointManager(tmp_path, distributed=True) as mgr:
        mgr.save({"model": model}, step=0)
        mgr.save({"model": model}, step=1)
        for c in mgr.checkpoints():
            (c.path / "torchkeep-manifest.json").write_text("{}")
        with pytest.raises(CorruptCheckpointError, match="manifest"):
            mgr.restore({"model": model}, strict=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(CorruptCheckpointError, match="none of its checkpoints verifies"):
                mgr.restore({"model": model})
        assert sum(issubclass(w.category, CheckpointSkippedWarning) for w in caught) == 2


def test_distributed_on_object_storage_is_refused_with_the_fix() -> None:
    pytest.importorskip("fsspec")
    with pytest.raises(ValueError, match=r"object storage.*shared file system"):
        tk.CheckpointManager("memory://tk-dist-run", distributed=True)


def test_distributed_on_object_storage_is_a_typed_value_error() -> None:
    pytest.importorskip("fsspec")
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"^distributed=True: memory://") as info:
        tk.CheckpointManager("memory://tk-dist-run-typed", distributed=True)
    assert isinstance(info.value, ValueError) and info.value.argument == "distributed"

"""Single-process checks of what a distributed save never does: delete data that is not a checkpoint,
leave nothing at a path it replaces, mix two checkpoints in one restore, hide a read failure from
``except Exception``, commit files rank 0 cannot see, or write per-rank values changed after it returned."""

from __future__ import annotations

import os
import shutil
import threading
import warnings
from pathlib import Path

import pytest
import torch

import torchkeep.distributed as tkd
import torchkeep.distributed.checkpoint as tkdc
import torchkeep.distributed.resume as tkdr
from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DistributedSaveError,
    InsufficientSpaceError,
    MissingShardError,
    TorchkeepError,
)
from torchkeep.storage.local import exchange

pytestmark = [pytest.mark.timeout(60), pytest.mark.filterwarnings("ignore::UserWarning")]


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_a_directory_that_is_not_a_checkpoint_is_never_replaced(tmp_path: Path) -> None:
    project = tmp_path / "myproject"
    project.mkdir()
    (project / "train.py").write_text("print('mine')")
    # raised as itself on rank 0 (the other ranks get a DistributedSaveError naming rank 0)
    with pytest.raises(FileExistsError, match=r"not a torchkeep checkpoint \(it holds train\.py\)"):
        tkd.save({"model": _model(0)}, project)
    assert sorted(p.name for p in project.iterdir()) == ["train.py"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary directory is left"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert tkd.save({"model": _model(0)}, empty) == empty  # an empty directory is fine


def test_replacing_a_checkpoint_swaps_it_whole(tmp_path: Path) -> None:
    path = tmp_path / "latest"
    tkd.save({"model": _model(1), "step": 1}, path)
    tkd.save({"model": _model(2), "step": 2}, path)
    fresh = _model(0)
    assert tkd.restore(path, {"model": fresh})["step"] == 2 and _same(fresh, _model(2))
    assert [p.name for p in tmp_path.iterdir()] == ["latest"], "the previous checkpoint was removed"


def test_exchange_swaps_two_directories(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("A")
    (b / "x").write_text("B")
    if not exchange(a, b):
        pytest.skip("this file system cannot swap atomically (the two-rename fallback is used)")
    assert (a / "x").read_text() == "B" and (b / "x").read_text() == "A"


def test_an_interrupted_replacement_names_the_complete_copies(tmp_path: Path) -> None:
    """Where the swap is unavailable, a crash between the two renames leaves only hidden copies."""
    path = tmp_path / "latest"
    tkd.save({"model": _model(1)}, path)
    path.rename(tmp_path / ".latest.old-1234")  # what the first of the two renames leaves
    with pytest.raises(CheckpointNotFoundError, match=r"\.latest\.old-1234.*Rename the one you want to latest"):
        tkd.restore(path, {"model": _model(0)})


def test_a_checkpoint_replaced_during_a_restore_fails_cleanly_never_mixes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "latest"
    tkd.save({"model": _model(1), "step": 1}, path)
    real_fill = tkdr._Filler.fill

    def fill_then_replace(self: object, *args: object) -> object:
        out = real_fill(self, *args)
        if not getattr(fill_then_replace, "done", False):
            fill_then_replace.done = True  # type: ignore[attr-defined]
            tkd.save({"model": _model(2), "step": 2}, path)  # verified step 1, now step 2 is swapped in
        return out

    monkeypatch.setattr(tkdr._Filler, "fill", fill_then_replace)
    target = _model(0)
    with pytest.raises(TorchkeepError) as err:  # catchable as an Exception, not DCP's BaseException
        tkd.restore(path, {"model": target})
    assert isinstance(err.value, (MissingShardError, CorruptCheckpointError))
    assert str(path) in str(err.value) and "/proc/self/fd" not in str(err.value)
    assert not _same(target, _model(2)), "no tensor of the newer checkpoint was read"


def test_a_shard_deleted_after_verification_is_a_typed_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tkd.save({"model": _model(1)}, tmp_path / "ck")
    real_fill = tkdr._Filler.fill

    def fill_then_delete(self: object, *args: object) -> object:
        out = real_fill(self, *args)
        for p in path.glob("*.distcp"):
            p.unlink()
        return out

    monkeypatch.setattr(tkdr._Filler, "fill", fill_then_delete)
    with pytest.raises(MissingShardError, match=r"__0_0\.distcp"):
        tkd.restore(path, {"model": _model(0)})


def test_a_failing_check_is_reported_as_a_typed_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tkd.save({"model": _model(1)}, tmp_path / "ck")

    def eio(*args: object, **kwargs: object) -> list:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(tkdr.Local, "check", eio)
    with pytest.raises(CorruptCheckpointError, match=r"could not be checked: OSError.*Input/output error"):
        tkd.restore(path, {"model": _model(0)})


def test_files_rank_0_cannot_see_are_never_committed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranks on node-local disks: rank 1's shard is not in rank 0's directory."""
    real = tkdc.comm.all_gather_json

    def with_a_remote_rank(obj: object, group: object = None) -> list:
        got = real(obj, group)
        if isinstance(obj, dict) and "files" in obj:
            return [*got, {"files": {"__1_0.distcp": {"bytes": 64, "xxh3": "0" * 32}}, "error": None}]
        return got

    monkeypatch.setattr(tkdc.comm, "all_gather_json", with_a_remote_rank)
    with pytest.raises(DistributedSaveError, match=r"rank 1.*__1_0\.distcp is missing as seen from rank 0.*shares"):
        tkd.save({"model": _model(1)}, tmp_path / "ck")
    assert not os.listdir(tmp_path), "nothing committed, no temporary directory left"


def test_async_save_snapshots_per_rank_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real_commit = tkdc._commit

    def held_commit(*args: object, **kwargs: object) -> object:
        release.wait(10)  # the background commit writes the per-rank file only after the mutation below
        return real_commit(*args, **kwargs)

    monkeypatch.setattr(tkdc, "_commit", held_commit)
    sampler = {"epoch_pos": [10], "seen": torch.tensor([10])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        job = tkd.save(
            {"model": _model(1), "sampler": sampler}, tmp_path / "ck", async_save=True, per_rank=("sampler",)
        )
        sampler["epoch_pos"][0] = 999
        sampler["seen"].fill_(999)
        release.set()
        job.result()
    out = tkd.restore(tmp_path / "ck", {"model": _model(0)})
    assert out["sampler"]["epoch_pos"] == [10] and out["sampler"]["seen"].tolist() == [10]
    shutil.rmtree(tmp_path / "ck")


def test_a_save_that_cannot_fit_is_refused_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.statvfs

    class Full:
        def __init__(self, st: os.statvfs_result) -> None:
            self.f_frsize, self.f_bavail = st.f_frsize, 1  # one block free

    monkeypatch.setattr(tkdc.os, "statvfs", lambda p: Full(real(p)))
    model = torch.nn.Linear(256, 256)
    with pytest.raises(InsufficientSpaceError) as err:
        tkd.save({"model": model}, tmp_path / "ck")
    assert err.value.needed > 256 * 256 * 4 and str(tmp_path) in str(err.value)
    assert not os.listdir(tmp_path), "nothing was written"


# -- typed argument errors ---------------------------------------------------------------------


def test_a_file_or_foreign_directory_at_the_target_is_a_typed_file_exists_error(tmp_path: Path) -> None:
    import torchkeep as tk

    afile = tmp_path / "ck"
    afile.write_text("not a checkpoint")
    with pytest.raises(tk.errors.TargetExistsError, match=r"is a file, and a distributed checkpoint is a directory"):
        tkd.save({"model": _model(0)}, afile)
    assert afile.read_text() == "not a checkpoint"
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("print('mine')")
    with pytest.raises(tk.errors.TargetExistsError) as info:
        tkd.save({"model": _model(0)}, project)
    err = info.value
    assert isinstance(err, FileExistsError) and isinstance(err, tk.errors.TorchkeepError)
    assert err.path == str(project.absolute()) and "move that directory away" in str(err)


def test_an_unknown_per_rank_policy_is_a_typed_value_error(tmp_path: Path) -> None:
    import torchkeep as tk

    path = tkd.save({"model": _model(1)}, tmp_path / "ck")
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"per_rank_policy='ignore': pass one of 'skip'") as info:
        tkd.restore(path, {"model": _model(0)}, per_rank_policy="ignore")
    assert isinstance(info.value, ValueError)

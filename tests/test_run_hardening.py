"""A run directory that holds up: links, full disks, saves that do not read back, killed saves' leftovers."""

from __future__ import annotations

import errno
import os
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import torchkeep as tk
from torchkeep.errors import (
    CorruptCheckpointError,
    FilenameTemplateError,
    InsufficientSpaceError,
    InvalidArgumentError,
    TargetExistsError,
)
from torchkeep.format import header as header_format
from torchkeep.format.meta import created
from torchkeep.manager import CheckpointSkippedWarning
from torchkeep.storage import local
from torchkeep.storage.local import AtomicFile, remove_stale_temps, temp_prefix


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3)


def _weights(m: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


# -- 1. the manager never prunes the last checkpoint that loads for one that does not --------------


def test_a_save_that_load_would_refuse_deletes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = _model(1)
    with tk.CheckpointManager(tmp_path, keep_last=1) as mgr:
        first = mgr.save({"model": good}, step=1)
        # the reader's header limit, lowered under the header the next save writes
        monkeypatch.setattr(header_format, "MAX_HEADER_SIZE", 600)
        big = {"model": good, "more": {f"t{i}": torch.zeros(1) for i in range(40)}}
        with pytest.raises(CorruptCheckpointError, match="does not read back") as info:
            mgr.save(big, step=2)
        assert "ckpt_000002.safetensors" in str(info.value)
        monkeypatch.undo()
        assert [c.file for c in mgr.checkpoints()] == [first.file]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "ckpt_000001.safetensors",
        "last.safetensors",
        "manifest.json",
    ]
    fresh = _model(2)
    with tk.CheckpointManager(tmp_path, keep_last=1) as mgr:
        assert mgr.restore({"model": fresh}, strict=True).step == 1
    assert all(torch.equal(a, b) for a, b in zip(_weights(fresh), _weights(good), strict=True))


def test_a_file_damaged_between_write_and_rename_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with tk.CheckpointManager(tmp_path, keep_last=1) as mgr:
        mgr.save({"model": _model(1)}, step=1)
        real_commit = AtomicFile.commit

        def flip_then_commit(self: AtomicFile) -> None:
            with open(self.tmp, "r+b") as fh:  # a rewrite in place, a bad disk...
                fh.seek(-1, os.SEEK_END)
                byte = fh.read(1)
                fh.seek(-1, os.SEEK_END)
                fh.write(bytes([byte[0] ^ 1]))
            real_commit(self)

        monkeypatch.setattr(AtomicFile, "commit", flip_then_commit)
        with pytest.raises(CorruptCheckpointError, match="does not read back"):
            mgr.save({"model": _model(2)}, step=2)
        monkeypatch.undo()
        assert [c.step for c in mgr.checkpoints()] == [1]
        assert not (tmp_path / "ckpt_000002.safetensors").exists()
        assert mgr.restore({"model": _model(3)}, strict=True).step == 1


def test_an_async_save_that_does_not_read_back_deletes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = tk.CheckpointManager(tmp_path, keep_last=1, async_save=True)
    mgr.save({"model": _model(1)}, step=1)
    mgr.wait()
    monkeypatch.setattr(header_format, "MAX_HEADER_SIZE", 600)
    mgr.save({"model": _model(1), "more": {f"t{i}": torch.zeros(1) for i in range(40)}}, step=2)
    with pytest.raises(CorruptCheckpointError, match="does not read back"):
        mgr.wait()
    monkeypatch.undo()
    assert [c.step for c in mgr.checkpoints()] == [1]
    mgr.close()


# -- 2. never write through a link -------------------------------------------------------------------


def test_a_symlinked_lock_never_truncates_its_target(tmp_path: Path) -> None:
    outside = tmp_path / "precious.txt"
    outside.write_text("do not touch\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(outside)
    with pytest.raises(TargetExistsError, match="symbolic link") as info:
        tk.CheckpointManager(run)
    assert "rm " in str(info.value)
    assert outside.read_text() == "do not touch\n"
    (run / ".lock").unlink()
    with tk.CheckpointManager(run) as mgr:  # and once removed, the manager makes its own
        mgr.save({"model": _model()}, step=0)
    assert outside.read_text() == "do not touch\n"


@pytest.mark.timeout(30)
def test_a_dangling_or_fifo_lock_is_refused_without_hanging(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / ".lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(TargetExistsError):
        tk.CheckpointManager(tmp_path / "a")
    assert not (tmp_path / "elsewhere").exists()  # O_CREAT did not follow the link
    (tmp_path / "b").mkdir()
    os.mkfifo(tmp_path / "b" / ".lock")
    with pytest.raises(TargetExistsError, match="FIFO"):
        tk.CheckpointManager(tmp_path / "b")


def test_a_symlinked_manifest_is_replaced_not_written_through(tmp_path: Path) -> None:
    outside = tmp_path / "other-manifest.json"
    outside.write_text('{"version": 1, "entries": []}\n')
    run = tmp_path / "run"
    with tk.CheckpointManager(run) as mgr:
        mgr.save({"model": _model()}, step=0)
    (run / "manifest.json").unlink()
    (run / "manifest.json").symlink_to(outside)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with tk.CheckpointManager(run) as mgr:  # the link is not read through: the manifest is rebuilt
            assert [c.step for c in mgr.checkpoints()] == [0]
            mgr.save({"model": _model()}, step=1)
    assert outside.read_text() == '{"version": 1, "entries": []}\n'
    assert not (run / "manifest.json").is_symlink()


def test_a_symlinked_temp_name_is_never_written_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"keep")
    target = tmp_path / "run" / "c.safetensors"
    target.parent.mkdir()
    monkeypatch.setattr(os, "urandom", lambda n: b"\x00" * n)  # the temp name an attacker predicted
    (target.parent / (temp_prefix(target) + "000000000000")).symlink_to(outside)
    with pytest.raises(FileExistsError):
        tk.save({"w": torch.ones(2)}, target)
    assert outside.read_bytes() == b"keep"


# -- 3. typed errors ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", ["directory", "fifo", "symlink"])
def test_restore_falls_back_past_an_entry_that_is_not_a_file(tmp_path: Path, what: str) -> None:
    good = _model(1)
    with tk.CheckpointManager(tmp_path) as mgr:
        mgr.save({"model": good}, step=1)
        newest = mgr.save({"model": _model(2)}, step=2)
    path = tmp_path / newest.file
    keep = path.read_bytes()
    path.unlink()
    if what == "directory":
        path.mkdir()
        (path / "inner.safetensors").write_bytes(keep)  # a checkpoint inside is still not this entry
    elif what == "fifo":
        os.mkfifo(path)
    else:
        (tmp_path / "elsewhere.safetensors").write_bytes(keep)
        path.symlink_to(tmp_path / "elsewhere.safetensors")
    fresh = _model(3)
    with tk.CheckpointManager(tmp_path) as mgr:
        with pytest.warns(CheckpointSkippedWarning, match="ckpt_000002"):
            assert mgr.restore({"model": fresh}).step == 1
        with pytest.raises(CorruptCheckpointError, match="ckpt_000002"):
            mgr.restore({"model": fresh}, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(_weights(fresh), _weights(good), strict=True))


def _enospc(*a: Any, **k: Any) -> Any:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["pwritev", "pwrite", "fsync", "replace"])
def test_tk_save_into_a_full_disk_is_insufficient_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    path = tmp_path / "c.safetensors"
    monkeypatch.setattr(os, where, _enospc)
    with pytest.raises(InsufficientSpaceError) as info:
        tk.save({"w": torch.ones(1000)}, path)
    monkeypatch.undo()
    err = info.value
    assert err.errno == errno.ENOSPC and isinstance(err, OSError)
    assert err.directory == str(tmp_path) and "ENOSPC" in str(err)
    assert list(tmp_path.iterdir()) == []


def test_edquot_keeps_its_errno(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def edquot(*a: Any, **k: Any) -> Any:
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(os, "pwritev", edquot)
    with pytest.raises(InsufficientSpaceError) as info:
        tk.save({"w": torch.ones(1000)}, tmp_path / "c.safetensors")
    assert info.value.errno == errno.EDQUOT
    assert info.value.needed >= 4000  # the bytes the write was to reach


def test_a_full_disk_on_the_manifest_write_is_insufficient_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with tk.CheckpointManager(tmp_path, keep_last=1) as mgr:
        mgr.save({"model": _model(1)}, step=1)
        real_write = os.write

        def full(fd: int, data: Any) -> int:
            if b'"entries"' in bytes(data):  # the manifest's bytes
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", full)
        with pytest.raises(InsufficientSpaceError):
            mgr.save({"model": _model(2)}, step=2)
        monkeypatch.undo()
        # nothing was deleted: the older checkpoint is still there, the new one adopted on the next open
        assert (tmp_path / "ckpt_000001.safetensors").exists()
    with tk.CheckpointManager(tmp_path) as mgr:
        assert [c.step for c in mgr.checkpoints()] == [1, 2]


@pytest.mark.parametrize("template", ["ckpt\x00{step}", "ck\x1b[2J{step}"])
def test_a_template_with_a_control_character_is_refused(tmp_path: Path, template: str) -> None:
    with pytest.raises(FilenameTemplateError, match="control character"):
        tk.CheckpointManager(tmp_path, filename=template)


def test_a_template_giving_an_over_long_name_names_the_field(tmp_path: Path) -> None:
    with tk.CheckpointManager(tmp_path, filename="{model}_{step}") as mgr:
        with pytest.raises(FilenameTemplateError, match=r"\{model\} \(300 bytes\)") as info:
            mgr.save({"w": torch.ones(1)}, step=1, context={"model": "m" * 300})
        assert "255" in str(info.value)
        assert list(p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors") == []
        # multi-byte characters count as bytes
        with pytest.raises(FilenameTemplateError, match="over the 200-byte limit"):
            mgr.save({"w": torch.ones(1)}, step=1, context={"model": "é" * 120})
        assert mgr.save({"w": torch.ones(1)}, step=1, context={"model": "m" * 180}).file.startswith("m" * 180)


@pytest.mark.parametrize("value", ["253402300800", "99999999999999999999", "abc", "-1", "1.5", "١٢"])
def test_a_bad_source_date_epoch_is_a_typed_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", value)
    with pytest.raises(InvalidArgumentError, match="SOURCE_DATE_EPOCH"):
        tk.save({"w": torch.ones(1)}, tmp_path / "c.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("value", "when"),
    [("253402300799", "9999-12-31T23:59:59+00:00"), ("0", "1970-01-01T00:00:00+00:00"), (" 86400 ", "1970-01-02")],
)
def test_source_date_epoch_limits(monkeypatch: pytest.MonkeyPatch, value: str, when: str) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", value)
    assert created().startswith(when)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "")
    assert created()[:4].isdigit()


# -- 4. temp files of killed saves ------------------------------------------------------------------


def _leftover(target: Path, suffix: str = "0123456789ab", age: float = 3600.0) -> Path:
    p = target.with_name(temp_prefix(target) + suffix)
    p.write_bytes(b"x" * 1000)
    old = time.time() - age
    os.utime(p, (old, old))
    return p


def test_tk_save_removes_what_killed_saves_left(tmp_path: Path) -> None:
    target = tmp_path / "c.safetensors"
    stale = [_leftover(target, s) for s in ("0123456789ab", "ba9876543210")]
    fresh = _leftover(target, "aaaaaaaaaaaa", age=0)  # may be a live writer without a lock
    other = _leftover(tmp_path / "d.safetensors")  # another target's
    not_ours = tmp_path / (temp_prefix(target) + "notahexsuffix")
    not_ours.write_bytes(b"")
    tk.save({"w": torch.ones(2)}, target)
    assert not any(p.exists() for p in stale)
    assert fresh.exists() and other.exists() and not_ours.exists()


def test_a_temp_file_a_live_writer_holds_is_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "c.safetensors"
    with AtomicFile(target) as live:
        os.write(live.fd, b"in progress")
        old = time.time() - 3600
        os.utime(live.tmp, (old, old))
        assert remove_stale_temps(target, min_age=0) == 0
        tk.save({"w": torch.ones(2)}, target)  # a second writer of the same target meanwhile
        assert live.tmp.exists()
        live.commit()
    assert target.read_bytes() == b"in progress"


def test_a_cleaner_between_create_and_lock_makes_the_writer_take_a_new_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "c.safetensors"
    real_flock = local.fcntl.flock
    calls = []

    def flock_after_a_cleaner(fd: int, op: int) -> None:
        if not calls and op == local.fcntl.LOCK_EX:
            calls.append(fd)
            os.unlink(target.with_name(next(n for n in os.listdir(tmp_path) if n.startswith(".c."))))
        real_flock(fd, op)

    monkeypatch.setattr(local.fcntl, "flock", flock_after_a_cleaner)
    with AtomicFile(target) as f:
        os.write(f.fd, b"ok")
        f.commit()
    assert calls and target.read_bytes() == b"ok"
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_leftovers_are_links_or_directories_never_followed(tmp_path: Path) -> None:
    target = tmp_path / "c.safetensors"
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    link = target.with_name(temp_prefix(target) + "0123456789ab")
    link.symlink_to(outside)
    d = target.with_name(temp_prefix(target) + "ba9876543210")
    d.mkdir()
    assert remove_stale_temps(target, min_age=0) == 0
    assert link.is_symlink() and d.is_dir() and outside.read_bytes() == b"keep"


def test_leftovers_do_not_accumulate_across_killed_saves(tmp_path: Path) -> None:
    target = tmp_path / "c.safetensors"
    for _ in range(5):  # what five saves SIGKILLed mid-write leave
        _leftover(target, os.urandom(6).hex())
    tk.save({"w": torch.ones(2)}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]

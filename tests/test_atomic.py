"""Atomic, durable writes: SIGKILL at random moments, injected write errors, permissions, fsyncs."""

from __future__ import annotations

import errno
import os
import random
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from forkserver import ForkClient
from loadfile import load_file

import torchkeep as tk
from torchkeep.errors import UnsupportedObjectError

HELPER = Path(__file__).parent / "helpers" / "save_loop.py"
NUMEL = 5 * 1024 * 1024  # int32: a 20 MiB tree
KILLS = 24


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


@pytest.fixture(scope="module")
def save_loop() -> Any:
    return load_file("torchkeep_test_save_loop", HELPER)


class SaverProcess(ForkClient):
    """Drives tests/helpers/save_loop.py: fork a saving child, kill it, reap it."""

    def __init__(self, path: Path) -> None:
        super().__init__(HELPER, path, NUMEL, stderr=True)
        self.save_seconds = float(self.ready.split()[1])


@pytest.fixture
def saver(tmp_path: Path) -> Iterator[tuple[SaverProcess, Path]]:
    path = tmp_path / "ckpt.safetensors"
    s = SaverProcess(path)
    try:
        yield s, path
    finally:
        s.close()


def test_sigkill_at_random_moments_never_breaks_the_file(saver: tuple[SaverProcess, Path], save_loop: Any) -> None:
    proc, path = saver
    # the helper committed version 0 before it said "ready": there is a file before the first kill
    assert save_loop.check(tk.load(path), NUMEL) == 0

    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    span = max(0.05, 3 * proc.save_seconds)
    last = 0
    seen = {0}
    interrupted = 0  # kills that caught a save between creating its temp file and the rename
    k = 0
    # at least KILLS kills; more (up to 3x) until enough of them landed inside a save and enough
    # versions were committed, so the test never passes on kills that all missed the writes
    while k < KILLS or (k < 3 * KILLS and (interrupted < 5 or len(seen) < 5)):
        k += 1
        word, pid = proc.ask(f"fork {k}").split()
        assert word == "pid"
        # mostly within the first few saves, sometimes almost at once, sometimes after several
        delay = rng.choice(
            [rng.uniform(0, 0.02), *(rng.uniform(0, span) for _ in range(3)), rng.uniform(span, 2 * span)]
        )
        time.sleep(delay)
        os.kill(int(pid), signal.SIGKILL)
        assert proc.ask(f"reap {pid}") == f"signal {signal.SIGKILL}", (
            f"the saving child did not die by SIGKILL (seed {seed})"
        )

        loaded = tk.load(path)  # verify=True: every checksum checked
        v = save_loop.check(loaded, NUMEL)
        assert v >= last, f"the file went back from version {last} to {v} (seed {seed})"
        assert v == last or v // 1_000_000 == k, f"version {v} was not written by child {k} (seed {seed})"
        last = v
        seen.add(v)
        leftovers = temp_files(path.parent)
        interrupted += bool(leftovers)
        for name in leftovers:  # a killed save leaves its temp file; remove it (20 MiB each)
            (path.parent / name).unlink()
    print(f"kills={k} versions={len(seen)} interrupted={interrupted} save={proc.save_seconds:.3f}s seed={seed}")
    assert interrupted >= 5 and len(seen) >= 5, f"kills kept missing the saves (seed {seed})"


# ---------------------------------------------------------------------------------------------- errors


def _tree(v: int) -> dict[str, Any]:
    return {"version": v, "w": torch.arange(1000, dtype=torch.float32) * v, "b": torch.full((64,), v)}


def _committed(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "ckpt.safetensors"
    tk.save(_tree(1), path)
    return path, path.read_bytes()


def test_unsupported_object_leaves_previous_file_and_no_temp(tmp_path: Path) -> None:
    path, before = _committed(tmp_path)
    with pytest.raises(UnsupportedObjectError, match=r"config\.callback"):
        tk.save({**_tree(2), "config": {"callback": lambda: None}}, path)
    assert path.read_bytes() == before
    assert temp_files(tmp_path) == []
    assert tk.load(path)["version"] == 1


def _enospc(*args: Any, **kwargs: Any) -> Any:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["pwritev", "pwrite", "fsync", "replace"])
def test_error_while_writing_keeps_previous_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    path, before = _committed(tmp_path)
    real_pwrite = os.pwrite

    def partial_pwritev(fd: int, buffers: list[Any], offset: int) -> int:
        real_pwrite(fd, bytes(buffers[0]), offset)  # some data reached the temp file, then the disk filled up
        return _enospc()

    monkeypatch.setattr(os, where, partial_pwritev if where == "pwritev" else _enospc)
    with pytest.raises(OSError) as info:
        tk.save(_tree(2), path)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert temp_files(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]
    assert tk.load(path)["version"] == 1
    # and the next save works
    tk.save(_tree(3), path)
    assert tk.load(path)["version"] == 3


def test_error_on_first_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "pwritev", _enospc)
    with pytest.raises(OSError):
        tk.save(_tree(1), tmp_path / "new.safetensors")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- permissions


@pytest.fixture
def umask() -> Iterator[Any]:
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
@pytest.mark.parametrize("durable", [True, False])
def test_permissions_follow_umask(tmp_path: Path, umask: Any, mask: int, mode: int, durable: bool) -> None:
    umask(mask)
    path = tk.save(_tree(1), tmp_path / "ckpt.safetensors", durable=durable)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    tk.save(_tree(2), path, durable=durable)  # replacing keeps normal permissions too
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_default_permissions_are_not_private(tmp_path: Path, umask: Any) -> None:
    path = tk.save(_tree(1), tmp_path / "ckpt.safetensors")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # readable by group and others, like any file


# ---------------------------------------------------------------------------------------------- durability


def _fsync_spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    kinds: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        kinds.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return kinds


def test_durable_save_fsyncs_file_and_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kinds = _fsync_spy(monkeypatch)
    path = tk.save(_tree(1), tmp_path / "ckpt.safetensors")
    assert "file" in kinds and "dir" in kinds
    assert kinds.index("file") < kinds.index("dir")  # the data first, then the rename's directory entry
    assert tk.load(path)["version"] == 1


def test_durable_false_skips_fsync_and_still_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kinds = _fsync_spy(monkeypatch)
    path = tk.save(_tree(1), tmp_path / "ckpt.safetensors", durable=False)
    tk.save(_tree(2), path, durable=False)
    assert kinds == []
    loaded = tk.load(path)
    assert loaded["version"] == 2 and torch.equal(loaded["w"], _tree(2)["w"])
    assert temp_files(tmp_path) == []


def test_temp_file_lives_beside_the_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    moves: list[tuple[Path, Path]] = []
    real = os.replace

    def spy(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        moves.append((Path(src), Path(dst)))
        real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", spy)
    target = tmp_path / "run" / "ckpt.safetensors"
    tk.save(_tree(1), target)
    assert len(moves) == 1
    src, dst = moves[0]
    assert dst == target
    assert src.parent == target.parent  # same directory: the rename is atomic, never a cross-device copy
    assert src.name.startswith(".ckpt.safetensors.tmp-")


# ---------------------------------------------------------------------------------------------- replacing


def test_overwrite_replaces_atomically(tmp_path: Path) -> None:
    path = tk.save(_tree(1), tmp_path / "ckpt.safetensors")
    inode = path.stat().st_ino
    with tk.open(path) as old:  # a reader that opened version 1 before the overwrite
        tk.save(_tree(2), path)
        assert path.stat().st_ino != inode  # a new file was renamed over the old one
        assert torch.equal(old.get("w"), _tree(1)["w"])  # the reader still sees a whole version 1
    new = tk.load(path)
    assert new["version"] == 2 and torch.equal(new["w"], _tree(2)["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]


def test_save_onto_a_directory_refuses(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.safetensors"
    target.mkdir()
    with pytest.raises(IsADirectoryError):
        tk.save(_tree(1), target)
    assert list(target.iterdir()) == [] and temp_files(tmp_path) == []


def test_longest_file_name_saves(tmp_path: Path) -> None:
    """Any name the file system accepts for the target must work, though the temp name adds a few characters."""
    name = "c" * (255 - len(".safetensors")) + ".safetensors"  # NAME_MAX on Linux file systems
    (tmp_path / name).write_bytes(b"")  # the file system takes this name
    (tmp_path / name).unlink()
    path = tk.save(_tree(1), tmp_path / name)
    assert tk.load(path)["version"] == 1
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("call", ["load", "restore"])
def test_a_file_deleted_between_check_and_read_gives_the_typed_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    """Retention may delete a file while a reader opens it: the reader gets CheckpointNotFoundError."""
    path = tk.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "gone.safetensors")
    real_exists = Path.exists

    def exists_then_vanish(self: Path) -> bool:
        found = real_exists(self)
        if self == path and found:
            path.unlink()
        return found

    monkeypatch.setattr(Path, "exists", exists_then_vanish)
    with pytest.raises(tk.errors.CheckpointNotFoundError):
        if call == "load":
            tk.load(path)
        else:
            tk.restore(path, {"model": torch.nn.Linear(2, 2)})

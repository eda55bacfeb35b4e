"""Every kind of path a user can pass gets a typed error in bounded time: never a hang, never a bare OSError."""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import torchkeep as tk
from torchkeep.cli import app
from torchkeep.errors import CheckpointNotFoundError, CorruptCheckpointError, TorchkeepError, UnsupportedSourceError
from torchkeep.storage.files import CheckpointPermissionError, open_regular


def _fifo(d: Path) -> Path:
    p = d / "pipe.safetensors"
    os.mkfifo(p)
    return p


@pytest.fixture
def unix_socket(tmp_path: Path) -> Iterator[Path]:
    p = tmp_path / "sock.safetensors"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(p))
    try:
        yield p
    finally:
        s.close()


def _dangling(d: Path) -> Path:
    p = d / "gone.safetensors"
    p.symlink_to(d / "nowhere.safetensors")
    return p


def _dir_named_like_a_file(d: Path) -> Path:
    p = d / "ckpt.safetensors"
    p.mkdir()
    return p


def _empty_dir(d: Path) -> Path:
    p = d / "empty"
    p.mkdir()
    return p


MAKERS: dict[str, Callable[[Path], Path]] = {
    "fifo": _fifo,
    "dangling symlink": _dangling,
    "directory named like a checkpoint": _dir_named_like_a_file,
    "empty directory": _empty_dir,
    "/dev/zero": lambda d: Path("/dev/zero"),
    "/dev/null": lambda d: Path("/dev/null"),
}

CALLS: dict[str, Callable[[Path], Any]] = {
    "load": lambda p: tk.load(p),
    "restore": lambda p: tk.restore(p, {"model": torch.nn.Linear(2, 2)}),
    "open": lambda p: tk.open(p).close(),
    "inspect": lambda p: tk.inspect(p),
    "load_into": lambda p: tk.load_into(torch.nn.Linear(2, 2), p),
}

TYPED = (CorruptCheckpointError, CheckpointNotFoundError, UnsupportedSourceError)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_every_kind_of_path_gives_a_typed_error_without_hanging(tmp_path: Path, kind: str, call: str) -> None:
    path = MAKERS[kind](tmp_path)
    with pytest.raises(TYPED) as info:
        CALLS[call](path)
    assert str(path) in str(info.value)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_socket_gives_a_typed_error(unix_socket: Path, call: str) -> None:
    with pytest.raises(CorruptCheckpointError, match="a socket, not a regular file"):
        CALLS[call](unix_socket)


@pytest.mark.timeout(30)
def test_a_fifo_names_what_it_is(tmp_path: Path) -> None:
    with pytest.raises(CorruptCheckpointError, match=r"a FIFO \(named pipe\), not a regular file"):
        tk.load(_fifo(tmp_path))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "dangling symlink", "empty directory"])
def test_verify_reports_instead_of_hanging(tmp_path: Path, kind: str) -> None:
    path = MAKERS[kind](tmp_path)
    try:
        result = tk.verify(path)
    except TYPED:
        return
    assert result["ok"] is False and result["error"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("verb", ["inspect", "verify", "get"])
@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "dangling symlink"])
def test_the_cli_exits_2_with_one_line(tmp_path: Path, kind: str, verb: str) -> None:
    path = MAKERS[kind](tmp_path)
    args = [verb, str(path)] + (["w"] if verb == "get" else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_an_unreadable_file_is_a_typed_permission_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tk.save({"w": torch.ones(2)}, tmp_path / "c.safetensors")
    real_open = os.open

    def denied(p: Any, flags: int, *a: Any, **k: Any) -> int:
        if Path(p) == path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(p))
        return real_open(p, flags, *a, **k)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(CheckpointPermissionError) as info:
        tk.load(path)
    assert isinstance(info.value, PermissionError) and isinstance(info.value, TorchkeepError)
    assert str(path) in str(info.value) and "permission denied" in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_really_on_disk(tmp_path: Path) -> None:
    path = tk.save({"w": torch.ones(2)}, tmp_path / "c.safetensors")
    path.chmod(0)
    with pytest.raises(CheckpointPermissionError):
        tk.load(path)


def test_open_regular_refuses_a_link_when_told_not_to_follow(tmp_path: Path) -> None:
    target = tk.save({"w": torch.ones(2)}, tmp_path / "c.safetensors")
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    os.close(open_regular(link))  # followed by default
    with pytest.raises(CorruptCheckpointError, match="symbolic link"):
        open_regular(link, follow=False)


@pytest.mark.timeout(30)
def test_open_regular_leaves_the_descriptor_blocking(tmp_path: Path) -> None:
    path = tk.save({"w": torch.ones(2)}, tmp_path / "c.safetensors")
    fd = open_regular(path)
    try:
        assert os.get_blocking(fd)
        assert stat.S_ISREG(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


def test_scan_of_a_fifo_is_a_typed_error_not_a_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    with pytest.raises(CorruptCheckpointError, match=r"FIFO|pipe"):
        tk.scan(fifo)

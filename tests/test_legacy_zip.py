"""Zip sanity checks before any torch.load: bombs, lying size fields and garbage are refused cheaply."""

from __future__ import annotations

import struct
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

import torchkeep as tk
import torchkeep.container as container
from torchkeep.container import check_zip
from torchkeep.errors import CorruptCheckpointError
from torchkeep.scan import scan


@pytest.fixture
def no_torch_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("torch.load called on a file the zip checks should refuse")

    monkeypatch.setattr(torch, "load", forbidden)


def _real(tmp_path: Path) -> Path:
    path = tmp_path / "real.pt"
    torch.save({"w": torch.ones(4), "epoch": 1}, path)
    return path


def _refused(path: Path) -> CorruptCheckpointError:
    with pytest.raises(CorruptCheckpointError) as info:
        tk.load(path)
    assert str(path) in str(info.value)
    with pytest.raises(CorruptCheckpointError):
        tk.load(path, trust_pickle=True)
    with pytest.raises(CorruptCheckpointError):
        scan(path)
    return info.value


def test_real_torch_save_file_passes(tmp_path: Path) -> None:
    check_zip(_real(tmp_path))


def test_compressed_entries_are_refused(tmp_path: Path, no_torch_load: None) -> None:
    real = _real(tmp_path)
    path = tmp_path / "deflated.pt"
    with zipfile.ZipFile(real) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    assert "compressed" in _refused(path).reason


def test_deflate_bomb_is_refused_without_allocating(tmp_path: Path, no_torch_load: None) -> None:
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02}.")
        z.writestr("archive/data/0", b"\x00" * (64 << 20))  # 64 MiB of zeros in ~64 KiB
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        _refused(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak


def _patch_central(data: bytes, compress_size: int, file_size: int) -> bytes:
    at = data.rfind(b"PK\x01\x02")
    return data[: at + 20] + struct.pack("<2L", compress_size, file_size) + data[at + 28 :]


def test_size_fields_past_the_end_are_refused(tmp_path: Path, no_torch_load: None) -> None:
    real = _real(tmp_path).read_bytes()
    path = tmp_path / "liar.pt"
    path.write_bytes(_patch_central(real, 0x7FFF_FFFF, 0x7FFF_FFFF))
    assert "past the end" in _refused(path).reason


def test_stored_entry_with_differing_sizes_is_refused(tmp_path: Path, no_torch_load: None) -> None:
    real = _real(tmp_path).read_bytes()
    path = tmp_path / "liar2.pt"
    path.write_bytes(_patch_central(real, 1, 0x7FFF_FFFF))
    _refused(path)


def _overlapping_zip(n: int, payload: bytes) -> bytes:
    """One stored entry, then ``n`` central records that all point at it (the overlapping-files bomb)."""
    name = b"archive/data/0"
    crc = zipfile.crc32(payload)
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, crc, len(payload), len(payload), len(name), 0)
    body = local + name + payload
    central = b""
    for i in range(n):
        nm = b"archive/data/%d" % i
        central += (
            struct.pack(
                "<4s6H3L5H2L",
                b"PK\x01\x02",
                20,
                20,
                0,
                0,
                0,
                0,
                crc,
                len(payload),
                len(payload),
                len(nm),
                0,
                0,
                0,
                0,
                0,
                0,
            )
            + nm
        )
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, n, n, len(central), len(body), 0)
    return body + central + end


def test_overlapping_entries_are_refused(tmp_path: Path, no_torch_load: None) -> None:
    path = tmp_path / "overlap.pt"
    path.write_bytes(_overlapping_zip(200, b"\x00" * 100_000))
    assert path.stat().st_size < 200_000
    _refused(path)


def test_too_many_entries_are_refused(tmp_path: Path, no_torch_load: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(container, "MAX_ZIP_ENTRIES", 10)
    path = tmp_path / "many.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for i in range(20):
            z.writestr(f"archive/data/{i}", b"")
    assert "entries" in _refused(path).reason


def test_directory_claiming_more_entries_than_the_file_holds(tmp_path: Path, no_torch_load: None) -> None:
    path = tmp_path / "claims.pt"
    path.write_bytes(
        b"PK\x03\x04" + b"\x00" * 60 + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 60000, 60000, 40, 0, 0)
    )
    _refused(path)


@pytest.mark.parametrize(
    "data",
    [b"PK\x03\x04" + b"\x00" * 100, b"PK\x03\x04", b"PK\x03\x04" + bytes(range(256)) * 8],
    ids=["zeros", "magic", "noise"],
)
def test_garbage_after_the_zip_magic_is_refused(data: bytes, tmp_path: Path, no_torch_load: None) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(data)
    _refused(path)


def test_duplicate_entry_names_are_refused(tmp_path: Path, no_torch_load: None) -> None:
    path = tmp_path / "dup.pt"
    with pytest.warns(UserWarning), zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02}.")
        z.writestr("archive/data.pkl", b"\x80\x02}.")
    assert "twice" in _refused(path).reason

"""Damage a checkpoint file on disk, in place, the way a bad disk or a stray write would."""

from __future__ import annotations

from pathlib import Path


def flip(path: Path, offset: int, mask: int = 0x10) -> None:
    """XOR the byte at ``offset`` of ``path`` with ``mask`` (a negative offset counts from the end)."""
    with open(path, "r+b") as f:
        at = offset if offset >= 0 else f.seek(0, 2) + offset
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ mask]))

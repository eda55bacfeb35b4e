"""The bytes verified are the bytes used: a file rewritten in place between the checksum and the
copy (``cp``, ``rsync --inplace``, a save to the same path) never slips unverified bytes into
a restore, a ``load_into`` or a lazy read.

The rewrite is made to happen at the worst moment: right after the checksums were computed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import torchkeep as tk
from torchkeep import reader, sources
from torchkeep.errors import ChecksumMismatchError


def _model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    return model, opt


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, bytes, dict[str, torch.Tensor]]:
    """``(checkpoint, the bytes of another checkpoint of the same layout, the first one's weights)``."""
    a, opt_a = _model(0)
    b, opt_b = _model(1)
    path = tk.save({"model": a, "optimizer": opt_a}, tmp_path / "a.safetensors")
    other = tk.save({"model": b, "optimizer": opt_b}, tmp_path / "b.safetensors").read_bytes()
    assert len(other) == path.stat().st_size
    return path, other, {k: v.detach().clone() for k, v in a.state_dict().items()}


def _rewrite_in_place(path: Path, data: bytes) -> None:
    """Overwrite ``path`` from its first byte without truncating it, as ``rsync --inplace`` does."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)


def _rewrite_after_hashing(monkeypatch: pytest.MonkeyPatch, path: Path, data: bytes) -> list[int]:
    """Rewrite ``path`` in place (no truncation, as ``rsync --inplace``) just after each checksum pass."""
    done: list[int] = []
    original: Callable[..., Any] = reader.check_digests

    def check_then_rewrite(*args: Any, **kwargs: Any) -> None:
        original(*args, **kwargs)
        _rewrite_in_place(path, data)
        done.append(1)

    for module in ("torchkeep.reader", "torchkeep.mapped", "torchkeep.sources"):
        monkeypatch.setattr(f"{module}.check_digests", check_then_rewrite, raising=False)
    return done


def _same(model: torch.nn.Module, want: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


def test_restore_copies_the_bytes_it_verified(files: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path, other, want = files
    model, opt = _model(2)
    done = _rewrite_after_hashing(monkeypatch, path, other)
    tk.restore(path, {"model": model, "optimizer": opt})
    assert done, "the rewrite must have happened during the restore"
    assert _same(model, want), "restore copied bytes that were not the ones verified"


def test_load_into_copies_the_bytes_it_verified(files: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path, other, want = files
    model, _ = _model(2)
    done = _rewrite_after_hashing(monkeypatch, path, other)
    tk.load_into(model, path)
    assert done
    assert _same(model, want), "load_into copied bytes that were not the ones verified"


def test_lazy_reads_hand_out_the_bytes_they_verified(files: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path, other, want = files
    with sources.open_source(path) as src:
        lazy = src.tree["model"]["0.weight"]
        lazy.verify([lazy.stored])
        _rewrite_in_place(path, other)  # after the check, before the read
        assert torch.equal(lazy.load(), want["0.weight"])
        # a tensor not verified yet is read and checked when loaded: the rewritten file's own bytes
        # do not match this header's checksums
        with pytest.raises(ChecksumMismatchError):
            src.tree["model"]["1.weight"].load()


def _rewrite_at_first_read(monkeypatch: pytest.MonkeyPatch, path: Path, other: bytes) -> list[int]:
    """Rewrite ``path`` in place just before the first tensor read (its header was read from the first file)."""
    original = reader.read_into
    calls: list[int] = []

    def rewrite_then_read(fd: int, offset: int, bufs: Any) -> Any:
        if not calls:
            _rewrite_in_place(path, other)
        calls.append(1)
        return original(fd, offset, bufs)

    monkeypatch.setattr(reader, "read_into", rewrite_then_read)
    return calls


def test_restore_of_a_file_rewritten_while_read_is_refused_and_says_targets_were_partly_overwritten(
    files: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # restore reads straight into the live tensors, hashing each chunk as it lands: a file rewritten
    # in place meanwhile is still refused before restore returns, but the targets hold part of it
    path, other, _ = files
    model, opt = _model(2)
    calls = _rewrite_at_first_read(monkeypatch, path, other)
    with pytest.raises(ChecksumMismatchError, match="partly overwritten; restore another checkpoint"):
        tk.restore(path, {"model": model, "optimizer": opt})
    assert calls


def test_restore_refused_before_targets_are_read_leaves_them_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # untargeted tensors are read (and verified) before any target: a mismatch there touches nothing
    a, opt_a = _model(0)
    b, opt_b = _model(1)
    tree_a = {"ema": {"w": torch.arange(4.0)}, "model": a, "optimizer": opt_a}
    path = tk.save(tree_a, tmp_path / "a.safetensors")
    other = tk.save({"ema": {"w": torch.arange(4.0) + 1}, "model": b, "optimizer": opt_b}, tmp_path / "b.safetensors")
    model, opt = _model(2)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _rewrite_at_first_read(monkeypatch, path, other.read_bytes())
    with pytest.raises(ChecksumMismatchError, match="Nothing was loaded"):
        tk.restore(path, {"model": model, "optimizer": opt})
    assert _same(model, before)


def test_load_of_a_file_rewritten_while_read_is_refused(files: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path, other, _ = files
    calls = _rewrite_at_first_read(monkeypatch, path, other)
    with pytest.raises(ChecksumMismatchError):
        tk.load(path)
    assert calls


def test_load_into_of_a_file_rewritten_while_read_is_refused(files: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is checked over a map first (a damaged file touches nothing: test_sources), then read
    straight into the model; a rewrite between the two is caught as the bytes land, and said."""
    path, other, _ = files
    model, _ = _model(2)
    calls = _rewrite_at_first_read(monkeypatch, path, other)
    with pytest.raises(ChecksumMismatchError, match="partly overwritten"):
        tk.load_into(model, path)
    assert calls


def test_restore_returns_untargeted_tensors_in_memory_of_their_own(tmp_path: Path) -> None:
    model, opt = _model(0)
    path = tk.save({"model": model, "optimizer": opt, "ema": {"w": torch.arange(4.0)}}, tmp_path / "c.safetensors")
    got = tk.restore(path, {"model": _model(1)[0]})
    got["ema"]["w"].add_(1)  # writable, not a view of the file
    assert torch.equal(tk.load(path)["ema"]["w"], torch.arange(4.0))


def test_load_of_a_buffer_verifies_its_own_copy(tmp_path: Path) -> None:
    import io

    path = tk.save({"w": torch.arange(8.0)}, tmp_path / "c.safetensors")
    data = bytearray(path.read_bytes())
    got = tk.load(io.BytesIO(bytes(data)))
    assert torch.equal(got["w"], torch.arange(8.0))
    data[-1] ^= 1
    with pytest.raises(ChecksumMismatchError):
        tk.load(io.BytesIO(bytes(data)))

"""A run directory's stable path to its newest committed checkpoint: last.safetensors."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from typer.testing import CliRunner

import torchkeep as tk
from torchkeep.cli import app
from torchkeep.storage.runs import LocalRun


def test_last_names_the_newest_committed_checkpoint_through_saves_retention_and_reopen(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    last = tmp_path / "last.safetensors"
    with tk.CheckpointManager(tmp_path, keep_last=2) as mgr:
        assert not os.path.lexists(last)
        for step in range(4):
            info = mgr.save({"model": model, "step": step}, step=step)
            assert os.readlink(last) == info.file  # relative: the run directory can move
            assert tk.load(last)["step"] == step
    with tk.CheckpointManager(tmp_path, keep_last=2) as mgr:
        assert [c.step for c in mgr.checkpoints()] == [2, 3]  # the link is not taken for a checkpoint
        mgr.save({"model": model, "step": 4}, step=4)
    moved = tmp_path.parent / "moved-run"
    tmp_path.rename(moved)
    assert tk.load(moved / "last.safetensors")["step"] == 4
    result = CliRunner().invoke(app, ["inspect", str(moved / "last.safetensors"), "--json"])
    assert result.exit_code == 0 and '"step"' in result.stdout


def test_a_users_own_file_named_last_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "last.safetensors").write_bytes(b"mine")
    with tk.CheckpointManager(tmp_path) as mgr:
        mgr.save({"w": torch.ones(1)}, step=1)
    assert (tmp_path / "last.safetensors").read_bytes() == b"mine"


def test_point_last_for_directory_checkpoints_and_removal(tmp_path: Path) -> None:
    run = LocalRun(tmp_path)
    (tmp_path / "ckpt_000001.dcp").mkdir()
    (tmp_path / "ckpt_000002.safetensors").write_bytes(b"x")
    run.point_last("ckpt_000001.dcp")
    assert os.readlink(tmp_path / "last.dcp") == "ckpt_000001.dcp" and "last.dcp" not in run.names()
    run.point_last("ckpt_000002.safetensors")
    assert not os.path.lexists(tmp_path / "last.dcp")
    assert os.readlink(tmp_path / "last.safetensors") == "ckpt_000002.safetensors"
    run.point_last(None)
    assert not os.path.lexists(tmp_path / "last.safetensors")
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_a_link_left_half_made_by_a_killed_save_is_cleaned_on_open(tmp_path: Path) -> None:
    with tk.CheckpointManager(tmp_path) as mgr:
        mgr.save({"w": torch.ones(1)}, step=1)
    os.symlink("ckpt_000001.safetensors", tmp_path / ".last.safetensors.tmp-0123456789ab")
    (tmp_path / ".last.safetensors.tmp-fedcba987654").write_bytes(b"not a link: not ours")
    with tk.CheckpointManager(tmp_path):
        pass
    assert not os.path.lexists(tmp_path / ".last.safetensors.tmp-0123456789ab")
    assert (tmp_path / ".last.safetensors.tmp-fedcba987654").exists()

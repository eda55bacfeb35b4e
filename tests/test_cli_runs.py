"""`torchkeep ls` and `torchkeep prune` on a CheckpointManager run, in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import torchkeep as tk
from torchkeep.cli import app

runner = CliRunner()


def _run(tmp_path: Path, n: int = 6) -> Path:
    run = tmp_path / "run"
    model = torch.nn.Linear(4, 2)
    with tk.CheckpointManager(run, filename="e{step:03d}") as mgr:
        for step in range(n):
            mgr.save({"model": model}, step=step, metrics={"val_acc": [0.5, 0.9, 0.7, 0.6, 0.8, 0.55][step]})
    return run


def test_ls_lists_marks_and_verifies(tmp_path: Path) -> None:
    run = _run(tmp_path)
    result = runner.invoke(app, ["ls", str(run), "--monitor", "val_acc", "--json", "--verify"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["checkpoints"]
    assert [r["step"] for r in rows] == list(range(6))
    assert rows[-1]["marks"] == ["latest"] and rows[1]["marks"] == ["best"]
    assert all(r["verify"] == "ok" for r in rows)
    human = runner.invoke(app, ["ls", str(run), "--monitor", "val_acc"])
    assert human.exit_code == 0 and "e001.safetensors" in human.output and "best" in human.output
    # damage one file: --verify names it and exits 1
    f = run / "e002.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    damaged = runner.invoke(app, ["ls", str(run), "--verify"])
    assert damaged.exit_code == 1 and "DAMAGED" in damaged.output


def test_ls_works_without_a_manifest_and_on_a_missing_dir(tmp_path: Path) -> None:
    run = _run(tmp_path, 3)
    (run / "manifest.json").unlink()
    result = runner.invoke(app, ["ls", str(run), "--json"])
    assert result.exit_code == 0 and len(json.loads(result.output)["checkpoints"]) == 3
    missing = runner.invoke(app, ["ls", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "no such checkpoint" in missing.output


def test_prune_is_a_dry_run_unless_yes(tmp_path: Path) -> None:
    run = _run(tmp_path)
    (run / "notes.safetensors").write_bytes(b"not ours")  # never touched
    dry = runner.invoke(app, ["prune", str(run), "--keep-last", "2", "--keep-best", "1", "--monitor", "val_acc"])
    assert dry.exit_code == 0, dry.output
    assert "would delete 3 checkpoint(s)" in dry.output and len(list(run.glob("e*.safetensors"))) == 6
    done = runner.invoke(
        app, ["prune", str(run), "--keep-last", "2", "--keep-best", "1", "--monitor", "val_acc", "--yes"]
    )
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in run.glob("e*.safetensors")) == [
        "e001.safetensors",
        "e004.safetensors",
        "e005.safetensors",
    ]
    assert (run / "notes.safetensors").exists()
    assert runner.invoke(app, ["prune", str(run)]).exit_code == 2  # no rule given


def test_prune_refuses_while_a_job_holds_the_run(tmp_path: Path) -> None:
    run = _run(tmp_path, 2)
    with tk.CheckpointManager(run):
        result = runner.invoke(app, ["prune", str(run), "--keep-last", "1", "--yes"])
    assert result.exit_code == 2 and "lock" in result.output.lower()
    assert len(list(run.glob("e*.safetensors"))) == 2


def test_plot_writes_a_png_and_names_available_metrics(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run = _run(tmp_path)
    out = tmp_path / "out" / "curve.png"
    result = runner.invoke(app, ["plot", str(run), "--metric", "val_acc", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    wrong = runner.invoke(app, ["plot", str(run), "--metric", "loss", "-o", str(out)])
    assert wrong.exit_code == 2 and "val_acc" in wrong.output


def test_ls_verifies_sharded_checkpoint_directories(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model = torch.nn.Linear(4, 2)
    with tk.CheckpointManager(run, distributed=True) as mgr:  # .dcp directories, here as a single rank
        for step in range(2):
            mgr.save({"model": model}, step=step)
    result = runner.invoke(app, ["ls", str(run), "--json", "--verify"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["checkpoints"]
    assert [(r["file"], r["verify"]) for r in rows] == [("ckpt_000000.dcp", "ok"), ("ckpt_000001.dcp", "ok")]
    data = max(
        (p for p in (run / "ckpt_000001.dcp").iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size
    )
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    (run / "manifest.json").unlink()  # listed from the directories' own records
    result = runner.invoke(app, ["ls", str(run), "--json", "--verify"])
    assert result.exit_code == 1, result.output
    rows = json.loads(result.output)["checkpoints"]
    assert rows[0]["verify"] == "ok" and rows[1]["verify"].startswith("DAMAGED")


def test_ls_marks_the_best_the_manifest_records_without_monitor(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with tk.CheckpointManager(run, filename="e{step:03d}", monitor="val_acc") as mgr:
        for step, acc in enumerate([0.5, 0.9, 0.7]):
            mgr.save({"w": torch.ones(2)}, step=step, metrics={"val_acc": acc})
    rows = json.loads(runner.invoke(app, ["ls", str(run), "--json"]).stdout)["checkpoints"]
    assert [r["marks"] for r in rows] == [[], ["best"], ["latest"]]
    # --monitor still picks its own metric and direction
    rows = json.loads(runner.invoke(app, ["ls", str(run), "--json", "--monitor", "val_acc", "--mode", "min"]).stdout)
    assert [r["marks"] for r in rows["checkpoints"]] == [["best"], [], ["latest"]]
    human = runner.invoke(app, ["ls", str(run)], env={"COLUMNS": "80"})
    assert human.exit_code == 0 and "best" in human.output


@pytest.mark.parametrize("long", [False, True], ids=["short-names", "long-names"])
def test_ls_verify_at_80_columns_never_cuts_names_or_metrics(tmp_path: Path, long: bool) -> None:
    run = tmp_path / "run"
    template = "resnet50-imagenet-finetune-{step:06d}-{val_acc:.4f}" if long else "e{step:03d}"
    metrics = [{"val_acc": 0.912345 + s / 100, "train_loss_smoothed": 0.0123456 + s, "epoch": s} for s in range(3)]
    with tk.CheckpointManager(run, filename=template, monitor="val_acc") as mgr:
        for step in range(3):
            mgr.save({"w": torch.ones(100)}, step=step * 1000, metrics=metrics[step])
    damaged = sorted(run.glob("*.safetensors"))[1]
    raw = bytearray(damaged.read_bytes())
    raw[-2] ^= 1
    damaged.write_bytes(bytes(raw))
    result = runner.invoke(app, ["ls", str(run), "--verify"], env={"COLUMNS": "80"})
    assert result.exit_code == 1, result.output
    assert "…" not in result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines if str(run) not in line) <= 80  # the title names the (long) tmp path
    for p in sorted(q for q in run.glob("*.safetensors") if not q.is_symlink()):  # last.safetensors: a link
        assert any(p.name in line for line in lines), p.name  # whole, on one line
    for m in metrics:
        for k, v in m.items():
            text = f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            assert any(text in line for line in lines), text
    assert "DAMAGED" in result.output and "best" in result.output

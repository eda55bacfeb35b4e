"""Hugging Face Trainer: torchkeep checkpoints resume bit-exactly; stock checkpoints read with torchkeep."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("transformers", reason="pip install 'torchkeep[transformers]'")

sys.path.insert(0, str(Path(__file__).parent / "helpers"))

from hf_train import tiny_model, trainer

import torchkeep as tk
from torchkeep.integrations.transformers import (
    STATE_FILE,
    TorchkeepTrainer,
    TorchkeepTrainerMixin,
    restore_checkpoint,
)

pytestmark = pytest.mark.filterwarnings("ignore")


def _same_training_state(a: Any, b: Any) -> None:
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["state"].keys() == sb["state"].keys() and sa["state"]
    for k, st in sa["state"].items():
        for n, v in st.items():
            assert torch.equal(v, sb["state"][k][n]) if torch.is_tensor(v) else v == sb["state"][k][n], (k, n)
    assert a.lr_scheduler.state_dict()["last_epoch"] == b.lr_scheduler.state_dict()["last_epoch"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted run of 10 steps, one that checkpoints every 4 steps, with both trainers."""
    root = tmp_path_factory.mktemp("hf")
    whole = trainer(TorchkeepTrainer, root / "whole", save_steps=1000)
    whole.train()
    ours = trainer(TorchkeepTrainer, root / "ours")
    ours.train()
    stock_trainer = pytest.importorskip("transformers").Trainer
    stock = trainer(stock_trainer, root / "stock")
    stock.train()
    return {"root": root, "whole": whole, "ours": root / "ours", "stock": root / "stock"}


def test_import_torchkeep_does_not_import_transformers() -> None:
    code = (
        "import sys, torchkeep, torchkeep.integrations.transformers, torchkeep.integrations.accelerate; "
        "print(sorted(m for m in ('transformers', 'accelerate') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_checkpoint_holds_no_pickle(runs: dict[str, Any]) -> None:
    ckpt = runs["ours"] / "checkpoint-4"
    names = sorted(os.listdir(ckpt))
    assert STATE_FILE in names and "model.safetensors" in names and "training_args.json" in names
    assert not [n for n in names if n.endswith((".pt", ".pth", ".bin", ".pkl"))], names
    tree = tk.load(ckpt / STATE_FILE)
    assert {"optimizer", "scheduler", "rng"} <= set(tree)
    report = tk.load_into(tiny_model(), ckpt)  # the folder resolves to model.safetensors
    assert report.matched and not report.missing


@pytest.mark.parametrize("step", [4, 8])  # mid-epoch 0 and mid-epoch 1 (6 batches an epoch)
def test_resume_is_bitwise(runs: dict[str, Any], step: int, tmp_path: Path) -> None:
    resumed = trainer(TorchkeepTrainer, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(runs["ours"] / f"checkpoint-{step}"))
    _same_training_state(runs["whole"], resumed)


def test_rng_matters(runs: dict[str, Any], tmp_path: Path) -> None:
    """The control: the same resume without restoring the RNG (dropout) ends elsewhere."""

    class NoRng(TorchkeepTrainer):  # type: ignore[misc, valid-type]
        def _load_rng_state(self, checkpoint: str | None) -> None:
            pass

    resumed = trainer(NoRng, tmp_path / "norng")
    resumed.train(resume_from_checkpoint=str(runs["ours"] / "checkpoint-4"))
    with pytest.raises(AssertionError):
        _same_training_state(runs["whole"], resumed)


def test_mixin_resumes_a_stock_checkpoint(runs: dict[str, Any], tmp_path: Path) -> None:
    resumed = trainer(TorchkeepTrainer, tmp_path / "from_stock")
    resumed.train(resume_from_checkpoint=str(runs["stock"] / "checkpoint-4"))
    _same_training_state(runs["whole"], resumed)


def test_mixin_composes_with_a_trainer_subclass(tmp_path: Path) -> None:
    from transformers import Trainer

    class Mine(Trainer):  # a user's (or a library's) Trainer subclass
        pass

    class Kept(TorchkeepTrainerMixin, Mine):
        pass

    t = trainer(Kept, tmp_path / "k", max_steps=2, save_steps=2)
    t.train()
    assert (tmp_path / "k" / "checkpoint-2" / STATE_FILE).is_file()


def test_stock_files_load_without_pickle(runs: dict[str, Any]) -> None:
    ckpt = runs["stock"] / "checkpoint-4"
    report = tk.load_into(tiny_model(), ckpt)
    assert report.matched and not report.missing
    opt = tk.load(ckpt / "optimizer.pt")
    ref = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert opt["param_groups"] == ref["param_groups"]
    for k, st in ref["state"].items():
        assert all(torch.equal(opt["state"][k][n], v) for n, v in st.items() if torch.is_tensor(v))
    assert tk.load(ckpt / "scheduler.pt") == torch.load(ckpt / "scheduler.pt", weights_only=True)


def _fresh_objects(tmp_path: Path) -> tuple[Any, Any, Any]:
    """What a user rebuilds: the model, and the Trainer's optimizer (two groups) and scheduler."""
    from transformers import Trainer

    t = trainer(Trainer, tmp_path / "fresh")
    t.create_optimizer_and_scheduler(num_training_steps=10)
    return t.model, t.optimizer, t.lr_scheduler


@pytest.mark.parametrize("which", ["ours", "stock"])
def test_restore_checkpoint_weights_optimizer_scheduler(runs: dict[str, Any], which: str, tmp_path: Path) -> None:
    ckpt = runs[which] / "checkpoint-4"
    model, opt, sched = _fresh_objects(tmp_path)
    info = restore_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched)
    assert info["global_step"] == 4
    assert sched.last_epoch == 4
    assert all(len(s) for s in opt.state.values()) and len(opt.state) == len(list(model.parameters()))


@pytest.mark.parametrize("which", ["ours", "stock"])
def test_restore_checkpoint_rng(runs: dict[str, Any], which: str) -> None:
    """``rng_state.pth`` holds NumPy arrays: read without trust_pickle once legacy loading allows them."""
    ckpt = runs[which] / "checkpoint-4"
    if which == "stock":
        saved = torch.load(ckpt / "rng_state.pth", weights_only=False)
        torch.set_rng_state(saved["cpu"])
    else:
        tk.RNGState().load_state_dict(tk.load(ckpt / STATE_FILE)["rng"])
    expected = torch.rand(3)
    torch.manual_seed(12345)
    restore_checkpoint(ckpt, rng=True)
    assert torch.equal(torch.rand(3), expected)


def test_restore_checkpoint_takes_allow_globals_for_stock_files(runs: dict[str, Any], tmp_path: Path) -> None:
    import argparse
    import shutil

    ckpt = tmp_path / "checkpoint-4"
    shutil.copytree(runs["stock"] / "checkpoint-4", ckpt)
    sched_file = ckpt / "scheduler.pt"
    state = torch.load(sched_file, weights_only=True)
    torch.save({**state, "note": argparse.Namespace(why="a plain-data class")}, sched_file)
    _, _, sched = _fresh_objects(tmp_path)
    with pytest.raises(tk.errors.UnsafeCheckpointError, match=r"argparse\.Namespace"):
        restore_checkpoint(ckpt, scheduler=sched)
    restore_checkpoint(ckpt, scheduler=sched, allow_globals=["argparse.Namespace"])
    assert sched.last_epoch == 4

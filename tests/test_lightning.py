"""Lightning writes and resumes torchkeep checkpoints (torchkeep.integrations.lightning), with a
real ``lightning.Trainer`` on the CPU: tiny model with dropout, shuffled data, two epochs."""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lightning", reason="pip install 'torchkeep[lightning]'")

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_models import (
    Activation,
    CountingCallback,
    Head,
    SeededData,
    TinyModule,
    loaders,
    rich_hparams,
)

import torchkeep as tk
from torchkeep.errors import InvalidArgumentError, UnsupportedObjectError
from torchkeep.integrations.lightning import (
    RNG_KEY,
    TorchkeepCallback,
    TorchkeepCheckpointIO,
    load_lightning_module,
)
from torchkeep.kinds import detect

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")


@dataclasses.dataclass
class Run:
    model: TinyModule
    trainer: L.Trainer
    checkpoint: ModelCheckpoint
    counter: CountingCallback
    rng: torch.Tensor  # torch's global generator right after fit


def fit(
    dirpath: Path,
    max_epochs: int,
    ckpt_path: Path | None = None,
    *,
    io: TorchkeepCheckpointIO | None = None,
    hparams: dict[str, Any] | None = None,
    datamodule: L.LightningDataModule | None = None,
    monitor: str = "val_loss",
    mode: str = "min",
    model: TinyModule | None = None,
) -> Run:
    L.seed_everything(7, verbose=False)
    model = model or TinyModule(**(hparams or {}))
    checkpoint = ModelCheckpoint(dirpath=dirpath, save_top_k=2, monitor=monitor, mode=mode, save_last=True)
    counter = CountingCallback()
    trainer = L.Trainer(
        max_epochs=max_epochs,
        plugins=[io or TorchkeepCheckpointIO()],
        callbacks=[checkpoint, counter, TorchkeepCallback()],
        accelerator="cpu",
        devices=1,
        deterministic=True,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
    )
    if datamodule is None:
        train, val = loaders()
        trainer.fit(model, train, val, ckpt_path=ckpt_path)
    else:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return Run(model, trainer, checkpoint, counter, torch.get_rng_state())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted 2-epoch run, and a run stopped after epoch 1 then resumed to epoch 2."""
    root = tmp_path_factory.mktemp("lightning")
    whole = fit(root / "whole", 2)
    first = fit(root / "split", 1)
    resumed = fit(root / "split", 2, root / "split" / "last.ckpt")
    return {"root": root, "whole": whole, "first": first, "resumed": resumed}


def assert_same_training_state(a: Run, b: Run, same_tree: Any) -> None:
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert ka == kb
        assert va.dtype == vb.dtype and torch.equal(va, vb), f"weights differ: {ka}"
    same_tree(b.trainer.optimizers[0].state_dict(), a.trainer.optimizers[0].state_dict())
    same_tree(
        b.trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        a.trainer.lr_scheduler_configs[0].scheduler.state_dict(),
    )


def test_only_verified_torchkeep_files_are_written(runs: dict[str, Any]) -> None:
    for name in ("whole", "split"):
        files = sorted(p.name for p in (runs["root"] / name).iterdir())
        assert files == ["epoch=0-step=6.ckpt", "epoch=1-step=12.ckpt", "last.ckpt"], files
        for f in files:
            p = runs["root"] / name / f
            assert tk.verify(p)["ok"], p
            assert detect(p).kind == "torchkeep", p
            assert p.read_bytes()[:2] != b"PK"  # not a torch.save zip
    ck = tk.load(runs["root"] / "whole" / "last.ckpt")
    assert {"state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks", "hyper_parameters"} <= set(ck)
    assert ck["epoch"] == 1 and ck["global_step"] == 12
    assert set(ck[RNG_KEY]) >= {"python", "numpy", "torch"}


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(runs: dict[str, Any], same_tree: Any) -> None:
    whole, first, resumed = runs["whole"], runs["first"], runs["resumed"]
    assert first.model.steps == 6 and resumed.model.steps == 6  # the resumed run trained epoch 2 only
    assert resumed.trainer.global_step == whole.trainer.global_step == 12
    assert resumed.trainer.current_epoch == whole.trainer.current_epoch == 2
    assert_same_training_state(whole, resumed, same_tree)
    # callbacks' state (ModelCheckpoint's too) and the global generator where training ended
    assert resumed.counter.batches == whole.counter.batches == 12
    assert torch.equal(resumed.checkpoint.best_model_score, whole.checkpoint.best_model_score)
    assert sorted(Path(p).name for p in resumed.checkpoint.best_k_models) == sorted(
        Path(p).name for p in whole.checkpoint.best_k_models
    )
    assert torch.equal(resumed.rng, whole.rng)
    # and the files both runs wrote last hold the same training state
    a, b = tk.load(runs["root"] / "whole" / "last.ckpt"), tk.load(runs["root"] / "split" / "last.ckpt")
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "loops", RNG_KEY):
        same_tree(b[key], a[key])


def test_without_the_saved_generators_resume_differs(tmp_path: Path, runs: dict[str, Any]) -> None:
    """The control: Lightning itself saves no random generator state, so the dropout masks and
    the shuffle of epoch 2 differ when the plugin does not restore them."""
    fit(tmp_path, 1, io=TorchkeepCheckpointIO(rng=False))
    resumed = fit(tmp_path, 2, tmp_path / "last.ckpt", io=TorchkeepCheckpointIO(rng=False))
    whole = runs["whole"].model.state_dict()
    assert not all(torch.equal(v, whole[k]) for k, v in resumed.model.state_dict().items())


def test_a_dataloader_generator_resumes_through_the_datamodule_state(tmp_path: Path, same_tree: Any) -> None:
    """Lightning does not save a DataLoader's own generator; a datamodule that returns it from
    state_dict() gets it saved (torchkeep stores torch.Generator) and restored."""
    whole = fit(tmp_path / "whole", 2, datamodule=SeededData())
    fit(tmp_path / "split", 1, datamodule=SeededData())
    resumed = fit(tmp_path / "split", 2, tmp_path / "split" / "last.ckpt", datamodule=SeededData())
    assert_same_training_state(whole, resumed, same_tree)


def test_hyperparameters_round_trip(tmp_path: Path) -> None:
    tk.register_type(Head)
    tk.register_type(Activation)
    hparams = rich_hparams(tmp_path)
    run = fit(tmp_path / "ck", 1, hparams=hparams)
    last = tmp_path / "ck" / "last.ckpt"
    saved = tk.load(last)["hyper_parameters"]
    assert saved == {"lr": 0.05, "hidden": 16, "p": 0.3, **hparams}
    assert type(saved["args"]) is argparse.Namespace and isinstance(saved["data_dir"], Path)
    assert type(saved["head"]) is Head and saved["act"] is Activation.TANH and type(saved["tags"]) is set

    model = load_lightning_module(TinyModule, last, lr=0.01)
    assert type(model) is TinyModule and model.hparams.lr == 0.01 and model.hparams.head == Head(width=4)
    for k, v in run.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    # validate/test with ckpt_path= read through the plugin too
    trainer = L.Trainer(plugins=[TorchkeepCheckpointIO()], logger=False, enable_progress_bar=False)
    (metrics,) = trainer.validate(model, loaders()[1], ckpt_path=last, verbose=False)
    assert "val_loss" in metrics


def test_load_from_checkpoint_uses_torch_load_not_the_plugin(runs: dict[str, Any]) -> None:
    """Documented in docs/integrations.md: Lightning's load_from_checkpoint calls torch.load
    whatever the Trainer's CheckpointIO, so it cannot read torchkeep files; load_lightning_module can."""
    last = runs["root"] / "whole" / "last.ckpt"
    with pytest.raises(pickle.UnpicklingError):  # torch.load on a safetensors file
        TinyModule.load_from_checkpoint(last)
    model = load_lightning_module(TinyModule, last)
    for k, v in runs["whole"].model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    model.load_state_dict(tk.load(last)["state_dict"])  # the one-liner for a module you build yourself
    with open(last, "rb") as f:
        assert load_lightning_module(TinyModule, f).hparams.lr == 0.05


def test_unsavable_value_fails_at_fit_start(tmp_path: Path) -> None:
    model = TinyModule(loss_fn=torch.nn.functional.mse_loss)
    with pytest.raises(UnsupportedObjectError) as e:
        fit(tmp_path, 2, model=model)
    assert e.value.path == "hyper_parameters.loss_fn"
    assert "hyper_parameters.loss_fn" in str(e.value) and "fit start" in str(e.value)
    assert model.steps == 0  # no training step ran
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # and nothing was written


def test_remove_checkpoint_keeps_the_top_k(tmp_path: Path) -> None:
    removed: list[str] = []

    class Spy(TorchkeepCheckpointIO):
        def remove_checkpoint(self, path: Any) -> None:
            removed.append(Path(path).name)
            super().remove_checkpoint(path)

    run = fit(tmp_path, 3, io=Spy(), monitor="progress", mode="max")
    assert removed == ["epoch=0-step=6.ckpt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=1-step=12.ckpt", "epoch=2-step=18.ckpt", "last.ckpt"]
    assert sorted(Path(p).name for p in run.checkpoint.best_k_models) == [
        "epoch=1-step=12.ckpt",
        "epoch=2-step=18.ckpt",
    ]
    io = TorchkeepCheckpointIO()
    io.remove_checkpoint(tmp_path / "missing.ckpt")  # not an error
    (tmp_path / "sharded").mkdir()
    (tmp_path / "sharded" / "part").write_bytes(b"x")
    io.remove_checkpoint(tmp_path / "sharded")
    assert not (tmp_path / "sharded").exists()


def test_plugin_options(tmp_path: Path) -> None:
    io = TorchkeepCheckpointIO(metadata={"run": "exp1"}, durable=False)
    state = {"state_dict": {"w": torch.arange(3.0)}, "epoch": 0}
    io.save_checkpoint(state, tmp_path / "a.ckpt", storage_options={"metadata": {"note": "x"}})
    with tk.open(tmp_path / "a.ckpt") as ck:
        assert ck.metadata == {"run": "exp1", "note": "x"}
    back = io.load_checkpoint(tmp_path / "a.ckpt", weights_only=True)
    assert RNG_KEY not in back and torch.equal(back["state_dict"]["w"], torch.arange(3.0))
    with pytest.raises(InvalidArgumentError, match="storage_options"):
        io.save_checkpoint(state, tmp_path / "b.ckpt", storage_options={"bucket": "x"})
    with pytest.raises(InvalidArgumentError, match="local files"):
        io.save_checkpoint(state, "s3://bucket/b.ckpt")
    with pytest.raises(FileNotFoundError):
        io.load_checkpoint(tmp_path / "missing.ckpt")
    # a legacy torch.save checkpoint still resumes: tk.load reads it without running code
    torch.save(state, tmp_path / "old.ckpt")
    assert torch.equal(io.load_checkpoint(tmp_path / "old.ckpt")["state_dict"]["w"], torch.arange(3.0))


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_imports() -> None:
    """import torchkeep never imports Lightning; without Lightning the integration says what to install;
    with only pytorch_lightning imported, the plugin is that package's CheckpointIO (one interpreter: each
    start-up imports torch)."""
    r = _python(
        "import sys, tempfile, torch, torchkeep as tk\n"
        "tk.load(tk.save({'w': torch.zeros(1)}, tempfile.mktemp()))\n"
        "import torchkeep.integrations\n"
        "assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules), 'imported'\n"
        "sys.modules['lightning'] = sys.modules['pytorch_lightning'] = None\n"
        "try:\n"
        "    import torchkeep.integrations.lightning\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
        "del sys.modules['lightning'], sys.modules['pytorch_lightning']\n"
        "import pytorch_lightning as pl, lightning_fabric\n"
        "from torchkeep.integrations.lightning import TorchkeepCallback, TorchkeepCheckpointIO\n"
        "assert 'lightning' not in sys.modules\n"
        "assert isinstance(TorchkeepCheckpointIO(), lightning_fabric.plugins.CheckpointIO)\n"
        "assert isinstance(TorchkeepCallback(), pl.Callback)\n"
        "pl.Trainer(plugins=[TorchkeepCheckpointIO()], callbacks=[TorchkeepCallback()], logger=False)\n"
        "print('ok')\n"
    )
    assert r.returncode == 0, r.stderr
    assert "ImportError: torchkeep.integrations.lightning needs Lightning" in r.stdout
    assert "pip install 'torchkeep[lightning]'" in r.stdout and r.stdout.endswith("ok\n"), r.stdout

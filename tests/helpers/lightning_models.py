"""A tiny Lightning module and data for tests/test_lightning.py (imports lightning: import it
only after ``pytest.importorskip("lightning")``)."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import pathlib
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


class Activation(enum.Enum):
    RELU = "relu"
    TANH = "tanh"


@dataclasses.dataclass
class Head:
    width: int = 8
    bias: bool = True


class TinyModule(L.LightningModule):
    """Linear-dropout-linear with AdamW and StepLR; counts its training steps."""

    def __init__(self, lr: float = 0.05, hidden: int = 16, p: float = 0.3, **extra: Any) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Dropout(p), torch.nn.Linear(hidden, 1)
        )
        self.steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps += 1
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y))
        self.log("progress", float(self.global_step))  # grows every epoch: a monitor whose top-k is known

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class CountingCallback(L.Callback):
    """A callback with state (saved in each checkpoint's ``callbacks``)."""

    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_end(self, *args: Any) -> None:
        self.batches += 1

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches = state["batches"]


def dataset(n: int = 48, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g))


def loaders() -> tuple[DataLoader, DataLoader]:
    """Shuffled training data: the order comes from torch's global generator, which
    TorchkeepCheckpointIO saves and restores."""
    return DataLoader(dataset(), batch_size=8, shuffle=True), DataLoader(dataset(16, seed=1), batch_size=8)


def rich_hparams(tmp: pathlib.Path) -> dict[str, Any]:
    """Hyperparameters of the kinds Lightning users keep there (need the extended tree encoding)."""
    return {
        "args": argparse.Namespace(batch=8, name="run"),
        "data_dir": tmp / "data",
        "head": Head(width=4),
        "act": Activation.TANH,
        "tags": {"a", "b"},
    }


class SeededData(L.LightningDataModule):
    """Shuffles with its own generator and saves that generator's state in every checkpoint
    (Lightning saves a datamodule's ``state_dict()``; it does not save DataLoader generators)."""

    def __init__(self, seed: int = 3) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(dataset(), batch_size=8, shuffle=True, generator=self.generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(dataset(16, seed=1), batch_size=8)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"].get_state())

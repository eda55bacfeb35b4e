"""A tiny real Accelerate run for tests/test_accelerate.py: shuffled data, dropout, AdamW, a scheduler."""

from __future__ import annotations

from typing import Any

import torch


class Counter:
    """A ``register_for_checkpointing`` object: counts the batches it has seen."""

    def __init__(self) -> None:
        self.seen = 0
        self.total = torch.zeros(4)

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "total": self.total.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = int(state["seen"])
        self.total = state["total"].clone()


def build(seed: int = 0) -> dict[str, Any]:
    """A fresh Accelerator(cpu=True) with everything prepared (same seed, same initial weights)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    set_seed(seed)
    accelerator = Accelerator(cpu=True)
    g = torch.Generator().manual_seed(123)
    x = torch.randn(48, 8, generator=g)
    y = torch.randn(48, 4, generator=g)
    data = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Dropout(0.3), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    counter = Counter()
    accelerator.register_for_checkpointing(counter)
    return {
        "accelerator": accelerator,
        "model": model,
        "opt": opt,
        "loader": loader,
        "sched": sched,
        "counter": counter,
    }


def train(run: dict[str, Any], epochs: int) -> None:
    """``epochs`` full passes; every batch also draws from the Python and NumPy RNGs."""
    import random

    import numpy as np

    accelerator, model, opt, loader, sched, counter = (
        run[k] for k in ("accelerator", "model", "opt", "loader", "sched", "counter")
    )
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            noise = random.random() + float(np.random.rand())
            loss = torch.nn.functional.mse_loss(model(x), y) * (1.0 + 0.01 * noise)
            accelerator.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
            counter.seen += 1
            counter.total += x[:, :4].sum(0)

"""Subprocess program for tests/test_resume.py: train, checkpoint, resume in a fresh process.

Usage::

    python resume_train.py full   OUT  STEPS            # STEPS steps from scratch, write the final state
    python resume_train.py first  CKPT STEPS            # STEPS steps from scratch, write a checkpoint
    python resume_train.py resume CKPT OUT STEPS        # fresh objects (other seed), restore CKPT,
                                                        # STEPS more steps, write the final state

Every run builds the same model (dropout), a shuffling DataLoader with its own seeded
``torch.Generator``, Adam and a StepLR; ``resume`` seeds everything differently so only what
the checkpoint restores can make it agree with ``full``. The test also imports :func:`resume`
to show that leaving a target out of the restore makes the comparison fail.
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch

import torchkeep as tk

BATCH = 8
SAMPLES = 40  # 5 batches an epoch


def build(seed: int) -> dict:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    data = torch.Generator().manual_seed(1234)  # the data set itself never changes
    x = torch.randn(SAMPLES, 6, generator=data)
    y = (x @ torch.randn(6, 1, generator=data)).squeeze(1) + 0.1 * torch.randn(SAMPLES, generator=data)
    gen = torch.Generator().manual_seed(seed + 1)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=True, generator=gen
    )
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    return {"model": model, "optimizer": opt, "scheduler": sched, "generator": gen, "loader": loader}


def train(objs: dict, start_epoch: int, steps: int) -> tuple[int, list[float]]:
    """Train ``steps`` steps (a whole number of epochs); returns the next epoch and the losses."""
    model, opt, sched, loader = objs["model"], objs["optimizer"], objs["scheduler"], objs["loader"]
    if steps % len(loader):
        raise SystemExit(f"steps={steps} is not a whole number of epochs of {len(loader)} batches")
    losses: list[float] = []
    epoch = start_epoch
    model.train()
    while len(losses) < steps:
        for xb, yb in loader:
            opt.zero_grad()
            # a little Python and NumPy randomness too, so RNGState must carry them
            noise = random.random() * 1e-3 + float(np.random.rand()) * 1e-3
            loss = torch.nn.functional.mse_loss(model(xb).squeeze(1), yb) + noise
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        epoch += 1
    return epoch, losses


def final_state(objs: dict, losses: list[float], epoch: int) -> dict:
    return {
        "model": objs["model"],
        "optimizer": objs["optimizer"],
        "scheduler": objs["scheduler"],
        "losses": losses,
        "epoch": epoch,
    }


def resume(ckpt: str, steps: int, skip: tuple[str, ...] = ()) -> dict:
    """Fresh objects (another seed), restore ``ckpt`` except ``skip``, train ``steps`` more steps."""
    objs = build(seed=77)  # everything starts different
    targets = {
        "model": objs["model"],
        "optimizer": objs["optimizer"],
        "scheduler": objs["scheduler"],
        "rng": tk.RNGState(),
        "generator": objs["generator"],  # the very generator the fresh loader holds
    }
    for name in skip:
        del targets[name]
    state = tk.restore(ckpt, targets)
    epoch, losses = train(objs, state["epoch"], steps)
    return final_state(objs, losses, epoch)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["full", "first", "resume"])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--steps", type=int, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the same kernels in every process

    if args.mode == "full":
        (out,) = args.paths
        objs = build(seed=0)
        epoch, losses = train(objs, 0, args.steps)
        tk.save(final_state(objs, losses, epoch), out)
    elif args.mode == "first":
        (ckpt,) = args.paths
        objs = build(seed=0)
        epoch, _ = train(objs, 0, args.steps)
        tk.save(
            {
                "model": objs["model"],
                "optimizer": objs["optimizer"],
                "scheduler": objs["scheduler"],
                "rng": tk.RNGState(),
                "generator": objs["generator"],
                "epoch": epoch,
            },
            ckpt,
        )
    else:
        ckpt, out = args.paths
        tk.save(resume(ckpt, args.steps), out)


if __name__ == "__main__":
    main()

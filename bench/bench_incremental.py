"""Incremental checkpoints against full saves: disk used, save time, restore time.

Two workloads, in interleaved rounds (each round runs every method once, in the same order), and
the medians of the per-round ratios (the machine may be shared and noisy: ratios within one round
cancel most of the drift; absolute times do not):

* LoRA-style: a frozen base of ``--base-mib`` MiB and a trainable adapter of ``--adapter-mib`` MiB
  with its Adam state; ``--saves`` checkpoints through ``CheckpointManager(keep_last=5)``, with
  and without ``incremental=True``; beside them, ``torch.save`` of the same state (fsynced, as
  the manager's saves are) and a Lightning-style full checkpoint (``torch.save`` of
  ``{"state_dict", "optimizer_states", "epoch", "global_step"}``, fsynced).
* full fine-tuning: every parameter trains (half the bytes weights, half SGD momentum), so nothing
  can be linked: what incremental saving costs when it cannot help.

Restore is ``tk.restore`` of the newest checkpoint into the live model and optimizer (a resume);
load is ``tk.load`` of it.

Usage::

    python bench/bench_incremental.py                         # 1 GiB base, 8 MiB adapter, 20 saves
    python bench/bench_incremental.py --base-mib 128 --adapter-mib 2 --saves 8 --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import torchkeep as tk
from torchkeep.manager.shardset import physical_sizes


def lora_model(base_mib: int, adapter_mib: int, dim: int = 2048) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    layers = max(1, base_mib * (1 << 20) // (dim * dim * 4))
    rank = max(1, adapter_mib * (1 << 20) // (layers * 2 * dim * 4))
    model = torch.nn.Module()
    model.base = torch.nn.ModuleList(torch.nn.Linear(dim, dim, bias=False) for _ in range(layers)).requires_grad_(False)
    model.down = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(rank, dim) * 0.01) for _ in range(layers))
    model.up = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(dim, rank)) for _ in range(layers))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, opt


def full_model(mib: int, dim: int = 2048) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """``mib`` MiB of weights, all trained, with SGD + momentum (state as large as the weights)."""
    layers = max(1, mib * (1 << 20) // (dim * dim * 4) // 2)
    model = torch.nn.Sequential(*(torch.nn.Linear(dim, dim, bias=False) for _ in range(layers)))
    return model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)


def step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """One optimizer step with synthetic gradients (no forward: the bench measures checkpoints)."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p) * 1e-3
    opt.step()


def fsynced_torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def run_manager(root: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, saves: int, inc: bool) -> dict:
    run = root / ("inc" if inc else "full")
    times = []
    with tk.CheckpointManager(run, keep_last=5, incremental=inc) as mgr:
        for s in range(saves):
            step(model, opt)
            t0 = time.perf_counter()
            mgr.save({"model": model, "optimizer": opt}, step=s)
            times.append(time.perf_counter() - t0)
        names = [c.file for c in mgr.checkpoints()]
        latest = mgr.latest().path  # type: ignore[union-attr]
    disk = sum(physical_sizes(run, names))
    restores, loads = [], []
    for _ in range(3):  # a resume: restore into the live model and optimizer; and a plain load
        t0 = time.perf_counter()
        tk.restore(latest, {"model": model, "optimizer": opt})
        restores.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tk.load(latest)
        loads.append(time.perf_counter() - t0)
    shutil.rmtree(run)
    return {
        "first": times[0],
        "later": statistics.median(times[1:]),
        "disk": disk,
        "restore": statistics.median(restores),
        "load": statistics.median(loads),
    }


def pair(root: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, saves: int, flip: bool) -> tuple[dict, dict]:
    """Incremental and full runs of the same model, in alternating order from round to round (the
    first of two runs pays for the other's dirty pages still being written back)."""
    if flip:
        full = run_manager(root, model, opt, saves, False)
        return run_manager(root, model, opt, saves, True), full
    inc = run_manager(root, model, opt, saves, True)
    return inc, run_manager(root, model, opt, saves, False)


def one_round(args: argparse.Namespace, root: Path, flip: bool) -> dict:
    model, opt = lora_model(args.base_mib, args.adapter_mib)
    step(model, opt)
    base = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    adapter_state = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) * 3
    inc, full = pair(root, model, opt, args.saves, flip)
    t0 = time.perf_counter()
    fsynced_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict()}, root / "t.pt")
    torch_save = time.perf_counter() - t0
    lightning = {"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()], "epoch": 1}
    t0 = time.perf_counter()
    fsynced_torch_save({**lightning, "global_step": 10, "pytorch-lightning_version": "2"}, root / "l.ckpt")
    lightning_save = time.perf_counter() - t0
    for f in ("t.pt", "l.ckpt"):
        (root / f).unlink()
    del model, opt
    fmodel, fopt = full_model(args.base_mib)
    finc, ffull = pair(root, fmodel, fopt, 6, flip)
    return {
        "lora": {"incremental": inc, "full": full, "torch_save": torch_save, "lightning_save": lightning_save},
        "lora_disk_goal": 1.1 * (base + 5 * adapter_state),
        "full_finetune": {"incremental": finc, "full": ffull},
        "ratios": {
            "disk_vs_goal_base_plus_5_adapters": inc["disk"] / (base + 5 * adapter_state),
            "disk_incremental_vs_full": inc["disk"] / full["disk"],
            "save_vs_full_durable_save": inc["later"] / full["later"],
            "save_vs_torch_save": inc["later"] / torch_save,
            "save_vs_lightning_save": inc["later"] / lightning_save,
            "restore_vs_full": inc["restore"] / full["restore"],
            "load_vs_full": inc["load"] / full["load"],
            "full_finetune_save_vs_full": finc["later"] / ffull["later"],
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-mib", type=int, default=1024)
    ap.add_argument("--adapter-mib", type=int, default=8)
    ap.add_argument("--saves", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tk-bench-inc-", dir=args.dir))
    rounds = []
    try:
        for r in range(args.rounds):
            rounds.append(one_round(args, root, flip=r % 2 == 1))
            print(f"round {r}: " + ", ".join(f"{k}={v:.3f}" for k, v in rounds[-1]["ratios"].items()), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    medians = {k: statistics.median(r["ratios"][k] for r in rounds) for k in rounds[0]["ratios"]}
    print("medians of ratios:", json.dumps(medians, indent=2))
    last = rounds[-1]["lora"]
    print(
        f"last round, LoRA: incremental save {last['incremental']['later'] * 1e3:.0f} ms (first "
        f"{last['incremental']['first'] * 1e3:.0f} ms), full save {last['full']['later'] * 1e3:.0f} ms, "
        f"torch.save {last['torch_save'] * 1e3:.0f} ms, Lightning-style {last['lightning_save'] * 1e3:.0f} ms; "
        f"disk {last['incremental']['disk'] / 2**20:.0f} MiB vs {last['full']['disk'] / 2**20:.0f} MiB"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rounds": rounds, "medians": medians}, indent=2))


if __name__ == "__main__":
    main()

"""One rank of the distributed checkpoint tests: ``python dist_worker.py SCENARIO OUT`` with RANK/WORLD_SIZE/MASTER_PORT set.

Scenarios write what they observed into OUT (torchkeep files and ``checks-<rank>.json``); the
tests compare. Models are FSDP2 (``fully_shard``) or DDP on CPU with gloo.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from dist_launch import init_rank
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

import torchkeep as tk
import torchkeep.distributed as tkd
import torchkeep.distributed.checkpoint as tkdc

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6), torch.nn.Linear(6, 4))


def fsdp(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def ddp(model: torch.nn.Module) -> torch.nn.Module:
    return torch.nn.parallel.DistributedDataParallel(model)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int = 2) -> None:
    g = torch.Generator().manual_seed(100 + dist.get_rank())
    for _ in range(steps):
        loss = model(torch.randn(5, 8, generator=g)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


def full(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The gathered model and optimizer state (on rank 0; collective)."""
    return {
        "model": get_model_state_dict(model, options=FULL),
        "optimizer": get_optimizer_state_dict(model, opt, options=FULL),
    }


def fresh(wrap) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = wrap(net())
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # so a restore that does nothing cannot pass
    return model, torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.1)


def save2(out: Path) -> dict:
    rank = dist.get_rank()
    checks: dict = {}
    for name, wrap in (("fsdp", fsdp), ("ddp", ddp)):
        model = wrap(net())
        opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.1)
        train(model, opt)
        torch.manual_seed(1000 + rank)
        state = {"model": model, "optimizer": opt, "epoch": 5, "config": {"lr": 0.01}, "rng": tk.RNGState()}
        tkd.save(state, out / name)
        ref = full(model, opt)
        if rank == 0:
            tk.save(ref, out / f"ref-{name}.safetensors")
        checks[f"{name}-after-save"] = torch.rand(3).tolist()
        # same world size: the RNG comes back per rank, the state bitwise
        m2, o2 = fresh(wrap)
        torch.manual_seed(7)
        got = tkd.restore(out / name, {"model": m2, "optimizer": o2, "rng": tk.RNGState()})
        checks[f"{name}-after-restore"] = torch.rand(3).tolist()
        checks[f"{name}-epoch"] = got["epoch"]
        back = full(m2, o2)
        if rank == 0:
            tk.save(back, out / f"same-{name}.safetensors")
    # 1 -> 2: the single-process checkpoint the test wrote, into FSDP2 shards
    m3, o3 = fresh(fsdp)
    tkd.restore(out / "ws1", {"model": m3, "optimizer": o3})
    back = full(m3, o3)
    if rank == 0:
        tk.save(back, out / "from1.safetensors")
    # async: mutating right after return does not reach the checkpoint
    model = fsdp(net())
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    train(model, opt, 1)
    before = full(model, opt)
    job = tkd.save({"model": model, "optimizer": opt}, out / "async", async_save=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    checks["async-result"] = str(job.result(timeout=60))
    m4, o4 = fresh(fsdp)
    tkd.restore(out / "async", {"model": m4, "optimizer": o4})
    after = full(m4, o4)
    if rank == 0:
        checks["async-equal"] = all(torch.equal(after["model"][k], v) for k, v in before["model"].items())
    # async: a rank failing to write makes every rank's result() raise, and nothing is committed
    original = tkdc._Writer.write_data

    def broken(self, plan, planner):
        if rank == 1:
            raise OSError("disk on fire")
        return original(self, plan, planner)

    tkdc._Writer.write_data = broken
    job = tkd.save({"model": model}, out / "broken", async_save=True)
    try:
        job.result(timeout=60)
        checks["async-error"] = None
    except Exception as e:
        checks["async-error"] = f"{type(e).__name__}: {e}"
    tkdc._Writer.write_data = original
    checks["broken-exists"] = (out / "broken").exists()
    return checks


def restore4(out: Path) -> dict:
    checks: dict = {}
    for name, wrap in (("fsdp", fsdp), ("ddp", ddp)):
        model, opt = fresh(wrap)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = tkd.restore(out / name, {"model": model, "optimizer": opt, "rng": tk.RNGState()})
        checks[f"{name}-warned"] = [str(w.message) for w in caught if issubclass(w.category, tkd.RankStateWarning)]
        checks[f"{name}-epoch"] = got["epoch"]
        back = full(model, opt)
        if dist.get_rank() == 0:
            tk.save(back, out / f"at4-{name}.safetensors")
    return checks


def killed(out: Path) -> dict:
    if dist.get_rank() == 1:
        original = tkdc._Writer.write_data

        def die(self, plan, planner):
            fut = original(self, plan, planner)  # this rank's shard is on disk, nothing committed yet
            os.kill(os.getpid(), signal.SIGKILL)
            return fut

        tkdc._Writer.write_data = die
    model = fsdp(net())
    tkd.save({"model": model}, out / "ckpt")
    return {}


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    rank = init_rank()
    try:
        checks = {"save2": save2, "restore4": restore4, "killed": killed}[scenario](out)
        (out / f"checks-{scenario}-{rank}.json").write_text(json.dumps(checks))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

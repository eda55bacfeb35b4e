"""One rank of the distributed CheckpointManager tests: ``python dist_manager_worker.py manager OUT``.

RANK/WORLD_SIZE/MASTER_PORT come from the environment (``dist_launch.launch``). The job saves an
FSDP2 model through a CheckpointManager on every rank, reopens and restores, corrupts the newest
checkpoint and restores again, and runs asynchronous saves (one with an injected failure). Each
rank writes what it saw into ``OUT/checks-manager-<rank>.json``; rank 0 also writes the gathered
model and optimizer state at each step (``ref-<step>.safetensors``) and after each restore.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from dist_launch import init_rank

import torchkeep as tk
import torchkeep.distributed.checkpoint as tkdc
from torchkeep.manager import CheckpointSkippedWarning, manifest

sys.path.insert(0, str(Path(__file__).parent))
from dist_worker import fresh, fsdp, full, net, train

ACCS = [0.5, 0.9, 0.6, 0.7, 0.65]


def _view(mgr: tk.CheckpointManager) -> dict:
    best, latest = mgr.best(), mgr.latest()
    return {
        "files": [c.file for c in mgr.checkpoints()],
        "latest": latest.file if latest else None,
        "best": best.file if best else None,
        "metrics": [c.metrics for c in mgr.checkpoints()],
        "sizes": [c.size for c in mgr.checkpoints()],
    }


def _dirs(run: Path) -> list[str]:
    return sorted(n for n in os.listdir(run) if n.endswith(".dcp") and n != "last.dcp")  # last.dcp: a link


def _save_full(model: torch.nn.Module, opt: torch.optim.Optimizer, path: Path) -> None:
    state = full(model, opt)  # collective
    if dist.get_rank() == 0:
        tk.save(state, path)


def saves(out: Path, run: Path, checks: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    rank = dist.get_rank()
    model = fsdp(net())
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.1)
    mgr = tk.CheckpointManager(run, keep_last=2, keep_best=1, monitor="acc")
    checks["mode"] = mgr._dist
    deletes: list[dict] = []
    if rank == 0:  # observe each deletion: what did the manifest on disk say at that moment?
        store, real = mgr._store, mgr._store.delete

        def delete(name: str) -> None:
            listed = [e["file"] for e in json.loads((run / manifest.MANIFEST).read_bytes())["entries"]]
            deletes.append({"name": name, "listed": listed, "was_dir": (run / name).is_dir()})
            real(name)
            deletes[-1]["gone"] = not (run / name).exists()

        store.delete = delete
    steps = []
    for step, acc in enumerate(ACCS):
        train(model, opt, steps=1)
        _save_full(model, opt, out / f"ref-{step}.safetensors")
        # rank 1 reports other metrics: rank 0's are the ones recorded
        info = mgr.save({"model": model, "optimizer": opt, "epoch": step}, step=step, metrics={"acc": acc + rank})
        dist.barrier()
        steps.append(
            {"file": info.file, "step": info.step, "info_metrics": info.metrics, **_view(mgr), "dirs": _dirs(run)}
        )
    checks["steps"] = steps
    checks["deletes"] = deletes
    mgr.close()
    return model, opt


def reopen(out: Path, run: Path, checks: dict) -> None:
    rank = dist.get_rank()
    if rank == 0:  # leftovers of a killed distributed save: ours (cleaned on open) and someone else's
        for name in (".ckpt_000009.dcp.tmp-0123456789ab", ".ckpt_000010.dcp.old-abcd1234", ".notours.tmp-01"):
            (run / name).mkdir()
            (run / name / "__0_0.distcp").write_bytes(b"x" * 10)
    dist.barrier()
    mgr = tk.CheckpointManager(run, keep_last=2, keep_best=1, monitor="acc")
    checks["reopened"] = _view(mgr)
    checks["after_open_hidden"] = sorted(n for n in os.listdir(run) if n.startswith("."))
    model, opt = fresh(fsdp)
    info = mgr.restore({"model": model, "optimizer": opt})
    checks["restored"] = info.file if info else None
    _save_full(model, opt, out / "restored-latest.safetensors")

    dist.barrier()
    if rank == 0:  # flip one byte in the newest checkpoint's largest shard file
        newest = run / mgr.latest().file
        shard = max((p for p in newest.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    dist.barrier()
    model, opt = fresh(fsdp)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = mgr.restore({"model": model, "optimizer": opt})
    checks["fallback"] = info.file if info else None
    checks["skipped_warnings"] = [str(w.message) for w in caught if issubclass(w.category, CheckpointSkippedWarning)]
    _save_full(model, opt, out / "restored-fallback.safetensors")
    try:
        mgr.restore({"model": model, "optimizer": opt}, strict=True)
        checks["strict_error"] = None
    except Exception as e:
        checks["strict_error"] = type(e).__name__
    mgr.close()


def asynchronous(out: Path, checks: dict) -> None:
    rank = dist.get_rank()
    run = out / "run-async"
    model = fsdp(net())
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    mgr = tk.CheckpointManager(run, keep_last=1, async_save=True)
    lagging = []
    for step in range(3):
        train(model, opt, steps=1)
        info = mgr.save({"model": model, "optimizer": opt}, step=step)
        latest = mgr.latest()  # indexed at the next call: the previous save
        lagging.append([info.file, latest.file if latest else None])
    mgr.wait()
    checks["async_lagging"] = lagging
    checks["async_after_wait"] = {**_view(mgr), "dirs": _dirs(run)}

    real = tkdc.write_manifest
    if rank == 0:

        def broken(*args: object, **kwargs: object) -> None:
            raise OSError(28, "injected: no space left on device")

        tkdc.write_manifest = broken
    try:
        mgr.save({"model": model, "optimizer": opt}, step=3)
        try:
            mgr.wait()
            checks["async_error"] = None
        except Exception as e:
            checks["async_error"] = type(e).__name__
    finally:
        tkdc.write_manifest = real
    mgr.save({"model": model, "optimizer": opt}, step=4)
    mgr.close()
    checks["async_final"] = {**_view(mgr), "dirs": _dirs(run)}
    checks["async_hidden"] = sorted(n for n in os.listdir(run) if n.startswith(".") and n != ".lock")


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    rank = init_rank()
    try:
        assert scenario == "manager", scenario
        checks: dict = {}
        run = out / "run"
        saves(out, run, checks)
        reopen(out, run, checks)
        asynchronous(out, checks)
        (out / f"checks-{scenario}-{rank}.json").write_text(json.dumps(checks))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

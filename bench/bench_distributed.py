"""Benchmark sharded saves: torchkeep.distributed on 2 ranks vs plain ``dcp.save`` and a single-process ``tk.save``.

Run it::

    .venv/bin/python bench/bench_distributed.py              # ~1 GiB model, 3 repeats
    .venv/bin/python bench/bench_distributed.py --gib 0.25 --repeat 1   # quick

The parent process times ``torchkeep.save`` of the whole model (one process, one file),
then starts 2 ranks (gloo on 127.0.0.1, CPU) that shard the model with FSDP2 and time,
interleaved per repeat: ``torchkeep.distributed.save`` (manifest, checksums, commit by
rename), plain ``torch.distributed.checkpoint.save``, and the matching restores
(``torchkeep.distributed.restore`` verifies every file first; ``dcp.load`` does not).
All saves are durable (fsync); ``os.sync()`` runs untimed before each. The table shows
medians and the ratio to plain DCP (torchkeep's integrity overhead, target < 1.15).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

LAYER = 4096


def build(gib: float) -> torch.nn.Module:
    n = max(1, round(gib * (1 << 30) / (LAYER * LAYER * 4)))
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(LAYER, LAYER, bias=False) for _ in range(n)])


def timed(fn) -> float:
    os.sync()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def rank_main(gib: float, repeat: int, root: Path) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import torchkeep.distributed as tkd

    rank = int(os.environ["RANK"])
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=600),
    )
    model = build(gib)
    mesh = init_device_mesh("cpu", (2,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    times: dict[str, list[float]] = {"tk_save": [], "dcp_save": [], "tk_restore": [], "dcp_load": []}

    def tk_save(d: Path) -> None:
        tkd.save({"model": model}, d)

    def dcp_save(d: Path) -> None:
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(d))

    def tk_restore(d: Path) -> None:
        tkd.restore(d, {"model": model})

    def dcp_load(d: Path) -> None:
        dcp.load({"model": get_model_state_dict(model)}, checkpoint_id=str(d))

    for i in range(repeat):
        dirs = {"tk": root / f"tk-{i}", "dcp": root / f"dcp-{i}"}
        order = ["tk", "dcp"] if i % 2 == 0 else ["dcp", "tk"]  # alternate, so neither always goes first
        for phase in ("save", "load"):
            for who in order:
                fn = {("tk", "save"): tk_save, ("dcp", "save"): dcp_save}.get((who, phase))
                fn = fn or {"tk": tk_restore, "dcp": dcp_load}[who]
                name = {("tk", "save"): "tk_save", ("dcp", "save"): "dcp_save"}.get((who, phase))
                name = name or {"tk": "tk_restore", "dcp": "dcp_load"}[who]
                dist.barrier()
                times[name].append(timed(lambda fn=fn, d=dirs[who]: fn(d)))
        dist.barrier()
        if rank == 0:
            for d in dirs.values():
                shutil.rmtree(d)
    if rank == 0:
        (root / "times.json").write_text(json.dumps(times))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()
    import torchkeep as tk

    root = Path(tempfile.mkdtemp(prefix="tk-bench-dist-", dir=args.dir))
    try:
        model = build(args.gib)
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        single = []
        for i in range(args.repeat):
            target = root / f"single-{i}.safetensors"
            single.append(timed(lambda target=target, m=model: tk.save({"model": m}, target)))
            target.unlink()
        del model
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--rank-worker", str(args.gib), str(args.repeat), str(root)],
                env={**os.environ, "RANK": str(r), "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo"},
            )
            for r in range(2)
        ]
        try:
            codes = [p.wait(timeout=3600) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if any(codes):
            raise SystemExit(f"a rank failed: exit codes {codes}")
        times = json.loads((root / "times.json").read_text())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    single_med = statistics.median(single)
    gib = nbytes / (1 << 30)
    print(f"model: {gib:.2f} GiB float32, 2 ranks (FSDP2, gloo, CPU), median of {args.repeat}\n")
    print("| operation | seconds | GiB/s | vs plain DCP |")
    print("|---|---:|---:|---:|")
    rows = [
        ("tk.save, 1 process, 1 file", single_med, None),
        ("dcp.save, 2 ranks", med["dcp_save"], med["dcp_save"]),
        ("tkd.save, 2 ranks (manifest + commit)", med["tk_save"], med["dcp_save"]),
        ("dcp.load, 2 ranks", med["dcp_load"], med["dcp_load"]),
        ("tkd.restore, 2 ranks (verify + load)", med["tk_restore"], med["dcp_load"]),
    ]
    for name, t, base in rows:
        ratio = f"{t / base:.2f}x" if base else "-"
        print(f"| {name} | {t:.3f} | {gib / t:.2f} | {ratio} |")
    print(f"\ntkd.save / tk.save (1 process): {med['tk_save'] / single_med:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-worker":
        rank_main(float(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
    else:
        main()

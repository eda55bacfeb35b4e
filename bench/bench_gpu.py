"""GPU save/load: a model living on the accelerator, saved and loaded back onto it.

Measures, median of ``--repeat`` runs, for a ~1 GiB float32 model (``--scale`` scales it):
torchkeep ``save`` from the device (``durable=False``: the page cache, not the disk, is
compared) vs ``torch.save`` and ``safetensors.save_file``; loads onto the device
(``map_location="cuda"``) vs ``torch.load(map_location="cuda")`` and
``safetensors.load_file(device="cuda")``; and ``tk.restore`` into the model on the device
vs ``torch.load`` + ``load_state_dict``. Prints a table of medians and ratios, and the
page-locked host memory one torchkeep save used at its peak (two staging buffers, not a copy
of the model).

Run it where CUDA is available (``bash bench/gpu_check.sh`` does, with the CUDA tests)::

    python bench/bench_gpu.py               # cuda, 1 GiB
    python bench/bench_gpu.py --device cpu --scale 0.01   # a dry run anywhere
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import torchkeep as tk


def timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="device the model lives on (default cuda)")
    ap.add_argument("--scale", type=float, default=1.0, help="model size multiplier (1.0: ~1 GiB)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here; run with --device cpu for a dry run", file=sys.stderr)
        return 2
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    width = max(8, int(1638 * args.scale**0.5))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(100)]).to(dev)
    sd = model.state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TK_BENCH_DIR")) as d:
        tkp, ptp, stp = Path(d, "m.safetensors"), Path(d, "m.pt"), Path(d, "m.st")
        saves = {
            "save: torchkeep (durable=False)": lambda: tk.save({"model": model}, tkp, durable=False),
            "save: torch.save": lambda: torch.save({"model": model.state_dict()}, ptp),
            "save: safetensors save_file": lambda: safetensors.torch.save_file(model.state_dict(), stp),
        }
        loc = str(dev)
        loads = {
            "load: torchkeep (verify)": lambda: tk.load(tkp, map_location=loc),
            "load: torch.load": lambda: torch.load(ptp, map_location=loc, weights_only=True),
            "load: safetensors load_file": lambda: safetensors.torch.load_file(stp, device=loc),
            "restore: torchkeep into the model": lambda: tk.restore(tkp, {"model": model}),
            "restore: torch.load + load_state_dict": lambda: model.load_state_dict(
                torch.load(ptp, map_location=loc, weights_only=True)["model"]
            ),
        }
        for _ in range(args.repeat):
            for name, fn in {**saves, **loads}.items():
                rows.setdefault(name, []).append(timed(fn, sync))
        counted = dev.type == "cuda" and hasattr(torch.cuda, "reset_peak_host_memory_stats")  # newer torch only
        pinned = pinned_peak(lambda: tk.save({"model": model}, tkp, durable=False)) if counted else None
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"torchkeep {tk.__version__} | torch {torch.__version__} | device {dev}", end="")
    print(f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "")
    print(f"model: {nbytes / 2**30:.2f} GiB float32, {len(sd)} tensors; median of {args.repeat}\n")
    print(f"| {'operation':<40} | median s |  GB/s | torchkeep faster by |")
    print(f"|{'-' * 42}|----------|-------|---------------------|")
    for name, s in med.items():
        kind = name.split(":")[0]
        ours = next(v for k, v in med.items() if k.startswith(kind) and "torchkeep" in k)
        ratio = f"{s / ours:.2f}x" if "torchkeep" not in name else ""
        print(f"| {name:<40} | {s:8.3f} | {nbytes / s / 1e9:5.2f} | {ratio:>19} |")
    if pinned is not None:
        print(f"\npage-locked host memory in use at the peak of one torchkeep save: {pinned / 2**20:.1f} MiB")
    return 0


def pinned_peak(fn: Callable[[], object]) -> int:
    """The most page-locked host memory (PyTorch's caching host allocator, blocks in use) while ``fn`` runs."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_host_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.host_memory_stats().get("active_bytes.peak", 0))


if __name__ == "__main__":
    sys.exit(main())

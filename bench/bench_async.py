"""Training-loop stall of an asynchronous save vs a synchronous one (W3: ~1 GiB model + Adam state).

Measures, median of ``--repeat`` runs:

- **async stall**: the time ``AsyncWriter.submit`` keeps the training loop waiting — the
  consistent snapshot of model + optimizer into host buffers reused across saves (the write
  itself runs in the background and is waited for, untimed, between repeats);
- **sync save**: ``tk.save`` of the same state (durable, and ``durable=False``);
- **copy limit**: copying the same tensors into preallocated memory (``Tensor.copy_``), the
  least any consistent snapshot can cost.

The bar: the async stall is at most 1.5x the copy limit. Run: ``python bench/bench_async.py``
(``--scale 0.05`` for a quick run).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import torchkeep as tk
import workloads
from torchkeep.snapshot import AsyncWriter
from torchkeep.writer import save_flat


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where the files go (a temp dir inside, removed after)")
    args = ap.parse_args(argv)
    model = workloads.build_model(args.scale)
    opt = workloads.adam_for(model)
    state = {"model": model, "optimizer": opt}
    tensors = [t for t in model.state_dict().values()] + [
        v for s in opt.state_dict()["state"].values() for v in s.values() if isinstance(v, torch.Tensor)
    ]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    pre = [torch.empty_like(t) for t in tensors]
    for d, s in zip(pre, tensors, strict=True):
        d.copy_(s)  # fault the destination in once, as the reused snapshot buffers are
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        writer = AsyncWriter()
        path = Path(tmp, "async.safetensors")
        writer.submit(state, lambda flat: save_flat(flat, path))  # first snapshot allocates its buffers
        writer.wait()
        for i in range(args.repeat):
            t0 = time.perf_counter()
            for d, s in zip(pre, tensors, strict=True):
                d.copy_(s)
            times.setdefault("copy limit (copy_ into preallocated memory)", []).append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            writer.submit(state, lambda flat: save_flat(flat, path))
            times.setdefault("async save: stall inside submit()", []).append(time.perf_counter() - t0)
            writer.wait()
            for durable in (True, False):
                p = Path(tmp, f"sync{i}{durable}.safetensors")
                t0 = time.perf_counter()
                tk.save(state, p, durable=durable)
                label = "sync tk.save (durable)" if durable else "sync tk.save (durable=False)"
                times.setdefault(label, []).append(time.perf_counter() - t0)
                p.unlink()
        writer.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    limit = med["copy limit (copy_ into preallocated memory)"]
    print(f"torchkeep {tk.__version__} | torch {torch.__version__} | W3 state {nbytes / 2**30:.2f} GiB, ", end="")
    print(f"{len(tensors)} tensors | median of {args.repeat}\n")
    print(f"| {'what the training loop waits for':<46} | median s | x copy limit |")
    print(f"|{'-' * 48}|----------|--------------|")
    for name, s in med.items():
        print(f"| {name:<46} | {s:8.3f} | {s / limit:12.2f} |")
    stall = med["async save: stall inside submit()"] / limit
    print(f"\nbar: async stall <= 1.5x the copy limit: {stall:.2f}x -> {'PASS' if stall <= 1.5 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Hugging Face folders: tk.save_model vs save_pretrained, tk.load_model vs from_pretrained.

A GPT-2 (124M parameters, built from its config, no download), saved and loaded in the same
process, contenders interleaved in rounds; medians of the per-round ratios are reported.

    python bench/bench_hf_models.py [--rounds 5] [--layers 12]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

import torchkeep as tk


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", type=int, default=12)
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=args.layers)).eval()
    x = torch.randint(0, 50257, (1, 16))
    with torch.no_grad():
        ref = model(x).logits
    times: dict[str, list[float]] = {
        k: [] for k in ("save_pretrained", "tk.save_model", "from_pretrained", "tk.load_model")
    }
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.rounds):
            a, b = Path(d) / f"hf{r}", Path(d) / f"tk{r}"
            order = [
                ("save_pretrained", lambda a=a: model.save_pretrained(a)),
                ("tk.save_model", lambda b=b: tk.save_model(model, b)),
            ]
            for name, fn in order if r % 2 == 0 else order[::-1]:
                times[name].append(_timed(fn)[0])
            loads = [
                ("from_pretrained", lambda a=a: transformers.GPT2LMHeadModel.from_pretrained(a)),
                ("tk.load_model", lambda b=b: tk.load_model(b)),
            ]
            for name, fn in loads if r % 2 == 0 else loads[::-1]:
                t, m = _timed(fn)
                times[name].append(t)
                with torch.no_grad():
                    assert torch.equal(m(x).logits, ref), name
    n = sum(p.numel() for p in model.parameters())
    print(f"GPT-2 {args.layers} layers, {n / 1e6:.0f}M parameters, {args.rounds} rounds (medians)")
    for k, v in times.items():
        print(f"  {k:16s} {statistics.median(v):.3f} s")
    save = statistics.median(s / p for s, p in zip(times["tk.save_model"], times["save_pretrained"], strict=True))
    load = statistics.median(s / p for s, p in zip(times["tk.load_model"], times["from_pretrained"], strict=True))
    print(f"  ratio save_model / save_pretrained: {save:.2f}x (checksummed, fsynced)")
    print(f"  ratio load_model / from_pretrained: {load:.2f}x (checksums verified); outputs bitwise equal")


if __name__ == "__main__":
    main()

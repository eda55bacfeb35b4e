"""Benchmark torchkeep's loads against their floors: each contender alone in a fresh process.

Run it::

    make bench-load                                       # = .venv/bin/python bench/bench_load.py
    .venv/bin/python bench/bench_load.py --scale 0.05 --rounds 2           # quick run (~1 min)
    .venv/bin/python bench/bench_load.py --workloads W1 --json bench/out/load.json

Workloads (``--scale`` multiplies the sizes; built with ``bench/workloads.py``):

- **W1** ~1 GiB float32 model, 200 tensors (100 x ``nn.Linear(1638, 1638)``);
- **W3** W1 + Adam state after one step (~3 GiB, 800 tensors), for ``restore``;
- **W4** W1's bytes as one flat float32 tensor (a flat parameter buffer, a huge embedding);
- **W2** 20,000 small float32 tensors of ~10 KiB (``--scale`` changes their number);
- **tiny** 100,000 one-element float32 tensors at scale 1 (``--tiny-count N`` sets the number,
  not scaled). A million does not fit: a torchkeep header (tensor table, tree, checksums) takes
  ~130 bytes a tensor here and readers refuse headers over 100,000,000 bytes, so ~740,000 is
  the most one file holds; a count that does not fit is lowered to the most that does, said so.

Contenders and their floors ("+ touch": one xxh3-64 pass over every distinct storage of the
result, inside the timed region, the same for all; see ``bench/load_contenders.py``):

- W1 zero-copy: ``tk.load(p, mmap=True)`` + touch vs ``load_file(p)`` (safetensors, memory
  mapped) + one xxh3-128 pass over each tensor on both cores + touch; also vs plain
  ``load_file`` + touch (unverified). Skipped, with a note, where ``tk.load`` has no ``mmap=``.
- W1 copying: ``tk.load(p)`` (``mmap=False`` where the option exists) + touch vs one fresh
  ``torch.empty`` of the data section + pread of it on both cores, each 1 MiB piece hashed
  (xxh3-128) right after it is read, + touch; also vs the same into one private anonymous
  mapping with ``MADV_HUGEPAGE`` (where huge pages help, that is the lower floor; on the
  reference VM they cost 2-3x in a fresh process, so it is reported beside, not divided by)
  and vs ``torch.load(weights_only=True)`` + touch.
- W1 ``tk.load_into(model, p)`` into a live model vs ``load_file`` + xxh3 pass +
  ``model.load_state_dict``.
- W3 ``tk.restore(p, {"model", "optimizer"})`` into a model + Adam that already stepped vs a
  plain ``copy_`` of the same bytes, already in memory, into those live tensors (the goal's
  floor, which verifies nothing); also beside a verified read with no restore around it: each
  live tensor pread from the file in 1 MiB pieces on both cores, each piece hashed (xxh3-128)
  right after it is read. That row divided by ``copy_`` is what verifying costs on its own; and
  ``tk.restore(verify=False)``, the same restore without the checksums, beside them.
- W4: copying ``tk.load`` + touch vs the same floor as W1's (the data section read on both
  cores), and zero-copy vs its floor; one tensor is one checksum stream, so this shows
  whether a lone tensor is read by one thread or by all.
- W2 and tiny: ``tk.load`` vs ``safetensors.torch.load_file`` vs ``torch.load``, each + touch.
  On the tiny workload ``torch.load`` runs in the first round only above 20,000 tensors
  (~0.4 ms a tensor on the 2-core reference machine).
- GPU, where CUDA is available (``--gpu-device cpu``: a dry run of the same code on the CPU):
  ``tk.load(map_location="cuda")`` vs ``load_file(device="cuda")`` vs ``torch.load`` onto the
  device, and vs the slower of a page-cache read and a pinned host-to-device copy of the bytes.

Method. Every file is written, synced and read once (page cache hot) before the rounds.
Each round runs every contender once, each in a process of its own, in an order rotated
between rounds; the process first runs its contender on a tiny warm-up file (lazy imports,
first-call set-up), builds what the call needs (a model, an optimizer), reads the real file
once more (a machine that reclaims idle page cache may have paged part of it out since the
last round), then times one call on it. By default the processes are forked
from one server process that imported the libraries and ran nothing (``--spawn``: a new
``python`` per run instead, ~2-5 s of imports each). Ratios are medians over rounds of the
per-round ratio contender / floor (below 1: faster than the floor). Peak RSS is VmHWM above the
process's RSS just before the timed call (after resetting it), the worst round, as a multiple
of the file; "anon" is the growth of RssAnon (memory not backed by the file).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from rich.console import Console

import torchkeep as tk
from bench_save_load import TMPFS_TYPES, default_parent, env_info, fmt_bytes, fmt_s, fs_of, log, render, table
from load_contenders import WARM_SCALE, Runner, tk_load_takes_mmap
from torchkeep.errors import InvalidArgumentError
from torchkeep.format.limits import MAX_HEADER_SIZE
from workloads import MiB, adam_for, build_model, w2

WORKLOADS = ["W1", "W3", "W4", "W2", "tiny"]
TINY_COUNT = 100_000  # at scale 1
TINY_TORCH_EVERY_ROUND = 20_000  # above this many tiny tensors, torch.load runs in the first round only
# W2 as docs/benchmarks.md recorded it (run of 2026-11-28, 27d1e61): tk.load (verify) 0.380 s,
# torch.load 1.477 s. "No regression": the ratio stays within 15% of it.
W2_RECORDED = 0.380 / 1.477

# contender names, as printed
ZC = "tk.load(mmap=True) + touch"
ZC_FLOOR = "floor: load_file + xxh3 pass + touch"
ST_TOUCH = "load_file (unverified) + touch"
COPY = "tk.load (copying) + touch"
COPY_FLOOR = "floor: torch.empty + pread + xxh3 + touch"
HUGE_FLOOR = "huge-page map + pread + xxh3 + touch"
TORCH_LOAD = "torch.load(weights_only=True) + touch"
LOAD_INTO = "tk.load_into(model)"
LOAD_INTO_FLOOR = "floor: load_file + xxh3 pass + load_state_dict"
RESTORE = "tk.restore(model + Adam)"
RESTORE_FLOOR = "floor: copy_ into the live tensors"
RESTORE_READ = "pread + xxh3 into the live tensors"
RESTORE_UNVERIFIED = "tk.restore(verify=False)"
TK_LOAD = "tk.load + touch"
ST_LOAD = "safetensors load_file + touch"
GPU_TK = "tk.load(map_location=dev)"
GPU_ST = "load_file(device=dev)"
GPU_TORCH = "torch.load(map_location=dev)"
GPU_FLOOR = "floor: max(page-cache read, pinned H2D)"


@dataclass
class Contender:
    wl: str  # W1 | W3 | W4 | W2 | tiny | GPU
    name: str
    kind: str  # a key of load_contenders.KINDS
    file: str  # a key of the files dict
    floor: str | None = None  # the contender this one is divided by
    first_round_only: bool = False
    skipped: str | None = None  # why it does not run
    times: list[float | None] = field(default_factory=list)  # per round (None: not run that round)
    rss: list[dict[str, Any]] = field(default_factory=list)
    extra: list[dict[str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.wl}: {self.name}"

    @property
    def done(self) -> list[float]:
        return [t for t in self.times if t is not None]


# --------------------------------------------------------------------------------------------
# the files


def save_tiny(n: int, path: Path, notes: list[str]) -> dict[str, torch.Tensor]:
    """Save ``n`` one-element tensors with torchkeep; fewer, with a note, when their header would not fit."""
    for _ in range(4):
        base = torch.arange(n, dtype=torch.float32)
        sd = {f"t{i}": base[i : i + 1].clone() for i in range(n)}
        try:
            tk.save(sd, path, durable=False)
            return sd
        except InvalidArgumentError as e:
            m = re.search(r"would be ([\d,]+) bytes", str(e))
            size = int(m.group(1).replace(",", "")) if m else 2 * MAX_HEADER_SIZE
            fit = int(n * MAX_HEADER_SIZE / size * 0.995)
            notes.append(
                f"tiny: {n:,} tensors need a {size:,}-byte header, over the {MAX_HEADER_SIZE:,}-byte limit "
                f"of every reader; {fit:,} are used instead"
            )
            n = fit
    raise SystemExit(f"could not fit the tiny workload into one header ({notes[-1]})")


def make_files(
    args: argparse.Namespace, workdir: Path, notes: list[str]
) -> tuple[dict[str, Path], dict[str, str], dict[str, int]]:
    """Write every file the contenders read (untimed): ``(files, descriptions, tensor counts)``."""
    files: dict[str, Path] = {}
    desc: dict[str, str] = {}
    counts: dict[str, int] = {}
    need = int(args.scale * 7.3 * (1 << 30)) + 256 * MiB  # W1 twice (tk, pt), W3 once, W4 once, W2 three times
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise SystemExit(f"the files need ~{fmt_bytes(need)} free in {workdir}; only {fmt_bytes(free)} is free")

    def put(key: str, obj: Any, how: str) -> None:
        p = files[key] = workdir / f"{key}.{how}"
        if how == "tk":
            tk.save(obj, p, durable=False)
        elif how == "pt":
            torch.save(obj, p)
        else:
            safetensors.torch.save_file(obj, p)

    warm = build_model(WARM_SCALE)
    put("warm.tk", warm.state_dict(), "tk")
    put("warm.pt", warm.state_dict(), "pt")
    put("warm.st", warm.state_dict(), "st")
    put("warm.W3", {"model": warm, "optimizer": adam_for(warm)}, "tk")
    wanted = set(args.workloads)
    if {"W1", "W3"} & wanted:
        model = build_model(args.scale)
        n = sum(t.numel() for t in model.state_dict().values())
        width = model[0].weight.shape[0]
        if "W1" in wanted:
            log(f"W1: writing {fmt_bytes(4 * n)}")
            put("W1.tk", model.state_dict(), "tk")
            put("W1.pt", model.state_dict(), "pt")
            desc["W1"] = f"{fmt_bytes(4 * n)} float32, 200 tensors (100 x Linear({width}, {width}))"
        if "W3" in wanted:
            log(f"W3: writing {fmt_bytes(12 * n)}")
            put("W3.tk", {"model": model, "optimizer": adam_for(model)}, "tk")
            desc["W3"] = f"{fmt_bytes(12 * n)}: W1 + Adam state after one step, 800 tensors"
        del model
    if "W4" in wanted:
        n = sum(t.numel() for t in build_model(args.scale).state_dict().values())
        log(f"W4: writing {fmt_bytes(4 * n)} as one tensor")
        put("W4.tk", {"flat": torch.randn(n, generator=torch.Generator().manual_seed(4))}, "tk")
        desc["W4"] = f"{fmt_bytes(4 * n)} float32, one tensor (W1's size)"
    if "W2" in wanted:
        w = w2(args.scale)
        log(f"W2: writing {w.desc}")
        for how in ("tk", "pt", "st"):
            put(f"W2.{how}", w.tk_obj(), how)
        desc["W2"] = f"{fmt_bytes(w.nbytes)}, {w.desc}"
        del w
    if "tiny" in wanted:
        n = args.tiny_count or max(100, round(TINY_COUNT * args.scale))
        log(f"tiny: writing {n:,} one-element tensors")
        files["tiny.tk"] = workdir / "tiny.tk.tk"
        sd = save_tiny(n, files["tiny.tk"], notes)
        put("tiny.pt", sd, "pt")
        put("tiny.st", sd, "st")
        desc["tiny"] = f"{len(sd):,} one-element float32 tensors"
        counts["tiny"] = len(sd)
        del sd
    gc.collect()
    os.sync()
    for p in files.values():  # hot page cache
        with open(p, "rb", buffering=0) as f:
            while f.read(8 * MiB):
                pass
    return files, desc, counts


# --------------------------------------------------------------------------------------------
# the contenders and the processes that run them


def contenders(args: argparse.Namespace, counts: dict[str, int], gpu: str | None) -> list[Contender]:
    out: list[Contender] = []
    wanted = set(args.workloads)
    if "W1" in wanted:
        zc_skip = None if tk_load_takes_mmap() else "this torchkeep's load has no mmap= option"
        out += [
            Contender("W1", ZC, "tk_load_mmap", "W1.tk", ZC_FLOOR, skipped=zc_skip),
            Contender("W1", ZC_FLOOR, "st_load_hash", "W1.tk"),
            Contender("W1", ST_TOUCH, "st_load", "W1.tk"),
            Contender("W1", COPY, "tk_load_copy", "W1.tk", COPY_FLOOR),
            Contender("W1", COPY_FLOOR, "empty_pread_hash", "W1.tk"),
            Contender("W1", HUGE_FLOOR, "huge_pread_hash", "W1.tk"),
            Contender("W1", TORCH_LOAD, "torch_load", "W1.pt"),
            Contender("W1", LOAD_INTO, "load_into", "W1.tk", LOAD_INTO_FLOOR),
            Contender("W1", LOAD_INTO_FLOOR, "load_into_floor", "W1.tk"),
        ]
    if "W4" in wanted:
        out += [
            Contender("W4", COPY, "tk_load_copy", "W4.tk", COPY_FLOOR),
            Contender("W4", COPY_FLOOR, "empty_pread_hash", "W4.tk"),
            Contender(
                "W4", ZC, "tk_load_mmap", "W4.tk", ZC_FLOOR, skipped=None if tk_load_takes_mmap() else "no mmap="
            ),
            Contender("W4", ZC_FLOOR, "st_load_hash", "W4.tk"),
        ]
    if "W3" in wanted:
        out += [
            Contender("W3", RESTORE, "restore", "W3.tk", RESTORE_FLOOR),
            Contender("W3", RESTORE_FLOOR, "restore_floor", "W3.tk"),
            Contender("W3", RESTORE_READ, "restore_read_floor", "W3.tk", RESTORE_FLOOR),
            Contender("W3", RESTORE_UNVERIFIED, "restore_unverified", "W3.tk", RESTORE_FLOOR),
        ]
    for wl in ("W2", "tiny"):
        if wl in wanted:
            many = wl == "tiny" and counts["tiny"] > TINY_TORCH_EVERY_ROUND
            out += [
                Contender(wl, TK_LOAD, "tk_load_copy", f"{wl}.tk", ST_LOAD),
                Contender(wl, ST_LOAD, "st_load", f"{wl}.st"),
                Contender(wl, TORCH_LOAD, "torch_load", f"{wl}.pt", first_round_only=many),
            ]
    if gpu is not None and "W1" in wanted:
        out += [
            Contender("GPU", GPU_TK, "gpu_tk", "W1.tk", GPU_FLOOR),
            Contender("GPU", GPU_ST, "gpu_st", "W1.tk"),
            Contender("GPU", GPU_TORCH, "gpu_torch", "W1.pt"),
            Contender("GPU", GPU_FLOOR, "gpu_floor", "W1.tk"),
        ]
    return out


WARM_FILE = {"W3.tk": "warm.W3", "W1.pt": "warm.pt", "W2.pt": "warm.pt", "tiny.pt": "warm.pt"}


def spec_of(c: Contender, files: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    warm = WARM_FILE.get(c.file, "warm.st" if c.file.endswith(".st") else "warm.tk")
    return {
        "kind": c.kind,
        "path": str(files[c.file]),
        "warm_path": str(files[warm]),
        "scale": args.scale,
        "device": args.gpu_device,
    }


def run_rounds(cs: list[Contender], files: dict[str, Path], args: argparse.Namespace) -> None:
    runnable = [c for c in cs if c.skipped is None]
    runner = Runner(args.spawn)
    try:
        for r in range(args.rounds):
            k = r % len(runnable) if runnable else 0
            for c in runnable[k:] + runnable[:k]:
                if c.first_round_only and r > 0:
                    c.times.append(None)
                    continue
                res = runner.run(spec_of(c, files, args))
                if "error" in res:
                    c.errors.append(res["error"])
                    c.times.append(None)
                    log(f"  round {r + 1}/{args.rounds} {c.key:<60} error: {res['error']}")
                    continue
                c.times.append(res["time_s"])
                c.rss.append(res["rss"])
                if res["extra"]:
                    c.extra.append(res["extra"])
                log(f"  round {r + 1}/{args.rounds} {c.key:<60} {res['time_s']:8.4f} s")
    finally:
        runner.close()


# --------------------------------------------------------------------------------------------
# ratios, goals, report


def per_round_ratio(a: Contender | None, b: Contender | None) -> float | None:
    """Median over rounds of ``a``'s time / ``b``'s time in the same round."""
    if a is None or b is None:
        return None
    rs = [x / y for x, y in zip(a.times, b.times, strict=False) if x is not None and y is not None and y > 0]
    return statistics.median(rs) if rs else None


def rss_x_file(c: Contender, files: dict[str, Path]) -> tuple[float | None, float | None]:
    """Worst round's (peak RSS above baseline, RssAnon growth), as multiples of the file read."""
    size = files[c.file].stat().st_size
    if not c.rss:
        return None, None
    peak = max((r["peak_kib"] - r["base_kib"]) * 1024 / size for r in c.rss)
    anon = max((r["anon_after_kib"] - r["anon_base_kib"]) * 1024 / size for r in c.rss)
    return peak, anon


@dataclass
class Goal:
    text: str
    measured: str
    required: str
    ok: bool | None  # None: not measured


def ratio_goal(text: str, x: float | None, limit: float, *, at_least: bool = False, why: str = "") -> Goal:
    req = f"{'>=' if at_least else '<='} {limit:.2f}x"
    if x is None:
        return Goal(text, f"n/a{f' ({why})' if why else ''}", req, None)
    return Goal(text, f"{x:.2f}x", req, x >= limit if at_least else x <= limit)


def goals(by: dict[str, Contender], files: dict[str, Path]) -> list[Goal]:
    def get(key: str) -> Contender | None:
        c = by.get(key)
        return c if c is not None and c.done else None

    def why(key: str) -> str:
        c = by.get(key)
        return "not run" if c is None else c.skipped or (c.errors[-1][:60] if c.errors else "no result")

    out = [
        ratio_goal(
            "W1 zero-copy tk.load(mmap=True) + touch vs load_file + xxh3 + touch",
            per_round_ratio(get(f"W1: {ZC}"), get(f"W1: {ZC_FLOOR}")),
            1.20,
            why=why(f"W1: {ZC}"),
        ),
        ratio_goal(
            "W1 copying tk.load + touch vs torch.empty + pread + xxh3 + touch",
            per_round_ratio(get(f"W1: {COPY}"), get(f"W1: {COPY_FLOOR}")),
            1.20,
            why=why(f"W1: {COPY}"),
        ),
        ratio_goal(
            "W4 (one tensor) copying tk.load + touch vs torch.empty + pread + xxh3 + touch",
            per_round_ratio(get(f"W4: {COPY}"), get(f"W4: {COPY_FLOOR}")),
            1.20,
            why=why(f"W4: {COPY}"),
        ),
        ratio_goal(
            "W3 tk.restore vs copy_ of the same bytes into the live tensors",
            per_round_ratio(get(f"W3: {RESTORE}"), get(f"W3: {RESTORE_FLOOR}")),
            1.25,
            why=why(f"W3: {RESTORE}"),
        ),
        ratio_goal(
            "W1 tk.load_into vs load_file + xxh3 + load_state_dict",
            per_round_ratio(get(f"W1: {LOAD_INTO}"), get(f"W1: {LOAD_INTO_FLOOR}")),
            1.15,
            why=why(f"W1: {LOAD_INTO}"),
        ),
    ]
    # peak RSS of every torchkeep load of the big workloads
    worst: tuple[float, str] | None = None
    for key in (f"W1: {ZC}", f"W1: {COPY}", f"W1: {LOAD_INTO}", f"W3: {RESTORE}", f"W4: {COPY}"):
        c = get(key)
        peak = rss_x_file(c, files)[0] if c else None
        if peak is not None and (worst is None or peak > worst[0]):
            worst = (peak, key)
    text = "peak RSS above baseline, worst torchkeep load of W1/W3/W4, x file"
    if worst is None:
        out.append(Goal(text, "n/a (not measured)", "<= 1.05x", None))
    else:
        out.append(Goal(text, f"{worst[0]:.2f}x ({worst[1]})", "<= 1.05x", worst[0] <= 1.05))
    zc = get(f"W1: {ZC}")
    anon = rss_x_file(zc, files)[1] if zc else None
    out.append(ratio_goal("W1 zero-copy load: anonymous memory, x file", anon, 0.05, why=why(f"W1: {ZC}")))
    out.append(
        ratio_goal(
            f"W2 tk.load / torch.load (recorded {W2_RECORDED:.2f}x in docs/benchmarks.md; within 15%)",
            per_round_ratio(get(f"W2: {TK_LOAD}"), get(f"W2: {TORCH_LOAD}")),
            W2_RECORDED * 1.15,
            why=why(f"W2: {TK_LOAD}"),
        )
    )
    out.append(
        ratio_goal(
            "tiny tk.load vs safetensors load_file (no slower)",
            per_round_ratio(get(f"tiny: {TK_LOAD}"), get(f"tiny: {ST_LOAD}")),
            1.0,
            why=why(f"tiny: {TK_LOAD}"),
        )
    )
    gpu_tk, gpu_st = get(f"GPU: {GPU_TK}"), get(f"GPU: {GPU_ST}")
    speed = per_round_ratio(gpu_st, gpu_tk)
    out.append(ratio_goal("GPU: tk.load speed-up over load_file(device=dev)", speed, 1.5, at_least=True, why="no GPU"))
    out.append(
        ratio_goal(
            "GPU: tk.load vs max(page-cache read, pinned H2D)",
            per_round_ratio(gpu_tk, get(f"GPU: {GPU_FLOOR}")),
            1.25,
            why="no GPU",
        )
    )
    return out


# (label, contender, baseline): further ratios, printed without a goal
ALSO = [
    ("W1 zero-copy vs unverified load_file + touch", f"W1: {ZC}", f"W1: {ST_TOUCH}"),
    ("W1 zero-copy floor vs unverified load_file + touch", f"W1: {ZC_FLOOR}", f"W1: {ST_TOUCH}"),
    ("W1 copying tk.load vs the huge-page floor", f"W1: {COPY}", f"W1: {HUGE_FLOOR}"),
    ("W1 huge pages vs torch.empty (the two floors)", f"W1: {HUGE_FLOOR}", f"W1: {COPY_FLOOR}"),
    ("W1 copying tk.load vs torch.load", f"W1: {COPY}", f"W1: {TORCH_LOAD}"),
    ("W1 zero-copy tk.load vs torch.load", f"W1: {ZC}", f"W1: {TORCH_LOAD}"),
    ("W3 tk.restore vs pread + xxh3 into the live tensors", f"W3: {RESTORE}", f"W3: {RESTORE_READ}"),
    ("W2 tk.load vs safetensors load_file", f"W2: {TK_LOAD}", f"W2: {ST_LOAD}"),
    ("tiny tk.load vs torch.load", f"tiny: {TK_LOAD}", f"tiny: {TORCH_LOAD}"),
    ("GPU tk.load vs torch.load(map_location=dev)", f"GPU: {GPU_TK}", f"GPU: {GPU_TORCH}"),
]


def workload_table(cs: list[Contender], by: dict[str, Contender], files: dict[str, Path]) -> Any:
    t = table(
        [
            ("contender", "left"),
            ("median s", "right"),
            ("min-max s", "right"),
            ("x floor", "right"),
            ("floor", "left"),
            ("peak RSS x file", "right"),
            ("anon x file", "right"),
        ]
    )
    for c in cs:
        if c.skipped or not c.done:
            t.add_row(c.name, "skipped" if c.skipped else "error", "", "", c.floor or "", "", "")
            continue
        x = per_round_ratio(c, by.get(f"{c.wl}: {c.floor}")) if c.floor else None
        peak, anon = rss_x_file(c, files)
        d = c.done
        t.add_row(
            c.name + (f" ({len(d)} round)" if c.first_round_only else ""),
            fmt_s(statistics.median(d)),
            f"{fmt_s(min(d))}-{fmt_s(max(d))}",
            "" if x is None else f"{x:.2f}",
            c.floor or "",
            "" if peak is None else f"{peak:.2f}",
            "" if anon is None else f"{anon:.2f}",
        )
    return t


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        cpu = m.group(1).strip() if m else platform.processor()
    except OSError:
        cpu = platform.processor()
    thp = []
    for k in ("enabled", "defrag"):
        try:
            m = re.search(r"\[(\w+)\]", Path(f"/sys/kernel/mm/transparent_hugepage/{k}").read_text())
            if m:
                thp.append(f"{k} {m.group(1)}")
        except OSError:
            pass
    return f"{cpu} | transparent huge pages: {', '.join(thp) or 'n/a'}"


def report(
    cs: list[Contender],
    files: dict[str, Path],
    desc: dict[str, str],
    env: dict[str, Any],
    args: argparse.Namespace,
    notes: list[str],
) -> list[Goal]:
    console = Console(highlight=False, width=220, color_system=None)
    by = {c.key: c for c in cs}
    lines = [
        f"torchkeep {env['torchkeep']} ({env['git']}) | torch {env['torch']} | safetensors {env['safetensors']} | "
        f"numpy {env['numpy']} | Python {env['python']} | torchkeep from {env['torchkeep_from']}",
        f"{env['cpus']} CPUs | {env['ram_bytes'] / (1 << 30):.0f} GiB RAM | {env['machine']}",
        f"files on {env['fs']} ({env['device']}) | 1-min load average {env['loadavg_start']:.1f} at start, "
        f"{env['loadavg_end']:.1f} at end",
        f"scale {args.scale:g}; {args.rounds} interleaved rounds, order rotated; each run in a fresh process "
        f"({'spawned' if args.spawn else 'forked from an import-only server'}), page cache hot",
        "x floor: median over rounds of (contender s / floor s) in the same round (below 1: faster than the floor).",
        "peak RSS: VmHWM above the RSS before the call, worst round; anon: RssAnon growth (not file-backed).",
    ]
    if any(not r["hwm_reset"] for c in cs for r in c.rss):
        notes.append("VmHWM could not be reset here: the peak RSS columns are upper bounds (they include imports)")
    lines += [f"note: {n}" for n in notes]
    for wl in [*WORKLOADS, "GPU"]:
        group = [c for c in cs if c.wl == wl]
        if group:
            title = desc.get(wl, "") if wl != "GPU" else f"W1 onto {args.gpu_device}"
            lines += ["", f"## {wl}: {title}", "", render(console, workload_table(group, by, files))]
    also = table([("ratio (time / time, median of rounds)", "left"), ("measured", "right")])
    for label, a, b in ALSO:
        x = per_round_ratio(by.get(a) if a in by and by[a].done else None, by.get(b) if b in by else None)
        if x is not None:
            also.add_row(label, f"{x:.2f}x")
    lines += ["", "## other ratios", "", render(console, also)]
    result = goals(by, files)
    gt = table([("goal", "left"), ("measured", "right"), ("required", "right"), ("result", "left")])
    for g in result:
        gt.add_row(g.text, g.measured, g.required, "n/a" if g.ok is None else "PASS" if g.ok else "FAIL")
    measured = [g for g in result if g.ok is not None]
    lines += [
        "",
        "## goals",
        "",
        render(console, gt),
        f"{sum(bool(g.ok) for g in measured)}/{len(measured)} goals pass",
    ]
    if args.scale != 1:
        lines.append(f"(the goals are defined at --scale 1; this run used --scale {args.scale:g})")
    print("\n".join(lines), flush=True)
    return result


def to_json(
    cs: list[Contender], files: dict[str, Path], env: dict[str, Any], args: argparse.Namespace, **kw: Any
) -> Any:
    by = {c.key: c for c in cs}
    out: dict[str, Any] = {}
    for c in cs:
        peak, anon = rss_x_file(c, files)
        x = per_round_ratio(c, by.get(f"{c.wl}: {c.floor}")) if c.floor else None
        out[c.key] = {
            "workload": c.wl,
            "name": c.name,
            "kind": c.kind,
            "file_bytes": files[c.file].stat().st_size,
            "floor": c.floor,
            "skipped": c.skipped,
            "errors": c.errors,
            "times_s": c.times,
            "median_s": statistics.median(c.done) if c.done else None,
            "x_floor": x,
            "peak_rss_x_file": peak,
            "anon_x_file": anon,
            "rss_kib": c.rss,
            "extra": c.extra,
        }
    return {
        "env": env,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "contenders": out,
        **kw,
    }


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--scale", type=float, default=1.0, help="multiply every size (0.05: a quick run)")
    p.add_argument("--rounds", "--repeat", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}")
    p.add_argument(
        "--tiny-count", type=int, default=None, help=f"tensors of the tiny workload ({TINY_COUNT:,} x scale)"
    )
    p.add_argument("--gpu-device", default="cuda", help="device of the GPU contenders; 'cpu' for a dry run")
    p.add_argument("--spawn", action="store_true", help="a new python per run instead of forking an import-only one")
    p.add_argument("--dir", type=Path, default=None, help="where the files go (a temp dir inside, removed after)")
    p.add_argument("--json", type=Path, default=None, help="also write every timing to this JSON file")
    args = p.parse_args(argv)
    names = {w.lower(): w for w in WORKLOADS}
    asked = [w.strip().lower() for w in args.workloads.split(",") if w.strip()]
    bad = sorted(set(asked) - set(names))
    if bad or not asked:
        p.error(f"--workloads takes a comma-separated subset of {','.join(WORKLOADS)} (got {bad or 'nothing'})")
    args.workloads = [names[w] for w in asked]
    if not args.scale > 0:
        p.error("--scale must be positive")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.tiny_count is not None and args.tiny_count < 1:
        p.error("--tiny-count must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    parent = (args.dir or default_parent()).expanduser().resolve()
    parent.mkdir(parents=True, exist_ok=True)
    if fs_of(parent)[0] in TMPFS_TYPES:
        log(f"note: {parent} is on {fs_of(parent)[0]}: files are in memory, not in a page cache")
    workdir = Path(tempfile.mkdtemp(prefix="torchkeep-bench-load-", dir=parent))
    env = {
        **env_info(workdir),
        "machine": machine(),
        "torchkeep_from": str(Path(tk.__file__).parent),
        "tk_load_mmap": tk_load_takes_mmap(),
    }
    notes: list[str] = []
    dev = torch.device(args.gpu_device)
    gpu = args.gpu_device if dev.type == "cpu" or (dev.type == "cuda" and torch.cuda.is_available()) else None
    if gpu is None:
        notes.append(f"GPU contenders skipped: {args.gpu_device} is not available here")
    elif dev.type == "cpu":
        notes.append("GPU contenders ran on the CPU (--gpu-device cpu): a dry run, not a measurement")
    else:
        env["gpu"] = torch.cuda.get_device_name(dev)
    if not tk_load_takes_mmap():
        notes.append("zero-copy contender skipped: this torchkeep's load has no mmap= option")
    try:
        files, desc, counts = make_files(args, workdir, notes)
        cs = contenders(args, counts, gpu)
        run_rounds(cs, files, args)
        env["loadavg_end"] = os.getloadavg()[0]
        result = report(cs, files, desc, env, args, notes)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            goals_json = [
                {"goal": g.text, "measured": g.measured, "required": g.required, "pass": g.ok} for g in result
            ]
            data = to_json(cs, files, env, args, goals=goals_json, notes=notes, workloads=desc)
            args.json.write_text(json.dumps(data, indent=2) + "\n")
            log(f"timings written to {args.json}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    log(f"done in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

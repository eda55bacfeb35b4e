"""Benchmark torchkeep save / load / restore against torch.save, safetensors and the raw limit.

Run it::

    make bench                                                 # = .venv/bin/python bench/bench_save_load.py
    .venv/bin/python bench/bench_save_load.py --scale 0.05 --repeat 1          # quick smoke run
    .venv/bin/python bench/bench_save_load.py --workloads W1 --repeat 3 --json bench/out/w1.json

Tables go to stdout (Markdown, ready for the README), progress to stderr. The workloads
and each library's calls are in ``bench/workloads.py``. Sizes at ``--scale 1``
(``--scale`` multiplies every size):

- **W1** a ~1 GiB float32 model: 100 ``nn.Linear(1638, 1638)`` layers, 200 tensors.
- **W2** 20,000 small float32 tensors of ~10 KiB, ~200 MiB in all; ``--scale`` changes
  the number of tensors, not their size (the per-tensor cost is what W2 measures).
- **W3** W1 plus Adam state after one step on random gradients set directly, no backward
  pass (``exp_avg``, ``exp_avg_sq``, ``step``): ~3 GiB, 800 tensors.

Method. Every contender runs in the same process and run, repeats interleaved (repeat 1
of every contender, then repeat 2, ...) so drift in the disk hits all alike; tables show
the median of ``--repeat`` runs.

- SAVE: ``torchkeep.save`` durable (default) and ``durable=False``, the same two with the
  checksums patched out in-process (prices the "checksums cost <= 10%" bar);
  ``torch.save`` with and without fsync (into an open file, flush, ``os.fsync``);
  ``safetensors.torch.save_file`` with and without an fsync after; the raw limit, an
  ``os.write`` of the same number of bytes (float32 noise in a preallocated buffer) into a
  fresh file, with and without fsync. Each save writes a fresh path, deleted right after;
  ``os.sync()`` runs, untimed, before each one, so no contender pays for another's write-back.
- LOAD, from a hot page cache (each library's file is written afresh, untimed, and read once
  before its loads are timed; nothing is dropped from the cache): ``torchkeep.load`` with
  ``verify`` on and off, ``torch.load(weights_only=True)``, ``safetensors.torch.load_file``
  with ``backend="pread"`` (reads into memory, like the others) and with its default
  ``mmap`` backend (lazy: pages are read on first use, so it measures little more than
  opening the file), ``readinto`` of the raw file into a preallocated buffer, and
  ``np.copyto`` between two preallocated buffers (memcpy).
- Before every timed call, memory freed by the previous one goes back to the OS
  (``malloc_trim``): each call starts like a fresh process, and pays its own page faults.
- RESTORE (W3): ``torchkeep.restore`` into the existing model + optimizer vs ``torch.load``
  + ``model.load_state_dict`` + ``optimizer.load_state_dict``.
- Peak RSS of one W1 load above the process baseline, per loader, in a fresh process
  (``VmHWM`` after resetting it through ``/proc/self/clear_refs``), as a multiple of the file.

Ratios are speed-ups, ``baseline median / contender median`` (above 1: faster). Save rows
compare with the baselines of the same durability. The "bars" section checks the
performance bars of the foundation issue. Files go to a fresh temporary directory on the
repository's disk (``--dir`` to choose; a tmpfs would measure memory, not a disk), removed
at the end. At scale 1 this needs ~16 GiB of free disk and ~12 GiB of RAM (W3), and takes
about ten minutes with ``--repeat 5``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import torch
from rich import box
from rich.console import Console
from rich.table import Table

import torchkeep as tk
from workloads import (
    ALL_NAMES,
    RAW_READ,
    RAW_WRITE,
    RAW_WRITE_FS,
    RSS_LOADERS,
    ST_LOAD,
    ST_SAVE,
    ST_SAVE_FS,
    TK_LOAD,
    TK_RESTORE,
    TK_SAVE,
    TK_SAVE_ND,
    TK_SAVE_NOHASH,
    TORCH_LOAD,
    TORCH_RESTORE,
    TORCH_SAVE,
    TORCH_SAVE_FS,
    GiB,
    MiB,
    Workload,
    build_model,
    load_groups,
    patch_took_effect,
    raw_buffer,
    save_contenders,
    w1,
    w2,
    w3,
    warm,
)

REPO = Path(__file__).resolve().parent.parent
TMPFS_TYPES = {"tmpfs", "ramfs", "devtmpfs"}
# Baselines of the ratio columns (torch, safetensors, raw), by operation and durability.
BASELINES: dict[tuple[str, bool | None], tuple[str | None, str | None, str | None]] = {
    ("save", True): (TORCH_SAVE_FS, ST_SAVE_FS, RAW_WRITE_FS),
    ("save", False): (TORCH_SAVE, ST_SAVE, RAW_WRITE),
    ("load", None): (TORCH_LOAD, ST_LOAD, RAW_READ),
    ("restore", None): (TORCH_RESTORE, None, None),
}
_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress on stderr, with the seconds since start (the tables go to stdout)."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 2 else f"{n / MiB:.1f} MiB"


def fmt_s(x: float) -> str:
    return f"{x:.3f}" if x >= 0.1 else f"{x:.4f}" if x >= 0.001 else f"{x:.1e}"


def fs_of(path: Path) -> tuple[str, str]:
    """``(filesystem type, device)`` of the mount that holds ``path``, from /proc/mounts."""
    best = ("", "?", "?")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype, *_ = line.split()
                mnt = mnt.replace("\\040", " ")
                inside = str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) > len(best[0]):
                    best = (mnt, fstype, dev)
    except OSError:
        pass
    return best[1], best[2]


def default_parent() -> Path:
    """The system temp dir when it is on the repository's disk (and not tmpfs), else ``bench/out``."""
    tmp = Path(tempfile.gettempdir()).resolve()
    try:
        if os.stat(tmp).st_dev == os.stat(REPO).st_dev and fs_of(tmp)[0] not in TMPFS_TYPES:
            return tmp
    except OSError:
        pass
    return REPO / "bench" / "out"  # git-ignored


# --------------------------------------------------------------------------------------------
# peak RSS: a fresh process imports the libraries once, then forks one child per loader


def proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) if m else -1


def _probe_one(name: str, path: str) -> dict[str, Any]:
    """In a just-forked child: load ``path`` once; RSS before, at the peak and after, in KiB."""
    base = proc_status_kib("VmRSS")
    try:  # reset VmHWM to the current RSS, so the peak is this load's own (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False  # VmHWM then includes the imports: an upper bound
    obj = RSS_LOADERS[name][1](Path(path))
    peak = proc_status_kib("VmHWM")
    after = proc_status_kib("VmRSS")
    del obj
    return {"base_kib": base, "peak_kib": peak, "after_kib": after, "hwm_reset": reset}


def rss_probe(items: list[str]) -> None:
    """Subprocess entry (``--rss-probe index=path ...``): one JSON line per loader on stdout.

    The parent imports torch once and never runs a torch op (no thread pool to inherit);
    each loader runs in a child forked from it, a process that has done nothing but import.
    """
    gc.collect()
    names = list(RSS_LOADERS)
    for item in items:
        index, path = item.split("=", 1)
        name = names[int(index)]
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            os.close(rfd)
            try:
                res = _probe_one(name, path)
            except BaseException as e:
                res = {"error": f"{type(e).__name__}: {e}"}
            os.write(wfd, json.dumps(res).encode())
            os._exit(0)
        os.close(wfd)
        with os.fdopen(rfd, "rb") as f:
            data = f.read()
        os.waitpid(pid, 0)
        res = json.loads(data) if data else {"error": "the probe process died"}
        print(json.dumps({"loader": name, **res}), flush=True)


def measure_rss(paths: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Peak RSS of one load by each loader of its library's own file, above the process baseline."""
    items = [f"{i}={paths[family]}" for i, (family, _) in enumerate(RSS_LOADERS.values())]
    p = subprocess.run([sys.executable, __file__, "--rss-probe", *items], capture_output=True, text=True, check=False)
    out: dict[str, dict[str, Any]] = {}
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            out[r.pop("loader")] = r
    for name, (family, _) in RSS_LOADERS.items():
        r = out.setdefault(name, {"error": (p.stderr.strip().splitlines() or ["no output"])[-1]})
        if "error" not in r:
            size = paths[family].stat().st_size
            r["file_bytes"] = size
            r["peak_x_file"] = (r["peak_kib"] - r["base_kib"]) * 1024 / size
            r["retained_x_file"] = (r["after_kib"] - r["base_kib"]) * 1024 / size
    return {name: out[name] for name in RSS_LOADERS}


# --------------------------------------------------------------------------------------------
# running


@dataclass
class Result:
    op: str  # save | load | restore
    name: str
    durable: bool | None
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def _malloc_trim() -> Callable[[], None]:
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


malloc_trim = _malloc_trim()


def timed(fn: Callable[[], Any]) -> float:
    """Seconds ``fn()`` takes, the cyclic GC off (the caller collects between rounds).

    Memory freed by the previous call is first handed back to the OS (``malloc_trim``), so
    every call starts as in a fresh process: whoever allocates pays for the page faults
    (about 0.4 s per GiB on the 2-core VM this was written on, ~4x a memcpy). Without it a
    load that follows another may reuse the freed heap and skip them, or not, depending on
    how the allocator happened to fragment, which swung W3 loads by 3-8x between repeats.
    """
    malloc_trim()
    gc.disable()
    try:
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
    finally:
        gc.enable()
    del out  # freeing what was loaded is not part of the load
    return dt


def run_workload(w: Workload, workdir: Path, repeat: int, want_rss: bool) -> dict[str, Any]:
    """Time every save, then every load and restore, of one workload; returns its results."""
    log(f"{w.name}: {fmt_bytes(w.nbytes)} in {w.n_tensors} tensors ({w.desc})")
    need = 3 * w.nbytes + 256 * MiB
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise SystemExit(f"{w.name} needs ~{fmt_bytes(need)} free in {workdir}; only {fmt_bytes(free)} is free")
    raw: dict[str, np.ndarray] = {"src": raw_buffer(w.nbytes)}
    results: dict[str, Result] = {}
    file_bytes: dict[str, int] = {}
    contenders = save_contenders(w, raw["src"])
    for c in contenders:
        results[c.name] = Result("save", c.name, c.durable)
    for r in range(repeat):
        gc.collect()
        for i, c in enumerate(contenders):
            path = workdir / f"{w.name}-{i}-{c.family}-{r}{c.suffix}"
            os.sync()  # a clean page cache: no one pays for another's write-back
            dt = timed(lambda c=c, path=path: c.fn(path))
            results[c.name].times.append(dt)
            file_bytes[c.family] = path.stat().st_size
            log(f"  {'save':<7} {r + 1}/{repeat} {c.name:<54} {dt:8.3f} s")
            path.unlink()  # at once: files left in the page cache would slow the saves after them

    # The loads read files written afresh, untimed, one family at a time (W3's are 3 GiB each).
    makers = {c.family: c for c in contenders if c.makes_load_file}
    paths = {fam: workdir / f"{w.name}-load-{fam}{c.suffix}" for fam, c in makers.items()}

    def make(family: str) -> None:
        if not paths[family].exists():
            makers[family].fn(paths[family])

    rss: dict[str, dict[str, Any]] = {}
    if want_rss:
        for family, _ in RSS_LOADERS.values():
            make(family)
        os.sync()
        rss = measure_rss(paths)
        for name, rr in rss.items():
            log(f"  peak RSS of {name}: {rr}")
    for family, calls in load_groups(w, paths, raw):
        make(family)
        if family == "raw":
            raw["dst"] = np.empty_like(raw["src"])
            raw["dst"].fill(0)  # faulted in: "preallocated"
        os.sync()
        warm(paths[family])  # hot page cache
        for op, name, _ in calls:
            results[name] = Result(op, name, None)
        for r in range(repeat):
            gc.collect()
            for op, name, fn in calls:
                dt = timed(fn)
                results[name].times.append(dt)
                log(f"  {op:<7} {r + 1}/{repeat} {name:<54} {dt:8.3f} s")
        paths[family].unlink()
        if family == "raw":
            raw.clear()  # 2 x 3 GiB for W3, not needed by the other loads
    return {
        "desc": w.desc,
        "bytes": w.nbytes,
        "n_tensors": w.n_tensors,
        "file_bytes": file_bytes,
        "rss": rss,
        "results": results,
    }


# --------------------------------------------------------------------------------------------
# reporting


def speedup(res: dict[str, Result], baseline: str | None, name: str) -> float | None:
    if baseline is None or baseline not in res or name not in res:
        return None
    return res[baseline].median / res[name].median


def table(columns: list[tuple[str, str]]) -> Table:
    t = Table(box=box.MARKDOWN)
    for col, justify in columns:
        t.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    return t


def workload_table(wr: dict[str, Any]) -> Table:
    res: dict[str, Result] = wr["results"]
    t = table(
        [
            ("op", "left"),
            ("contender", "left"),
            ("median s", "right"),
            ("min-max s", "right"),
            ("GB/s", "right"),
            ("x torch", "right"),
            ("x safetensors", "right"),
            ("x raw", "right"),
        ]
    )
    for name in ALL_NAMES:
        if name not in res:
            continue
        r = res[name]
        ratios = [speedup(res, b, name) for b in BASELINES[(r.op, r.durable)]]
        t.add_row(
            r.op,
            name,
            fmt_s(r.median),
            f"{fmt_s(min(r.times))}-{fmt_s(max(r.times))}",
            f"{wr['bytes'] / r.median / 1e9:.2f}",
            *("" if x is None else f"{x:.2f}" for x in ratios),
        )
    return t


def rss_table(rss: dict[str, dict[str, Any]]) -> Table:
    t = table(
        [
            ("loader (fresh process)", "left"),
            ("file", "right"),
            ("peak above baseline", "right"),
            ("peak x file", "right"),
            ("retained x file", "right"),
        ]
    )
    for name, r in rss.items():
        if "error" in r:
            t.add_row(name, "", f"error: {r['error']}", "", "")
        else:
            t.add_row(
                name,
                fmt_bytes(r["file_bytes"]),
                fmt_bytes((r["peak_kib"] - r["base_kib"]) * 1024),
                f"{r['peak_x_file']:.2f}",
                f"{r['retained_x_file']:.2f}",
            )
    return t


@dataclass
class Bar:
    text: str
    measured: str
    required: str
    ok: bool | None  # None: not measured in this run


def ratio_bar(runs: dict[str, dict[str, Any]], wl: str, text: str, name: str, base: str, need: float) -> Bar:
    req = f">= {need:.2f}x"
    if wl not in runs:
        return Bar(text, f"n/a ({wl} not run)", req, None)
    x = speedup(runs[wl]["results"], base, name)
    if x is None:
        return Bar(text, "n/a (not measured)", req, None)
    return Bar(text, f"{x:.2f}x", req, x >= need)


def bars(runs: dict[str, dict[str, Any]]) -> list[Bar]:
    """The performance bars of the foundation issue, in its order."""
    out = [
        ratio_bar(runs, "W1", "W1 durable save vs raw os.write + fsync", TK_SAVE, RAW_WRITE_FS, 0.85),
        ratio_bar(runs, "W1", "W1 durable save vs safetensors save_file + fsync", TK_SAVE, ST_SAVE_FS, 1.0),
        ratio_bar(runs, "W1", "W1 durable save vs torch.save + fsync", TK_SAVE, TORCH_SAVE_FS, 1.3),
    ]
    text, req = "W1 durable save: cost of the checksums", "<= +10%"
    if "W1" not in runs:
        out.append(Bar(text, "n/a (W1 not run)", req, None))
    elif TK_SAVE_NOHASH not in runs["W1"]["results"] or not patch_took_effect():
        out.append(Bar(text, "n/a (hashing could not be patched out)", req, None))
    else:
        res = runs["W1"]["results"]
        cost = res[TK_SAVE].median / res[TK_SAVE_NOHASH].median - 1
        out.append(Bar(text, f"{cost * 100:+.1f}%", req, cost <= 0.10))
    out += [
        ratio_bar(runs, "W1", "W1 durable=False save vs torch.save (no fsync)", TK_SAVE_ND, TORCH_SAVE, 2.0),
        ratio_bar(runs, "W1", "W1 durable=False save vs safetensors save_file (no fsync)", TK_SAVE_ND, ST_SAVE, 1.0),
        ratio_bar(runs, "W1", "W1 durable=False save vs raw os.write (page cache)", TK_SAVE_ND, RAW_WRITE, 0.8),
        ratio_bar(runs, "W3", "W3 restore (verify) vs torch.load + load_state_dict", TK_RESTORE, TORCH_RESTORE, 3.0),
    ]
    text, req = "W1 torchkeep load: peak RSS above baseline, x file size", "< 1.30x"
    rss = runs.get("W1", {}).get("rss", {}).get(TK_LOAD)
    if not rss or "peak_x_file" not in rss:
        out.append(Bar(text, "n/a (not measured)", req, None))
    else:
        out.append(Bar(text, f"{rss['peak_x_file']:.2f}x", req, rss["peak_x_file"] < 1.3))
    return [
        *out,
        ratio_bar(runs, "W2", "W2 durable save vs torch.save + fsync", TK_SAVE, TORCH_SAVE_FS, 2.0),
        ratio_bar(runs, "W2", "W2 durable=False save vs torch.save (no fsync)", TK_SAVE_ND, TORCH_SAVE, 2.0),
        ratio_bar(runs, "W2", "W2 load (verify) vs torch.load", TK_LOAD, TORCH_LOAD, 2.0),
    ]


def bars_table(result: list[Bar]) -> Table:
    t = table([("bar", "left"), ("measured", "right"), ("required", "right"), ("result", "left")])
    for b in result:
        t.add_row(b.text, b.measured, b.required, "n/a" if b.ok is None else "PASS" if b.ok else "FAIL")
    return t


def git_state() -> str:
    """The commit benchmarked, ``+dirty`` when src/ differs from it (read-only git calls)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--", "src"], timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return head.stdout.strip() + ("+dirty" if dirty.returncode == 1 else "") if head.returncode == 0 else "?"


def env_info(workdir: Path) -> dict[str, Any]:
    fstype, dev = fs_of(workdir)
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": git_state(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "torchkeep": tk.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "dir": str(workdir),
        "fs": fstype,
        "device": dev,
        "loadavg_start": os.getloadavg()[0],
    }


def render(console: Console, t: Table) -> str:
    """A table as text: trailing spaces and the blank edge lines of the Markdown box dropped."""
    with console.capture() as cap:
        console.print(t)
    return "\n".join(line.rstrip() for line in cap.get().splitlines()).strip("\n")


def report(runs: dict[str, dict[str, Any]], env: dict[str, Any], args: argparse.Namespace) -> list[Bar]:
    console = Console(highlight=False, width=200, color_system=None)
    lines = [
        f"torchkeep {env['torchkeep']} ({env['git']}) | torch {env['torch']} | safetensors {env['safetensors']} | "
        f"numpy {env['numpy']} | Python {env['python']}",
        f"{env['cpus']} CPUs | {env['ram_bytes'] / GiB:.0f} GiB RAM | files on {env['fs']} ({env['device']}) | "
        f"1-min load average {env['loadavg_start']:.1f} at start, {env['loadavg_end']:.1f} at end",
        f"scale {args.scale:g}; median of {args.repeat} interleaved repeats; loads from a hot page cache",
        "x torch / x safetensors / x raw: baseline median / contender median (above 1: faster). Save rows compare",
        "with the baselines of the same durability (fsync'd with fsync'd); load rows with torch.load, load_file (pread)",
        "and raw readinto. GB/s: tensor bytes / median, 1 GB = 1e9 bytes.",
    ]
    for name, wr in runs.items():
        lines += ["", f"## {name}: {fmt_bytes(wr['bytes'])}, {wr['desc']}", "", render(console, workload_table(wr))]
        if wr.get("rss"):
            lines += [
                "",
                f"### {name}: peak RSS of one load (fresh process, hot cache)",
                "",
                render(console, rss_table(wr["rss"])),
            ]
            if wr["bytes"] < 256 * MiB:
                lines.append("(small files: the ~10 MiB a first torch op costs in a fresh process dominates)")
    result = bars(runs)
    measured = [b for b in result if b.ok is not None]
    lines += ["", "## bars", "", render(console, bars_table(result))]
    lines.append(f"{sum(bool(b.ok) for b in measured)}/{len(measured)} bars pass")
    if args.scale != 1:
        lines.append(f"(the bars are defined at --scale 1; this run used --scale {args.scale:g})")
    print("\n".join(lines), flush=True)
    return result


def to_json(runs: dict[str, dict[str, Any]], env: dict[str, Any], args: argparse.Namespace, result: list[Bar]) -> Any:
    return {
        "env": env,
        "args": {"scale": args.scale, "repeat": args.repeat, "workloads": list(runs)},
        "workloads": {
            name: {
                **{k: v for k, v in wr.items() if k != "results"},
                "results": {
                    r.name: {
                        "op": r.op,
                        "durable": r.durable,
                        "times_s": r.times,
                        "median_s": r.median,
                        "gb_per_s": wr["bytes"] / r.median / 1e9,
                    }
                    for r in wr["results"].values()
                },
            }
            for name, wr in runs.items()
        },
        "bars": [{"bar": b.text, "measured": b.measured, "required": b.required, "pass": b.ok} for b in result],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--scale", type=float, default=1.0, help="multiply every workload size (0.05: a quick run)")
    p.add_argument("--repeat", type=int, default=5, help="repeats per contender; the tables show medians (default 5)")
    p.add_argument("--workloads", default="W1,W2,W3", help="comma-separated subset of W1,W2,W3 (default all)")
    p.add_argument("--dir", type=Path, default=None, help="where the files go (in a temp dir inside, removed after)")
    p.add_argument("--json", type=Path, default=None, help="also write every raw timing to this JSON file")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS measurement")
    p.add_argument("--rss-probe", nargs="+", metavar="INDEX=PATH", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_probe:
        return args
    args.workloads = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    bad = sorted(set(args.workloads) - {"W1", "W2", "W3"})
    if bad or not args.workloads:
        p.error(f"--workloads takes a comma-separated subset of W1,W2,W3 (got {bad or 'nothing'})")
    if not args.scale > 0:
        p.error("--scale must be positive")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rss_probe:
        rss_probe(args.rss_probe)
        return 0
    parent = (args.dir or default_parent()).expanduser().resolve()
    parent.mkdir(parents=True, exist_ok=True)
    if fs_of(parent)[0] in TMPFS_TYPES:
        log(f"warning: {parent} is on {fs_of(parent)[0]}: the disk numbers will measure memory")
    workdir = Path(tempfile.mkdtemp(prefix="torchkeep-bench-", dir=parent))
    env = env_info(workdir)
    runs: dict[str, dict[str, Any]] = {}
    gc.collect()
    gc.freeze()  # the import-time heap is permanent: keeps the collections between rounds cheap
    try:
        model = build_model(args.scale) if {"W1", "W3"} & set(args.workloads) else None
        for name in args.workloads:
            if name == "W2":
                w = w2(args.scale)
            else:
                assert model is not None
                w = w1(model) if name == "W1" else w3(model)
            runs[name] = run_workload(w, workdir, args.repeat, want_rss=name == "W1" and not args.no_rss)
            del w
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    env["loadavg_end"] = os.getloadavg()[0]
    result = report(runs, env, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_json(runs, env, args, result), indent=2) + "\n")
        log(f"raw timings written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

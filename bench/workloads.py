"""The workloads and contenders of ``bench_save_load.py``: what is saved, and each library's calls.

Nothing here times anything; ``bench_save_load.py`` runs, times and reports.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

import torchkeep as tk
import torchkeep.api as tk_api
import torchkeep.format.header as tk_header

MiB = 1 << 20
GiB = 1 << 30

# W1: 100 x Linear(1638, 1638) = 200 tensors, 1.0001 GiB of float32.
W1_LAYERS = 100
W1_WIDTH = 1638
# W2: 20,000 tensors of 2,621 float32 (10,484 bytes) = 200 MiB.
W2_COUNT = 20_000
W2_NUMEL = 2_621

# Contender names, as printed (the smoke test checks that each one appears).
TK_SAVE = "torchkeep save (durable)"
TK_SAVE_ND = "torchkeep save (durable=False)"
TK_SAVE_NOHASH = "torchkeep save (durable, checksums patched out)"
TK_SAVE_ND_NOHASH = "torchkeep save (durable=False, checksums patched out)"
TORCH_SAVE_FS = "torch.save + fsync"
TORCH_SAVE = "torch.save"
ST_SAVE_FS = "safetensors save_file + fsync"
ST_SAVE = "safetensors save_file"
RAW_WRITE_FS = "raw os.write + fsync"
RAW_WRITE = "raw os.write"
TK_LOAD = "torchkeep load (verify)"
TK_LOAD_NV = "torchkeep load (verify=False)"
TORCH_LOAD = "torch.load(weights_only=True)"
ST_LOAD = "safetensors load_file (pread)"
ST_LOAD_MMAP = "safetensors load_file (mmap, lazy)"
RAW_READ = "raw readinto (hot cache)"
RAW_MEMCPY = "raw memcpy (np.copyto)"
TK_RESTORE = "torchkeep restore (verify)"
TORCH_RESTORE = "torch.load + load_state_dict"

SAVE_NAMES = [
    TK_SAVE,
    TK_SAVE_ND,
    TK_SAVE_NOHASH,
    TK_SAVE_ND_NOHASH,
    TORCH_SAVE_FS,
    TORCH_SAVE,
    ST_SAVE_FS,
    ST_SAVE,
    RAW_WRITE_FS,
    RAW_WRITE,
]
LOAD_NAMES = [TK_LOAD, TK_LOAD_NV, TORCH_LOAD, ST_LOAD, ST_LOAD_MMAP, RAW_READ, RAW_MEMCPY]
RESTORE_NAMES = [TK_RESTORE, TORCH_RESTORE]
ALL_NAMES = SAVE_NAMES + LOAD_NAMES + RESTORE_NAMES


# --------------------------------------------------------------------------------------------
# raw I/O


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(path: Path, buf: np.ndarray, *, fsync: bool) -> None:
    """The raw limit: one ``os.write`` of the whole buffer (looped: Linux caps a call near 2 GiB)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        mv = memoryview(buf).cast("B")
        done = 0
        while done < len(mv):
            done += os.write(fd, mv[done:])
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_all(path: Path, buf: np.ndarray) -> None:
    """``readinto`` the whole file into a preallocated buffer of exactly its size."""
    mv = memoryview(buf).cast("B")
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < len(mv):
            n = f.readinto(mv[done:])
            if not n:
                raise EOFError(f"{path}: ended after {done} of {len(mv)} bytes")
            done += n


def raw_buffer(nbytes: int) -> np.ndarray:
    """``nbytes`` of float32 noise, faulted in: what the raw contenders write and copy.

    Noise, not a constant, because a constant buffer wrote faster on a virtual disk here.
    """
    buf = np.empty(nbytes, dtype=np.uint8)
    n4 = nbytes // 4 * 4
    g = torch.Generator().manual_seed(1)
    torch.from_numpy(buf[:n4].view(np.float32)).uniform_(-0.03, 0.03, generator=g)
    buf[n4:] = 0
    return buf


def warm(path: Path) -> None:
    """Read a file once so that the loads after it run from the page cache."""
    buf = bytearray(8 * MiB)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


# --------------------------------------------------------------------------------------------
# workloads


@dataclass
class Workload:
    """One workload, in the shape each library wants it (built inside the timed call)."""

    name: str
    desc: str
    tk_obj: Callable[[], Any]  # what torchkeep.save gets
    torch_obj: Callable[[], Any]  # what torch.save gets
    st_obj: Callable[[], tuple[dict[str, torch.Tensor], dict[str, str] | None]]  # save_file's tensors, metadata
    nbytes: int  # tensor bytes: the same for every contender
    n_tensors: int
    targets: dict[str, Any] | None = None  # restore targets (W3 only)


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def build_model(scale: float) -> torch.nn.Sequential:
    """W1's model: ``W1_LAYERS`` square ``nn.Linear`` layers, ~1 GiB of float32 at scale 1."""
    width = max(4, round(W1_WIDTH * math.sqrt(scale)))
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(W1_LAYERS)])


def w1(model: torch.nn.Sequential) -> Workload:
    sd = model.state_dict()
    width = model[0].weight.shape[0]
    return Workload(
        "W1",
        f"float32 model, {len(sd)} tensors ({W1_LAYERS} x Linear({width}, {width}))",
        tk_obj=model.state_dict,
        torch_obj=model.state_dict,
        st_obj=lambda: (model.state_dict(), None),
        nbytes=tensor_bytes(sd),
        n_tensors=len(sd),
    )


def w2(scale: float) -> Workload:
    """Many small tensors; ``scale`` changes how many, not their size (per-tensor cost is the point)."""
    count = max(20, round(W2_COUNT * scale))
    g = torch.Generator().manual_seed(0)
    sd = {f"blocks.{i // 4}.p{i % 4}": torch.randn(W2_NUMEL, generator=g) for i in range(count)}
    return Workload(
        "W2",
        f"{count} small float32 tensors of {W2_NUMEL * 4:,} bytes",
        tk_obj=lambda: sd,
        torch_obj=lambda: sd,
        st_obj=lambda: (sd, None),
        nbytes=tensor_bytes(sd),
        n_tensors=count,
    )


def adam_for(model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam with its state in place: one step on random gradients set directly (no backward pass).

    Random, not zero: a real ``exp_avg`` is not all zeros, and 2 GiB of zeros could flatter
    any layer that treats zero pages specially (virtual disks, compressing filesystems).
    """
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(2)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * 1e-3
    opt.step()
    for p in model.parameters():
        p.grad = None
    return opt


def st_flat_w3(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The flat tensors + string metadata a safetensors user has to build for model + optimizer."""
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    osd = opt.state_dict()
    meta = {"optimizer/param_groups": json.dumps(osd["param_groups"])}
    for pid, state in osd["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer/state/{pid}/{k}"] = v
            else:
                meta[f"optimizer/state/{pid}/{k}"] = json.dumps(v)
    return tensors, meta


def w3(model: torch.nn.Module) -> Workload:
    opt = adam_for(model)
    tensors, _ = st_flat_w3(model, opt)
    return Workload(
        "W3",
        f"W1 + Adam state, {len(tensors)} tensors",
        tk_obj=lambda: {"model": model, "optimizer": opt},
        torch_obj=lambda: {"model": model.state_dict(), "optimizer": opt.state_dict()},
        st_obj=lambda: st_flat_w3(model, opt),
        nbytes=tensor_bytes(tensors),
        n_tensors=len(tensors),
        targets={"model": model, "optimizer": opt},
    )


# --------------------------------------------------------------------------------------------
# contenders

# Pricing the checksums means reaching into torchkeep's save: these are the hooks it has
# hashed through so far (newest first). When none is found, the patched rows are skipped;
# when the one found is no longer called, the bar says so instead of printing a number.
_ZERO_DIGEST = "0" * len(getattr(tk_header, "digest", lambda b: "0" * 32)(b""))  # same width as a real one
_patched_calls = 0


class _NoDigests:
    """Stands in for ``torchkeep.hashing.Digests``: no hashing, zero digests."""

    def __init__(self, bufs: list[memoryview], *args: Any, **kwargs: Any) -> None:
        global _patched_calls
        _patched_calls += 1
        self.n = len(bufs)

    def result(self) -> list[str]:
        return [_ZERO_DIGEST] * self.n


def _no_hash_all(bufs: list[memoryview]) -> list[str]:
    """Stands in for the older ``torchkeep.api._hash_all``."""
    global _patched_calls
    _patched_calls += 1
    return [_ZERO_DIGEST] * len(bufs)


_HOOKS: list[tuple[str, Any]] = [("Digests", _NoDigests), ("_hash_all", _no_hash_all)]


def _hook() -> tuple[str, Any] | None:
    return next(((name, stub) for name, stub in _HOOKS if hasattr(tk_api, name)), None)


def can_patch_checksums() -> bool:
    return _hook() is not None


@contextlib.contextmanager
def checksums_patched_out() -> Iterator[None]:
    """Make ``torchkeep.save`` skip hashing (zero digests), to price the checksums. Diagnostic only."""
    hook = _hook()
    if hook is None:
        yield
        return
    name, stub = hook
    orig = getattr(tk_api, name)
    setattr(tk_api, name, stub)
    try:
        yield
    finally:
        setattr(tk_api, name, orig)


def patch_took_effect() -> bool:
    """False when torchkeep's save no longer goes through the hook (the patched rows then mean nothing)."""
    return _patched_calls > 0


@dataclass
class SaveContender:
    name: str
    family: str  # torchkeep | torch | safetensors | raw: the loads that read its file
    durable: bool
    fn: Callable[[Path], None]
    suffix: str
    makes_load_file: bool = False  # also writes, untimed, the file its family's loads read


def save_contenders(w: Workload, raw_src: np.ndarray) -> list[SaveContender]:
    def tk_save(durable: bool, hashed: bool) -> Callable[[Path], None]:
        def run(p: Path) -> None:
            if hashed:
                tk.save(w.tk_obj(), p, durable=durable)
            else:
                with checksums_patched_out():
                    tk.save(w.tk_obj(), p, durable=durable)

        return run

    def torch_save(p: Path, fsync: bool) -> None:
        if not fsync:
            torch.save(w.torch_obj(), p)
            return
        with open(p, "wb") as f:
            torch.save(w.torch_obj(), f)
            f.flush()
            os.fsync(f.fileno())

    def st_save(p: Path, fsync: bool) -> None:
        tensors, meta = w.st_obj()
        safetensors.torch.save_file(tensors, p, metadata=meta)
        if fsync:
            fsync_path(p)

    out = [
        SaveContender(TK_SAVE, "torchkeep", True, tk_save(True, True), ".safetensors", makes_load_file=True),
        SaveContender(TK_SAVE_ND, "torchkeep", False, tk_save(False, True), ".safetensors"),
    ]
    if can_patch_checksums():
        out += [
            SaveContender(TK_SAVE_NOHASH, "torchkeep", True, tk_save(True, False), ".safetensors"),
            SaveContender(TK_SAVE_ND_NOHASH, "torchkeep", False, tk_save(False, False), ".safetensors"),
        ]
    return [
        *out,
        SaveContender(TORCH_SAVE_FS, "torch", True, lambda p: torch_save(p, True), ".pt", makes_load_file=True),
        SaveContender(TORCH_SAVE, "torch", False, lambda p: torch_save(p, False), ".pt"),
        SaveContender(
            ST_SAVE_FS, "safetensors", True, lambda p: st_save(p, True), ".st.safetensors", makes_load_file=True
        ),
        SaveContender(ST_SAVE, "safetensors", False, lambda p: st_save(p, False), ".st.safetensors"),
        SaveContender(
            RAW_WRITE_FS, "raw", True, lambda p: write_all(p, raw_src, fsync=True), ".raw", makes_load_file=True
        ),
        SaveContender(RAW_WRITE, "raw", False, lambda p: write_all(p, raw_src, fsync=False), ".raw"),
    ]


def torch_restore(path: Path, targets: dict[str, Any]) -> Any:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    targets["model"].load_state_dict(sd["model"])
    targets["optimizer"].load_state_dict(sd["optimizer"])
    return sd


# safetensors >= 0.7 maps the file by default: load_file returns tensors whose pages are
# read on first use. backend="pread" reads into fresh memory, as torchkeep and torch.load do.
ST_HAS_PREAD = "backend" in inspect.signature(safetensors.torch.load_file).parameters


def st_load_eager(path: Path) -> dict[str, torch.Tensor]:
    if ST_HAS_PREAD:
        return safetensors.torch.load_file(path, backend="pread")
    return {k: v.clone() for k, v in safetensors.torch.load_file(path).items()}  # before 0.7: already eager


def st_load_mmap(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(path)


LoadCall = tuple[str, str, Callable[[], Any]]  # (op, contender name, call)


def load_groups(w: Workload, paths: dict[str, Path], raw: dict[str, np.ndarray]) -> list[tuple[str, list[LoadCall]]]:
    """Loads and restores grouped by the file they read: ``[(family, [(op, name, call)])]``.

    ``raw`` holds the ``src`` and ``dst`` buffers of the raw group, filled in by the caller
    just before that group runs (W3's are 3 GiB each: they are not kept for the others).
    """
    tkf, ptf, stf, rawf = (paths[k] for k in ("torchkeep", "torch", "safetensors", "raw"))
    tk_calls: list[LoadCall] = [
        ("load", TK_LOAD, lambda: tk.load(tkf)),
        ("load", TK_LOAD_NV, lambda: tk.load(tkf, verify=False)),
    ]
    torch_calls: list[LoadCall] = [
        ("load", TORCH_LOAD, lambda: torch.load(ptf, map_location="cpu", weights_only=True)),
    ]
    if w.targets is not None:
        targets = w.targets
        tk_calls.append(("restore", TK_RESTORE, lambda: tk.restore(tkf, targets)))
        torch_calls.append(("restore", TORCH_RESTORE, lambda: torch_restore(ptf, targets)))
    st_calls: list[LoadCall] = [("load", ST_LOAD, lambda: st_load_eager(stf))]
    if ST_HAS_PREAD:
        st_calls.append(("load", ST_LOAD_MMAP, lambda: st_load_mmap(stf)))
    return [
        (
            "raw",
            [
                ("load", RAW_READ, lambda: read_all(rawf, raw["dst"])),
                ("load", RAW_MEMCPY, lambda: np.copyto(raw["dst"], raw["src"])),
            ],
        ),
        ("torchkeep", tk_calls),
        ("torch", torch_calls),
        ("safetensors", st_calls),
    ]


# The peak-RSS probe: name -> (file family, loader).
RSS_LOADERS: dict[str, tuple[str, Callable[[Path], Any]]] = {
    TK_LOAD: ("torchkeep", lambda p: tk.load(p)),
    TORCH_LOAD: ("torch", lambda p: torch.load(p, map_location="cpu", weights_only=True)),
    ST_LOAD: ("safetensors", st_load_eager),
    ST_LOAD_MMAP: ("safetensors", st_load_mmap),
}

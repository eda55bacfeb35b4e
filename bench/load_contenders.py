"""The contenders of ``bench_load.py``: what one fresh process does, times and measures.

Each contender is a *kind* (a key of :data:`KINDS`): a set-up (untimed: a live model, an
optimizer that already stepped, bytes already in memory) and a timed call. :func:`run_spec`
runs one kind in the current process, which must be fresh: it first runs the same kind once
on a tiny warm-up file (lazy imports and first-call set-up of every library are then paid),
then resets the peak-RSS counter and times the call on the real file. Nothing here decides
what is compared with what: ``bench_load.py`` does, and starts the processes through
:class:`Runner` (``python bench/load_contenders.py --serve``: a server that imports once and
forks one child per run; ``--child SPEC``: one run in a new interpreter).

"Touch": every load that returns tensors is followed, inside the timed region, by one
single-threaded xxh3-64 pass over each distinct storage of the result, so that a lazy (memory
mapped) load pays for reading its bytes just as a copying one does. The same touch is used by
every contender and floor.
"""

from __future__ import annotations

import gc
import inspect
import json
import mmap
import os
import re
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import xxhash

import torchkeep as tk
from workloads import adam_for, build_model

MiB = 1 << 20
HASH_THREADS = min(2, os.cpu_count() or 1)  # the floors hash on both cores of the reference machine
JOB = 32 * MiB  # one thread's share of a pread + hash pass
PIECE = 1 * MiB  # read a piece, hash it while it is in cache
WARM_SCALE = 1e-6  # build_model(WARM_SCALE): 100 x Linear(4, 4), the warm-up model

# safetensors names of the dtypes the floors build views of
ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def tk_load_takes_mmap() -> bool:
    """Whether this torchkeep's ``load`` has the zero-copy ``mmap=`` option."""
    return "mmap" in inspect.signature(tk.load).parameters


# --------------------------------------------------------------------------------------------
# the shared pieces: touch, hash passes, pread


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v)


def storage_bytes(s: torch.UntypedStorage) -> np.ndarray:
    return torch.empty(0, dtype=torch.uint8).set_(s).numpy()


def touch(obj: Any) -> int:
    """Read every byte of every distinct CPU storage in ``obj`` once (xxh3-64, one thread); bytes read.

    A device result is touched by synchronizing the device (its bytes are already there).
    """
    seen: set[int] = set()
    n = 0
    sync = False
    for t in tensors_in(obj):
        if t.device.type != "cpu":
            sync = True
            continue
        s = t.untyped_storage()
        ptr, nb = s.data_ptr(), s.nbytes()
        if nb == 0 or ptr in seen:
            continue
        seen.add(ptr)
        xxhash.xxh3_64_intdigest(storage_bytes(s))
        n += nb
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    return n


def tensor_bytes_view(t: torch.Tensor) -> np.ndarray:
    return t.detach().reshape(-1).view(torch.uint8).numpy()


def hash_tensors(tensors: dict[str, torch.Tensor], pool: ThreadPoolExecutor) -> list[str]:
    """One xxh3-128 pass over each tensor's bytes, on ``HASH_THREADS`` threads (xxhash frees the GIL)."""
    views = [tensor_bytes_view(t) for t in tensors.values() if t.numel()]
    return list(pool.map(lambda v: xxhash.xxh3_128(v).hexdigest(), views))


def read_header(fd: int) -> tuple[int, dict[str, Any]]:
    """``(offset of the data section, header)`` of a safetensors file."""
    (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    return 8 + n, json.loads(os.pread(fd, n, 8))


def pread_full(fd: int, buf: memoryview, off: int) -> None:
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [buf[got:]], off + got)
        if n <= 0:
            raise EOFError(f"the file ended {len(buf) - got} bytes early")
        got += n


def pread_hash(fd: int, buf: memoryview, file_off: int, pool: ThreadPoolExecutor) -> list[str]:
    """Read ``len(buf)`` bytes from ``file_off`` into ``buf``, each piece hashed (xxh3-128) right after it is read."""

    def job(start: int) -> str:
        h = xxhash.xxh3_128()
        end = min(start + JOB, len(buf))
        pos = start
        while pos < end:
            stop = min(pos + PIECE, end)
            pread_full(fd, buf[pos:stop], file_off + pos)
            h.update(buf[pos:stop])
            pos = stop
        return h.hexdigest()

    return list(pool.map(job, range(0, len(buf), JOB)))


def views_of(flat: torch.Tensor, header: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors header as views of ``flat`` (the data section, as bytes)."""
    out = {}
    for k, e in header.items():
        if k == "__metadata__":
            continue
        a, b = e["data_offsets"]
        out[k] = flat[a:b].view(ST_DTYPES[e["dtype"]]).reshape(e["shape"])
    return out


def anon_map(nbytes: int, huge: bool) -> mmap.mmap:
    """A private anonymous mapping of ``nbytes`` (at least 1), with ``MADV_HUGEPAGE`` when ``huge`` (Linux)."""
    m = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge and hasattr(mmap, "MADV_HUGEPAGE"):
        m.madvise(mmap.MADV_HUGEPAGE)
    return m


def pread_floor(path: str, pool: ThreadPoolExecutor, alloc: str) -> dict[str, torch.Tensor]:
    """A copying floor: allocate the data section once, pread + hash it on both cores, return views."""
    fd = os.open(path, os.O_RDONLY)
    try:
        off, header = read_header(fd)
        nbytes = os.fstat(fd).st_size - off
        if alloc == "huge":
            flat = torch.frombuffer(anon_map(nbytes, True), dtype=torch.uint8)[:nbytes]
        else:
            flat = torch.empty(nbytes, dtype=torch.uint8)
        pread_hash(fd, memoryview(flat.numpy()), off, pool)
    finally:
        os.close(fd)
    return views_of(flat, header)


# --------------------------------------------------------------------------------------------
# set-ups (untimed) and timed calls, per kind


def live_model(spec: dict[str, Any], warm: bool) -> torch.nn.Module:
    return build_model(WARM_SCALE if warm else spec["scale"])


def model_and_adam(spec: dict[str, Any], warm: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = live_model(spec, warm)
    return model, adam_for(model)


def restore_pairs(model: torch.nn.Module, opt: torch.optim.Optimizer, tree: Any) -> list[tuple[torch.Tensor, Any]]:
    """(live tensor, loaded tensor) for every tensor a restore of ``tree`` writes."""
    pairs = [(t, tree["model"][k]) for k, t in model.state_dict().items()]
    saved_state = tree["optimizer"]["state"]
    for pid, state in opt.state_dict()["state"].items():
        saved = saved_state[pid] if pid in saved_state else saved_state[str(pid)]
        pairs += [(v, saved[k]) for k, v in state.items() if isinstance(v, torch.Tensor)]
    return pairs


Setup = Callable[[dict[str, Any], bool], Any]
Timed = Callable[[dict[str, Any], Any, ThreadPoolExecutor], Any]


def _copy_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for dst, src in pairs:
            dst.copy_(src)


def _restore_floor_setup(spec: dict[str, Any], warm: bool) -> Any:
    model, opt = model_and_adam(spec, warm)
    src = _copying_load(spec["path"])  # the same bytes, already in memory (faulted in by the load)
    return restore_pairs(model, opt, src), src


def _restore_read_setup(spec: dict[str, Any], warm: bool) -> Any:
    """W3's live tensors, each beside its stored bytes' place in the file (largest first)."""
    model, opt = model_and_adam(spec, warm)
    fd = os.open(spec["path"], os.O_RDONLY)
    try:
        off, header = read_header(fd)
    finally:
        os.close(fd)
    live = {f"model/{k}": t for k, t in model.state_dict().items()}
    for pid, state in opt.state_dict()["state"].items():
        live.update((f"optimizer/state/{pid}/{k}", v) for k, v in state.items() if isinstance(v, torch.Tensor))
    jobs = [(tensor_bytes_view(t), off + header[k]["data_offsets"][0]) for k, t in live.items()]
    return sorted(jobs, key=lambda j: -len(j[0])), (model, opt)


def _restore_read_floor(spec: dict[str, Any], state: Any, pool: ThreadPoolExecutor) -> list[str]:
    """A verified read into the live tensors: whole tensors shared out on both cores, each read in
    1 MiB pieces, each piece hashed (xxh3-128) right after it is read."""
    jobs, _ = state
    fd = os.open(spec["path"], os.O_RDONLY)

    def one(job: tuple[np.ndarray, int]) -> str:
        buf, off = job
        mv = memoryview(buf)
        h = xxhash.xxh3_128()
        for pos in range(0, len(mv), PIECE):
            piece = mv[pos : pos + PIECE]
            pread_full(fd, piece, off + pos)
            h.update(piece)
        return h.hexdigest()

    try:
        return list(pool.map(one, jobs))
    finally:
        os.close(fd)


def _gpu_floor_setup(spec: dict[str, Any], warm: bool) -> Any:
    dev = torch.device(spec["device"])
    fd = os.open(spec["path"], os.O_RDONLY)
    try:
        off, _ = read_header(fd)
        nbytes = os.fstat(fd).st_size - off
    finally:
        os.close(fd)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=dev.type == "cuda")
    host.fill_(1)  # faulted in (and, pinned, locked)
    return host, torch.empty(nbytes, dtype=torch.uint8, device=dev), off


def _gpu_floor(spec: dict[str, Any], state: Any, pool: ThreadPoolExecutor) -> dict[str, float]:
    """The two limits of a load to the device, each timed alone: page-cache read, pinned host-to-device copy."""
    host, dev_buf, off = state
    sync = torch.cuda.synchronize if dev_buf.device.type == "cuda" else (lambda: None)
    fd = os.open(spec["path"], os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        mv = memoryview(host.numpy())
        list(pool.map(lambda a: pread_full(fd, mv[a : a + JOB], off + a), range(0, len(mv), JOB)))
        t1 = time.perf_counter()
        dev_buf.copy_(host, non_blocking=True)
        sync()
        t2 = time.perf_counter()
    finally:
        os.close(fd)
    return {"read_s": t1 - t0, "h2d_s": t2 - t1}


def _no_setup(spec: dict[str, Any], warm: bool) -> None:
    return None


def _copying_load(path: str) -> Any:
    return tk.load(path, mmap=False) if tk_load_takes_mmap() else tk.load(path)


def _gpu_sync(out: Any) -> Any:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out


def touched(obj: Any) -> Any:
    touch(obj)
    return obj


def _st_load_hash(spec: dict[str, Any], _: Any, pool: ThreadPoolExecutor) -> Any:
    sd = safetensors.torch.load_file(spec["path"])
    hash_tensors(sd, pool)
    return touched(sd)


def _load_into_floor(spec: dict[str, Any], model: Any, pool: ThreadPoolExecutor) -> Any:
    sd = safetensors.torch.load_file(spec["path"])
    hash_tensors(sd, pool)
    return model.load_state_dict(sd)


# kind -> (set-up, timed call). The timed call's result is kept alive until the RSS is read.
KINDS: dict[str, tuple[Setup, Timed]] = {
    "tk_load_mmap": (_no_setup, lambda s, _, p: touched(tk.load(s["path"], mmap=True))),
    "tk_load_copy": (_no_setup, lambda s, _, p: touched(_copying_load(s["path"]))),
    "st_load": (_no_setup, lambda s, _, p: touched(safetensors.torch.load_file(s["path"]))),
    "st_load_hash": (_no_setup, _st_load_hash),
    "huge_pread_hash": (_no_setup, lambda s, _, p: touched(pread_floor(s["path"], p, "huge"))),
    "empty_pread_hash": (_no_setup, lambda s, _, p: touched(pread_floor(s["path"], p, "empty"))),
    "torch_load": (_no_setup, lambda s, _, p: touched(torch.load(s["path"], map_location="cpu", weights_only=True))),
    "load_into": (live_model, lambda s, model, p: tk.load_into(model, s["path"])),
    "load_into_floor": (live_model, _load_into_floor),
    "restore": (model_and_adam, lambda s, st, p: tk.restore(s["path"], {"model": st[0], "optimizer": st[1]})),
    "restore_floor": (_restore_floor_setup, lambda s, st, p: _copy_pairs(st[0])),
    "restore_unverified": (
        model_and_adam,
        lambda s, st, p: tk.restore(s["path"], {"model": st[0], "optimizer": st[1]}, verify=False),
    ),
    "restore_read_floor": (_restore_read_setup, _restore_read_floor),
    "gpu_tk": (_no_setup, lambda s, _, p: _gpu_sync(tk.load(s["path"], map_location=s["device"]))),
    "gpu_st": (_no_setup, lambda s, _, p: _gpu_sync(safetensors.torch.load_file(s["path"], device=s["device"]))),
    "gpu_torch": (
        _no_setup,
        lambda s, _, p: _gpu_sync(torch.load(s["path"], map_location=s["device"], weights_only=True)),
    ),
    "gpu_floor": (_gpu_floor_setup, _gpu_floor),
}


# --------------------------------------------------------------------------------------------
# one run, in a fresh process


def proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) if m else -1


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so that the peak read after is this call's own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hot_page_cache(path: str) -> None:
    """Read ``path`` once, just before the timed call: every contender starts from a hot page cache.

    Reading every file once before the rounds is not enough on a machine that reclaims idle
    page cache (the reference VM pages out memory left untouched for a minute, up to 128 MiB/s,
    through DAMON): by a contender's turn, part of its file may be back on disk, which slows
    only the contenders that read the file inside the timed region, not the floors that
    copy bytes already in memory.
    """
    buf = bytearray(8 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one contender in this (fresh) process: warm up on the tiny file, then one timed call.

    Returns ``{"time_s", "extra", "rss": {...}}``; the time of ``gpu_floor`` is the slower of
    its two limits (a pipelined load can overlap them, not beat the slower one).
    """
    setup, call = KINDS[spec["kind"]]
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        warm_spec = {**spec, "path": spec["warm_path"]}
        call(warm_spec, setup(warm_spec, True), pool)  # lazy imports, first-call set-up: not timed
        state = setup(spec, False)
        hot_page_cache(spec["path"])
        gc.collect()
        base, anon_base = proc_status_kib("VmRSS"), proc_status_kib("RssAnon")
        reset = reset_peak_rss()
        gc.disable()
        t0 = time.perf_counter()
        out = call(spec, state, pool)
        dt = time.perf_counter() - t0
        gc.enable()
        rss = {
            "base_kib": base,
            "peak_kib": proc_status_kib("VmHWM"),
            "anon_base_kib": anon_base,
            "anon_after_kib": proc_status_kib("RssAnon"),
            "hwm_reset": reset,
        }
    extra: dict[str, float] = {}
    if spec["kind"] == "gpu_floor":
        extra = out
        dt = max(out["read_s"], out["h2d_s"])
    del out, state
    return {"time_s": dt, "extra": extra, "rss": rss}


# --------------------------------------------------------------------------------------------
# the processes: ``python load_contenders.py --serve`` forks one child per spec read on stdin;
# ``--child SPEC`` runs one spec in a process of its own.

SCRIPT = Path(__file__).resolve()


class Runner:
    """Runs one spec in a fresh process: forked from a server that only imported, or spawned."""

    def __init__(self, spawn: bool) -> None:
        self.spawn = spawn
        self.server: subprocess.Popen[str] | None = None
        if not spawn:
            self.server = subprocess.Popen(
                [sys.executable, str(SCRIPT), "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            assert self.server.stdout is not None
            if self.server.stdout.readline().strip() != "ready":
                raise SystemExit("the process server did not start (see above)")

    def run(self, spec: dict[str, Any]) -> dict[str, Any]:
        if self.spawn:
            p = subprocess.run(
                [sys.executable, str(SCRIPT), "--child", json.dumps(spec)], capture_output=True, text=True, check=False
            )
            lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
            if not lines:
                return {"error": (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]}
            return json.loads(lines[-1][len("RESULT ") :])
        assert self.server is not None and self.server.stdin is not None and self.server.stdout is not None
        self.server.stdin.write(json.dumps(spec) + "\n")
        self.server.stdin.flush()
        line = self.server.stdout.readline()
        return json.loads(line) if line else {"error": "the process server died"}

    def close(self) -> None:
        if self.server is not None:
            assert self.server.stdin is not None
            self.server.stdin.close()
            self.server.wait(timeout=60)


def serve() -> None:
    """``--serve``: import (done), then fork one child per spec read on stdin; one JSON result line each.

    This process runs no torch op: its children start as a process that has only imported.
    """
    print("ready", flush=True)
    for line in sys.stdin:
        spec = json.loads(line)
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            os.close(rfd)
            os.dup2(2, 1)  # whatever a library prints stays off the result channel
            try:
                res = run_spec(spec)
            except BaseException as e:
                res = {"error": f"{type(e).__name__}: {e}"}
            with os.fdopen(wfd, "wb") as f:
                f.write(json.dumps(res).encode())
            os._exit(0)
        os.close(wfd)
        with os.fdopen(rfd, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        res = json.loads(data) if data else {"error": f"the process died (wait status {status})"}
        print(json.dumps(res), flush=True)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--serve"]:
        serve()
    elif argv[:1] == ["--child"] and len(argv) == 2:
        print("RESULT " + json.dumps(run_spec(json.loads(argv[1]))), flush=True)
    else:
        print(f"usage: {SCRIPT.name} --serve | --child SPEC_JSON (run by bench_load.py)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Command-line start-up and ``torchkeep verify`` against their floors, measured in one run.

Each contender runs as a fresh process (what a person at a terminal pays), interleaved in
rounds; the report gives medians of wall times and of per-round ratios:

- start-up: ``python -c "import torch"`` beside ``torchkeep --help``, ``torchkeep --version`` and
  ``torchkeep inspect`` of a small file (goal: inspect < 0.25 s; none of them imports torch);
- verify: ``torchkeep verify`` of a large file beside a raw read + xxh3-128 of the same bytes in
  a fresh process (goal: within 1.2x), and beside the same hash over a memory map (the floor),
  page cache hot.

    python bench/bench_cli.py                 # 1 GiB file, 10 rounds
    python bench/bench_cli.py --size-mib 64 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_MAP_HASH = """
import mmap, os, sys, xxhash
h = xxhash.xxh3_128()
fd = os.open(sys.argv[1], os.O_RDONLY)
size, pos = os.fstat(fd).st_size, 0
while pos < size:
    n = min(64 << 20, size - pos)
    with mmap.mmap(fd, n, access=mmap.ACCESS_READ, offset=pos) as m, memoryview(m) as v:
        h.update(v)
    pos += n
print(h.hexdigest())
"""

_RAW_HASH = """
import os, sys, xxhash
h = xxhash.xxh3_128()
with open(sys.argv[1], "rb", buffering=0) as f:
    while chunk := f.read(64 << 20):
        h.update(chunk)
print(h.hexdigest())
"""


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "torchkeep"
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from torchkeep.cli import main; main()"]


#: as a user's installed package runs: bytecode cached (the warm-up writes it)
_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_ENV)
    return time.perf_counter() - t0


def _make_files(directory: Path, size_mib: int) -> tuple[Path, Path]:
    import torch

    import torchkeep as tk

    small = tk.save({"model": torch.nn.Linear(64, 64), "epoch": 1}, directory / "small.safetensors")
    n = size_mib * (1 << 20) // 4 // 16
    big = tk.save({f"t{i}": torch.randn(n) for i in range(16)}, directory / "big.safetensors")
    return small, big


def _report(name: str, times: list[float], base: list[float] | None = None) -> None:
    med = statistics.median(times)
    line = f"  {name:<34} {med * 1000:8.1f} ms"
    if base is not None:
        ratios = [t / b for t, b in zip(times, base, strict=True)]
        line += f"   {statistics.median(ratios):5.2f}x (median of per-round ratios)"
    print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024, help="size of the file verify checks (MiB)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the files (default: a temp dir)")
    args = ap.parse_args()
    directory = args.dir or Path(tempfile.mkdtemp(prefix="torchkeep-bench-cli-"))
    directory.mkdir(parents=True, exist_ok=True)
    small, big = _make_files(directory, args.size_mib)
    cli = _cli()
    startup = {
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "torchkeep --help": [*cli, "--help"],
        "torchkeep --version": [*cli, "--version"],
        "torchkeep inspect (small file)": [*cli, "inspect", str(small)],
    }
    verify = {
        "raw read + xxh3-128 (fresh process)": [sys.executable, "-c", _RAW_HASH, str(big)],
        "raw mmap + xxh3-128 (fresh process)": [sys.executable, "-c", _MAP_HASH, str(big)],
        "torchkeep verify": [*cli, "verify", str(big)],
    }
    for cmd in [*startup.values(), *verify.values()]:  # warm the page cache and the bytecode caches
        _wall(cmd)
    times: dict[str, list[float]] = {k: [] for k in [*startup, *verify]}
    for _ in range(args.rounds):
        for name, cmd in [*startup.items(), *verify.items()]:
            times[name].append(_wall(cmd))
    print(f"torchkeep CLI, {args.rounds} interleaved rounds, each command a fresh process ({os.cpu_count()} CPUs)")
    print("start-up:")
    base = times["python -c 'import torch'"]
    for name in startup:
        _report(name, times[name], None if name.startswith("python") else base)
    size = big.stat().st_size
    print(f"verify of {size / (1 << 30):.2f} GiB, page cache hot:")
    raw = times["raw read + xxh3-128 (fresh process)"]
    _report("raw read + xxh3-128 (fresh process)", raw)
    _report("raw mmap + xxh3-128 (fresh process)", times["raw mmap + xxh3-128 (fresh process)"])
    _report("torchkeep verify", times["torchkeep verify"], raw)
    _report("  vs the mmap floor", times["torchkeep verify"], times["raw mmap + xxh3-128 (fresh process)"])
    print(f"  raw throughput {size / statistics.median(raw) / (1 << 30):.2f} GiB/s")


if __name__ == "__main__":
    main()

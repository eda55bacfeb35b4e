"""Smoke test of bench/bench_save_load.py: a tiny run exits 0 and prints every table and contender.

No timing is asserted: this only keeps the benchmark runnable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_save_load.py"

CONTENDERS = [
    # save
    "torchkeep save (durable)",
    "torchkeep save (durable=False)",
    "torch.save + fsync",
    "torch.save",
    "safetensors save_file + fsync",
    "safetensors save_file",
    "raw os.write + fsync",
    "raw os.write",
    # load
    "torchkeep load (verify)",
    "torchkeep load (verify=False)",
    "torch.load(weights_only=True)",
    "safetensors load_file (pread)",
    "safetensors load_file (mmap, lazy)",
    "raw readinto (hot cache)",
    "raw memcpy (np.copyto)",
    # restore (W3)
    "torchkeep restore (verify)",
    "torch.load + load_state_dict",
]
HEADERS = ["op", "contender", "median s", "min-max s", "GB/s", "x torch", "x safetensors", "x raw"]


def test_tiny_run_prints_every_table_and_contender(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    files = tmp_path / "files"
    cmd = [
        sys.executable,
        str(BENCH),
        "--scale",
        "0.002",
        "--repeat",
        "1",
        "--dir",
        str(files),
        "--json",
        str(out_json),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout

    for heading in ["## W1:", "## W2:", "## W3:", "### W1: peak RSS", "## bars"]:
        assert heading in out, heading
    header_rows = [line for line in out.splitlines() if line.startswith("| op ")]
    assert len(header_rows) == 3  # one table per workload
    for h in HEADERS:
        assert f" {h} " in header_rows[0], h
    rows = {line.split("|")[2].strip() for line in out.splitlines() if line.startswith("| ") and line.count("|") > 8}
    for name in CONTENDERS:
        assert name in rows, name
    for loader in ["torchkeep load (verify)", "torch.load(weights_only=True)", "safetensors load_file (pread)"]:
        assert any(line.startswith(f"| {loader} ") and "MiB" in line for line in out.splitlines()), loader
    assert "bars pass" in out
    assert "PASS" in out or "FAIL" in out

    data = json.loads(out_json.read_text())
    assert set(data["workloads"]) == {"W1", "W2", "W3"}
    for name in CONTENDERS:
        wl = "W3" if "restore" in name or "load_state_dict" in name else "W1"
        assert len(data["workloads"][wl]["results"][name]["times_s"]) == 1, name
    assert len(data["bars"]) == 12
    # the benchmark's files are gone: only its (empty) parent directory is left
    assert list(files.iterdir()) == []


def test_gpu_benchmark_dry_run_on_cpu(tmp_path: Path) -> None:
    """bench_gpu.py runs end to end on the CPU (its real run needs CUDA) and prints every row."""
    script = Path(__file__).resolve().parents[1] / "bench" / "bench_gpu.py"
    env = {**os.environ, "TK_BENCH_DIR": str(tmp_path)}
    cmd = [sys.executable, str(script), "--device", "cpu", "--scale", "0.001", "--repeat", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [
        line.split("|")[1].strip() for line in proc.stdout.splitlines() if line.startswith("| ") and "s |" not in line
    ]
    for name in ["save: torchkeep (durable=False)", "load: torch.load", "restore: torchkeep into the model"]:
        assert name in rows, name
    assert list(tmp_path.iterdir()) == []


def test_async_stall_benchmark_runs(tmp_path: Path) -> None:
    """bench_async.py prints the stall table and the bar line (no timing is asserted)."""
    script = Path(__file__).resolve().parents[1] / "bench" / "bench_async.py"
    cmd = [sys.executable, str(script), "--scale", "0.002", "--repeat", "1", "--dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for row in ["copy limit", "async save: stall inside submit()", "sync tk.save (durable)", "bar: async stall"]:
        assert row in proc.stdout, row
    assert list(tmp_path.iterdir()) == []

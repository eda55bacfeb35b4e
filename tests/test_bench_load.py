"""Smoke test of bench/bench_load.py: a tiny run exits 0, runs every contender, prints every goal.

No timing is asserted: this only keeps the benchmark runnable (each contender runs in a process
of its own, hence the slow mark).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_load.py"

CONTENDERS = {
    "W1": [
        "tk.load(mmap=True) + touch",
        "floor: load_file + xxh3 pass + touch",
        "load_file (unverified) + touch",
        "tk.load (copying) + touch",
        "floor: torch.empty + pread + xxh3 + touch",
        "huge-page map + pread + xxh3 + touch",
        "torch.load(weights_only=True) + touch",
        "tk.load_into(model)",
        "floor: load_file + xxh3 pass + load_state_dict",
    ],
    "W3": [
        "tk.restore(model + Adam)",
        "floor: copy_ into the live tensors",
        "pread + xxh3 into the live tensors",
        "tk.restore(verify=False)",
    ],
    "W4": [
        "tk.load (copying) + touch",
        "floor: torch.empty + pread + xxh3 + touch",
        "tk.load(mmap=True) + touch",
        "floor: load_file + xxh3 pass + touch",
    ],
    "W2": ["tk.load + touch", "safetensors load_file + touch", "torch.load(weights_only=True) + touch"],
    "tiny": ["tk.load + touch", "safetensors load_file + touch", "torch.load(weights_only=True) + touch"],
    "GPU": [
        "tk.load(map_location=dev)",
        "load_file(device=dev)",
        "torch.load(map_location=dev)",
        "floor: max(page-cache read, pinned H2D)",
    ],
}


@pytest.mark.slow
def test_tiny_run_times_every_contender(tmp_path: Path) -> None:
    out_json = tmp_path / "load.json"
    files = tmp_path / "files"
    cmd = [sys.executable, str(BENCH), "--scale", "0.001", "--rounds", "1", "--tiny-count", "50"]
    cmd += ["--gpu-device", "cpu", "--dir", str(files), "--json", str(out_json)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout

    for heading in ["## W1:", "## W3:", "## W4:", "## W2:", "## tiny:", "## GPU:", "## other ratios", "## goals"]:
        assert heading in out, heading
    assert "goals pass" in out
    assert "PASS" in out or "FAIL" in out

    data = json.loads(out_json.read_text())
    results = data["contenders"]
    assert set(results) == {f"{wl}: {name}" for wl, names in CONTENDERS.items() for name in names}
    for key, r in results.items():
        if r["skipped"]:  # only the zero-copy load, on a torchkeep without tk.load(mmap=True)
            assert key.endswith(": tk.load(mmap=True) + touch") and not data["env"]["tk_load_mmap"], key
            continue
        assert r["errors"] == [], (key, r["errors"])
        assert len(r["times_s"]) == 1 and r["times_s"][0] > 0, key
        assert r["rss_kib"][0]["peak_kib"] > 0, key
    assert results["W1: tk.load (copying) + touch"]["x_floor"] > 0
    assert len(data["goals"]) == 11
    # the benchmark's files are gone: only its (empty) parent directory is left
    assert list(files.iterdir()) == []


def test_restore_read_floor_reads_the_stored_bytes(tmp_path: Path) -> None:
    """The verified-read floor puts each stored tensor's bytes into its live tensor and hashes them."""
    sys.path.insert(0, str(BENCH.parent))
    try:
        from concurrent.futures import ThreadPoolExecutor

        import torch

        import load_contenders as lc
        import torchkeep as tk
        from workloads import adam_for, build_model
    finally:
        sys.path.remove(str(BENCH.parent))
    model = build_model(1e-4)
    opt = adam_for(model)
    path = tk.save({"model": model, "optimizer": opt}, tmp_path / "w3.safetensors")
    spec = {"path": str(path), "scale": 1e-4}
    jobs, (live_model, live_opt) = lc._restore_read_setup(spec, warm=False)
    with torch.no_grad():
        for p in live_model.parameters():
            p.zero_()
    with ThreadPoolExecutor(2) as pool:
        digests = lc._restore_read_floor(spec, (jobs, (live_model, live_opt)), pool)
    # each parameter, and its step, exp_avg and exp_avg_sq: every tensor of the file
    assert len(digests) == len(jobs) == 4 * len(list(model.parameters()))
    for a, b in zip(model.parameters(), live_model.parameters(), strict=True):
        assert torch.equal(a, b)
    with tk.open(path) as ck:
        assert sorted(digests) == sorted(ck.header.checksums.values())

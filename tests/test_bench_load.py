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
    "W3": ["tk.restore(model + Adam)", "floor: copy_ into the live tensors"],
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

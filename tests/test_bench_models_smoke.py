"""Smoke test of bench/bench_model_formats.py: a tiny run exits 0 and prints both tables, every style.

No timing is asserted: this only keeps the benchmark runnable, and checks the properties it reports
(a full pickle needs the original module path and unpickles; save_model does neither).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import torchkeep as tk

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_model_formats.py"
STYLES = ["full-model pickle", "state dict", "torchkeep save_model"]
HEADERS = [
    "style",
    "file",
    "save s (fsync'd)",
    "import model class s",
    "load s",
    "subprocess total s",
    "peak RSS of load",
]


@pytest.mark.skipif(
    not all(hasattr(tk, n) for n in ("register_model", "save_model", "load_model")),
    reason="torchkeep has no register_model/save_model/load_model yet (src/torchkeep/registry.py)",
)
def test_tiny_run_prints_every_style(tmp_path: Path) -> None:
    cmd = [sys.executable, str(BENCH), "--scale", "0.001", "--repeat", "1", "--dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()

    header = next(line for line in lines if line.startswith("| style ") and "file" in line)
    for h in HEADERS:
        assert f" {h} " in header, h
    rows = {}
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in STYLES:
            rows.setdefault(cells[0], []).append(cells)
    assert set(rows) == set(STYLES)
    for style in STYLES:
        numbers, _props = rows[style]  # one row in the measurements table, one in the properties table
        assert len(numbers) == len(header.strip().strip("|").split("|"))
        assert numbers[1].endswith(("KiB", "MiB")), numbers
    assert rows["state dict"][0][2] == "1.0000"  # the ratio baseline
    assert rows["full-model pickle"][1][1].startswith("fails: ModuleNotFoundError")
    assert rows["full-model pickle"][1][3].startswith("yes: full pickle")
    assert rows["state dict"][1][1:] == ["works", "works", "yes: torch weights-only unpickler (allowlisted globals)"]
    assert rows["torchkeep save_model"][1][1:] == ["works", "works", "no"]
    # the benchmark's files are gone: only its (empty) parent directory is left
    assert list(tmp_path.iterdir()) == []

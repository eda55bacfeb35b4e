"""Fuzz targets for the pickle scanner and the zip reader (hypothesis).

Brief in ``make test``; longer with, e.g.::

    TORCHKEEP_FUZZ_EXAMPLES=200000 python -m pytest tests/test_fuzz_scan.py -p no:cacheprovider \\
        --hypothesis-show-statistics

Properties: the scanner and the reader only ever raise ``CorruptCheckpointError``; a pickle the scan
finds well formed asks the C unpickler (reading it from a file object, as torch does) for no global
the scan did not report; a zip the reader accepts holds exactly the bytes Python's ``zipfile`` reads.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchkeep.container import read_zip
from torchkeep.errors import CorruptCheckpointError
from torchkeep.scan import scan

EXAMPLES = int(os.environ.get("TORCHKEEP_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)

_SEEDS = [pickle.dumps({"a": [1, 2.5, "x", b"y"], "t": (None, True)}, protocol=p) for p in range(6)] + [
    b"\x80\x04\x95\x15\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94\x8c\x03len\x94\x93\x94.",
    b"\x80\x02cbuiltins\nset\n]\x85R.",
]


class _Stub:
    def __init__(self, *a: Any, **k: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _Recorder(pickle.Unpickler):
    """The C unpickler, every global replaced by a harmless stub: records what the file would import."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self.asked: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        self.asked.add(f"{module}.{name}")
        return _Stub

    def persistent_load(self, pid: Any) -> Any:
        return None


def _mutate(seed: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    data = bytearray(seed)
    for at, value in edits:
        if data:
            data[at % len(data)] = value
    return bytes(data[: max(1, len(data) - cut)])


def _scan_bytes(data: bytes, suffix: str = ".pkl") -> Any:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"f{suffix}"
        path.write_bytes(data)
        try:
            return scan(path)
        except CorruptCheckpointError:
            return None


@FUZZ
@given(
    seed=st.sampled_from(_SEEDS),
    edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, 4),
    extra=st.binary(max_size=24),
)
def test_fuzz_pickle_scanner(seed: bytes, edits: list[tuple[int, int]], cut: int, extra: bytes) -> None:
    data = _mutate(seed, edits, cut)
    if extra:
        at = edits[0][0] % len(data) if edits else 0
        data = data[:at] + extra + data[at:]
    report = _scan_bytes(data)
    if report is None or report.issues or not report.complete:
        return  # refused: fine whatever the C unpickler would do
    rec = _Recorder(data)
    try:
        rec.load()
    except Exception:
        pass
    from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING

    seen = set(report.globals) | set(report.dangerous)
    for full in rec.asked:
        module, _, name = full.partition(".")
        assert (
            full in seen
            or any(g.endswith("." + name) or g == full for g in seen)
            or ((module, name) in NAME_MAPPING or module in IMPORT_MAPPING)
        ), (full, report.globals, data)


def _real_zip() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(4), "b": [1, 2]}, buf)
    return buf.getvalue()


_ZIP = _real_zip()


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, len(_ZIP) - 1), st.integers(0, 255)), min_size=1, max_size=4),
    tail=st.binary(max_size=8),
)
def test_fuzz_zip_reader(edits: list[tuple[int, int]], tail: bytes) -> None:
    data = bytearray(_ZIP)
    for at, value in edits:
        data[at] = value
    data = bytes(data) + tail
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.pt"
        path.write_bytes(data)
        try:
            view = read_zip(path)
        except CorruptCheckpointError:
            return
        assert sum(e.size for e in view.entries) <= len(data)
        ours = {e.raw: data[e.offset : e.offset + e.size] for e in view.entries}
        try:
            with zipfile.ZipFile(path) as zf:
                theirs = {i.orig_filename.encode("utf-8"): zf.open(i).read() for i in zf.infolist()}
        except (zipfile.BadZipFile, NotImplementedError, ValueError, OSError, struct.error, EOFError):
            return  # Python refuses what we accept (a CRC, say): torch ignores CRCs, nothing is hidden
        assert ours == theirs
        _scan_bytes(data, ".pt")  # never raises anything but CorruptCheckpointError

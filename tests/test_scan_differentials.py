"""Files two readers see differently: the scan must read what torch reads, and refuse any ambiguity.

Each technique is rebuilt here from its idea (parser differentials known from picklescan, modelscan
and fickling): zips whose directory Python's ``zipfile`` and torch's reader locate differently,
pickles whose frames the C unpickler reads differently from ``pickletools``, the tar format torch
tries first, TorchScript archives. Where a test claims torch would run a file's code, a subprocess
shows it, with a payload that only creates a marker file in the test's directory.
"""

from __future__ import annotations

import io
import pickle
import struct
import subprocess
import sys
import tarfile
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch

import torchkeep as tk
from torchkeep.cli import app
from torchkeep.container import read_zip
from torchkeep.errors import CorruptCheckpointError, UnsafeCheckpointError
from torchkeep.scan import scan

# ------------------------------------------------------------------------------------------ building blocks


def _exec_pickle(marker: Path, proto: int = 2) -> bytes:
    """A pickle that creates ``marker`` when unpickled: builtins.exec(<code>)."""
    code = f"open({str(marker)!r}, 'w').close()".encode()
    return bytes([0x80, proto]) + b"cbuiltins\nexec\nX" + struct.pack("<I", len(code)) + code + b"\x85R."


BENIGN = b"\x80\x02}q\x00X\x01\x00\x00\x00aK\x01s."


def _local(name: bytes, data: bytes, *, flags: int = 0, method: int = 0) -> bytes:
    crc = zipfile.crc32(data)
    head = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, flags, method, 0, 0, crc, len(data), len(data), len(name), 0)
    return head + name + data


def _central(
    name: bytes, data: bytes, offset: int, *, flags: int = 0, method: int = 0, usize: int | None = None
) -> bytes:
    crc = zipfile.crc32(data)
    size = len(data) if usize is None else usize
    fields = (b"PK\x01\x02", 20, 20, flags, method, 0, 0, crc, len(data), size, len(name), 0, 0, 0, 0, 0, offset)
    return struct.pack("<4s6H3L5H2L", *fields) + name


def _eocd(count: int, cd_size: int, cd_ofs: int, comment: bytes = b"") -> bytes:
    return struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, cd_size, cd_ofs, len(comment)) + comment


def _zip(records: list[tuple[bytes, bytes]], **kw: int) -> bytes:
    """A plain stored zip of ``records`` built by hand (so each test can bend one field)."""
    body, central = b"", b""
    for name, data in records:
        central += _central(name, data, len(body), **kw)
        body += _local(name, data, **kw)
    return body + central + _eocd(len(records), len(central), len(body))


def _torch_runs(path: Path, marker: Path) -> bool:
    """Whether ``torch.load(path, weights_only=False)`` runs the file's code (in a subprocess)."""
    script = "import sys, torch\ntry:\n    torch.load(sys.argv[1], weights_only=False)\nexcept Exception:\n    pass\n"
    subprocess.run([sys.executable, "-c", script, str(path)], cwd=path.parent, timeout=120, check=False)
    ran = marker.exists()
    marker.unlink(missing_ok=True)
    return ran


def _refused_everywhere(path: Path, marker: Path, error: type[Exception] = CorruptCheckpointError) -> None:
    with pytest.raises((CorruptCheckpointError, UnsafeCheckpointError)):
        report = scan(path)
        assert not report.ok  # a report is fine as long as it is not clean
        raise UnsafeCheckpointError(path, "not clean")
    for trust in (False, True):
        with pytest.raises(error):
            tk.load(path, trust_pickle=trust)
    assert not marker.exists()


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "ran.txt"


# ------------------------------------------------------------------------------------------ zip differentials


def test_two_central_directories_of_equal_size(tmp_path: Path, marker: Path) -> None:
    evil = _exec_pickle(marker)
    benign = BENIGN + b"\x00" * (len(evil) - len(BENIGN))  # same length: both directories are the same size
    name, version = b"archive/data.pkl", b"archive/version"
    body = _local(name, evil)
    second = len(body)
    body += _local(name, benign)
    third = len(body)
    body += _local(version, b"3\n")
    torch_dir = _central(name, evil, 0) + _central(version, b"3\n", third)  # where the end record points
    # just before the end record: Python's zipfile, which shifts offsets by the gap it takes for prepended data
    shift = len(torch_dir)
    python_dir = _central(name, benign, second - shift) + _central(version, b"3\n", third - shift)
    assert len(torch_dir) == len(python_dir)
    data = body + torch_dir + python_dir + _eocd(2, len(torch_dir), len(body))
    path = tmp_path / "two-dirs.pt"
    path.write_bytes(data)
    with zipfile.ZipFile(path) as zf:  # the old check's reader sees the benign pickle
        assert zf.read("archive/data.pkl") == benign
    assert _torch_runs(path, marker)  # torch unpickles the other one
    with pytest.raises(CorruptCheckpointError, match="different directories"):
        read_zip(path)
    _refused_everywhere(path, marker)


def test_two_directories_cannot_make_torch_allocate_what_the_file_lacks(tmp_path: Path, marker: Path) -> None:
    # torch's directory declares a 2 GB DEFLATE record, Python's the stored one
    name = b"archive/data.pkl"
    body = _local(name, BENIGN)
    deflated = _central(name, BENIGN, 0, method=8, usize=2_000_000_000)
    stored = _central(name, BENIGN, 0)
    path = tmp_path / "bomb.pt"
    path.write_bytes(body + deflated + stored + _eocd(1, len(stored), len(body)))
    tracemalloc.start()
    try:
        _refused_everywhere(path, marker)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak


def test_entry_name_differing_only_in_case_is_read_by_torch_and_scanned(tmp_path: Path, marker: Path) -> None:
    real = tmp_path / "real.pt"
    torch.save({"w": torch.ones(2)}, real)
    path = tmp_path / "upper.pt"
    with zipfile.ZipFile(real) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            if info.filename.endswith("/data.pkl"):
                dst.writestr(info.filename[: -len("data.pkl")] + "DATA.PKL", _exec_pickle(marker))
            else:
                dst.writestr(info.filename, src.read(info))
    assert _torch_runs(path, marker)  # torch's reader looks names up ignoring ASCII case
    report = scan(path)
    assert "builtins.exec" in report.dangerous and any(p.endswith("DATA.PKL") for p in report.pickles)
    for trust in (False, True):
        with pytest.raises(UnsafeCheckpointError):
            tk.load(path, trust_pickle=trust)
    assert not marker.exists()


def test_names_equal_ignoring_case_are_refused(tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "case.pt"
    path.write_bytes(_zip([(b"archive/data.pkl", BENIGN), (b"archive/Data.pkl", _exec_pickle(marker))]))
    with pytest.raises(CorruptCheckpointError, match="ignoring case"):
        read_zip(path)
    _refused_everywhere(path, marker)


@pytest.mark.parametrize(
    "bend",
    ["local name", "local size", "local method", "local flags", "gap", "overlap", "trailing", "comment", "outside"],
)
def test_zip_ambiguities_are_refused(bend: str, tmp_path: Path, marker: Path) -> None:
    name, other = b"archive/data.pkl", b"archive/byteorder"
    records = [(name, BENIGN), (other, b"little")]
    data = _zip(records)
    first = _local(name, BENIGN)
    if bend == "local name":
        data = data.replace(b"PK\x03\x04" + first[4:30] + name, b"PK\x03\x04" + first[4:30] + b"archive/DATA.pkx", 1)
    elif bend == "local size":
        data = data[:18] + struct.pack("<2L", 1, 1) + data[26:]
    elif bend == "local method":
        data = data[:8] + struct.pack("<H", 8) + data[10:]
    elif bend == "local flags":
        data = data[:6] + struct.pack("<H", 0x800) + data[8:]
    elif bend == "gap":  # hidden bytes between two entries
        body = _local(name, BENIGN) + b"\x00" * 64
        central = _central(name, BENIGN, 0) + _central(other, b"little", len(body))
        body += _local(other, b"little")
        data = body + central + _eocd(2, len(central), len(body))
    elif bend == "overlap":
        body = _local(name, BENIGN)
        central = _central(name, BENIGN, 0) + _central(other, BENIGN, 0)
        data = body + central + _eocd(2, len(central), len(body))
    elif bend == "trailing":
        data += b"\x00" * 10
    elif bend == "comment":
        data = data[:-2] + struct.pack("<H", 5) + b"hello"
    elif bend == "outside":
        data = _zip([(name, BENIGN), (b"elsewhere/data.pkl", _exec_pickle(marker))])
    path = tmp_path / "bent.pt"
    path.write_bytes(data)
    with pytest.raises(CorruptCheckpointError):
        read_zip(path)
    _refused_everywhere(path, marker)


@pytest.mark.parametrize("flag", [0x0002, 0x0020, 0x0040, 0x2000, 0x0001])
def test_unusual_flag_bits_are_a_typed_refusal_and_the_cli_goes_on(
    flag: int, tmp_path: Path, marker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "flags.pt"
    path.write_bytes(_zip([(b"archive/data.pkl", BENIGN)], flags=flag))
    with pytest.raises(CorruptCheckpointError, match=r"flag bits|encrypted"):
        scan(path)
    _refused_everywhere(path, marker)
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(1)}, good)
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["scan", str(path), str(good)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "clean" in result.output


def test_zip64_locator_pointing_elsewhere_is_refused(tmp_path: Path, marker: Path) -> None:
    real = tmp_path / "real.pt"
    torch.save({"w": torch.ones(2)}, real)
    data = bytearray(real.read_bytes())
    loc = len(data) - 22 - 20
    assert data[loc : loc + 4] == b"PK\x06\x07"
    struct.pack_into("<Q", data, loc + 8, 0)  # the zip64 record "at offset 0"
    path = tmp_path / "loc.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="zip64"):
        read_zip(path)


@pytest.mark.parametrize("n", [1, 40, 400])
def test_real_torch_save_files_read_the_same_as_zipfile(n: int, tmp_path: Path) -> None:
    path = tmp_path / "many.pt"
    torch.save({f"t{i}": torch.arange(i + 1) for i in range(n)}, path)
    view = read_zip(path)
    data = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        assert {e.name: data[e.offset : e.offset + e.size] for e in view.entries} == {
            i.filename: zf.read(i) for i in zf.infolist()
        }
    assert view.find("DATA.PKL") is not None and scan(path).ok


# ------------------------------------------------------------------------------------------ pickle framing


def _straddling_frame(marker: Path) -> bytes:
    """genops: one BINBYTES holding the payload; the C unpickler on a file: an empty BINBYTES, then the payload.

    The frame ends two bytes into BINBYTES's 4-byte length. The C unpickler drops those two bytes
    and reads the length afresh after the frame (0); pickletools reads straight on (4 + len(payload)).
    """
    evil = _exec_pickle(marker)[2:-1] + b"0"  # GLOBAL, argument, TUPLE1, REDUCE, POP: no STOP, no PROTO
    frame = b"B" + struct.pack("<H", 4 + len(evil))
    return b"\x80\x04\x95" + struct.pack("<Q", len(frame)) + frame + b"\x00\x00" + b"\x00\x00" + evil + b"0N."


def test_frame_straddle_hides_a_call_from_pickletools_not_from_the_c_unpickler(tmp_path: Path, marker: Path) -> None:
    import pickletools

    data = _straddling_frame(marker)
    names = [op.name for op, _, _ in pickletools.genops(data)]
    assert "GLOBAL" not in names and "REDUCE" not in names  # what a genops-only scan sees
    pickle.load(io.BytesIO(data))  # deliberately, on our own harmless payload, as torch reads data.pkl
    assert marker.exists()
    marker.unlink()
    path = tmp_path / "frame.pt"
    path.write_bytes(_zip([(b"archive/data.pkl", data), (b"archive/version", b"3\n")]))
    assert _torch_runs(path, marker)
    report = scan(path)
    assert not report.ok and any("frame" in i for i in report.issues), report.issues
    _refused_everywhere(path, marker)


@pytest.mark.parametrize(
    "data, needle",
    [
        (
            b"\x80\x04\x95" + struct.pack("<Q", 13) + b"N0" + b"\x95" + struct.pack("<Q", 2) + b"N.",
            "before the previous",
        ),
        (b"\x80\x04\x95" + struct.pack("<Q", 1) + b"\x95" + struct.pack("<Q", 2) + b"N.", "runs past the end"),
        (b"\x80\x04\x95" + struct.pack("<Q", 1 << 40) + b"N.", "past the end"),
        (b"\x80\x04\x95" + struct.pack("<Q", 4) + b"N." + b"N.", "past the STOP"),
        (b"\x80\x02cbuil\\x74ins\nexec\n)R.", "escapes"),
        (b"\x80\x02(cbuiltins\nstr\nI1\nI2\n.", "MARK"),
    ],
    ids=["frame in frame", "opcode across frame end", "frame past end", "frame past STOP", "escaped GLOBAL", "junk"],
)
def test_pickle_inconsistencies_are_issues(data: bytes, needle: str, tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "odd.pkl"
    path.write_bytes(data)
    report = scan(path)
    assert not report.ok
    if needle != "MARK":
        assert any(needle in i for i in report.issues), report.issues


def test_non_ascii_binstring_cannot_name_a_stack_global(tmp_path: Path) -> None:
    # genops decodes BINSTRING as latin-1, torch's unpickler as UTF-8: the scan must not trust either
    data = b"\x80\x02U\x02\xc3\xa9U\x06systemq\x00\x93."
    path = tmp_path / "latin.pkl"
    path.write_bytes(data)
    assert "<unresolvable STACK_GLOBAL>" in scan(path).dangerous


def test_second_pickle_after_stop_in_data_pkl(tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "two.pt"
    path.write_bytes(_zip([(b"archive/data.pkl", BENIGN + _exec_pickle(marker))]))
    assert any("after the STOP" in i for i in scan(path).issues)
    _refused_everywhere(path, marker)


# ------------------------------------------------------------------------------------------ other containers


def test_legacy_tar_format_is_what_torch_reads_first(tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "old.tar.pt"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, payload in (("storages", _exec_pickle(marker)), ("tensors", BENIGN), ("pickle", BENIGN)):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    assert _torch_runs(path, marker)
    report = scan(path)
    assert report.format == "torch-tar" and "<legacy tar archive>" in report.dangerous and not report.ok
    for trust in (False, True):
        with pytest.raises(tk.errors.UnsupportedSourceError, match="tar archive"):
            tk.load(path, trust_pickle=trust)
    with pytest.raises(tk.errors.UnsupportedSourceError, match="torchkeep scan FILE"):
        tk.inspect(path)
    assert not marker.exists()


def test_torchscript_archive_by_constants_pkl(tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "ts.pt"
    path.write_bytes(_zip([(b"archive/data.pkl", BENIGN), (b"archive/constants.pkl", b"\x80\x02).")]))
    assert "<TorchScript archive>" in scan(path).dangerous
    for trust in (False, True):
        with pytest.raises(UnsafeCheckpointError):
            tk.load(path, trust_pickle=trust)


# ------------------------------------------------------------------------------------------ the denylist is not a promise

#: Globals outside the original dangerous modules that run commands, exec code or write files.
OUTSIDE_THE_OLD_LIST = [
    ("torch.utils.collect_env", "run"),
    ("torch.fx.graph_module", "reduce_graph_module"),
    ("logging.config", "dictConfig"),
    ("uuid", "_get_command_stdout"),
    ("numpy.lib.format", "read_array"),
    ("torch", "save"),
    ("pathlib", "Path.write_text"),
    ("pathlib", "PosixPath.write_bytes"),
    ("numpy", "save"),
    ("antigravity", "geohash"),
]


@pytest.mark.parametrize("module, name", OUTSIDE_THE_OLD_LIST, ids=[f"{m}.{n}" for m, n in OUTSIDE_THE_OLD_LIST])
def test_more_code_running_globals_are_refused_under_trust_pickle(
    module: str, name: str, tmp_path: Path, marker: Path
) -> None:
    path = tmp_path / "g.pkl"
    path.write_bytes(
        b"\x80\x04\x8c"
        + bytes([len(module)])
        + module.encode()
        + b"\x8c"
        + bytes([len(name)])
        + name.encode()
        + b"\x93)R."
    )
    report = scan(path)
    assert f"{module}.{name}" in report.dangerous
    with pytest.raises(UnsafeCheckpointError, match="trust_pickle=True does not unlock"):
        tk.load(path, trust_pickle=True)

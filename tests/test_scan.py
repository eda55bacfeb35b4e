"""The static pickle scan: a generated malicious corpus (each refused by load without running) and benign files."""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import torchkeep as tk
from torchkeep.cli import app
from torchkeep.errors import CorruptCheckpointError, UnsafeCheckpointError
from torchkeep.scan import scan

FIXTURES = Path(__file__).parent / "fixtures" / "legacy"
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")

# ------------------------------------------------------------------------------------------ pickle building blocks

P2, P4 = b"\x80\x02", b"\x80\x04"
MARK, TUPLE1, TUPLE2, REDUCE, STOP, LIST, OBJ = b"(", b"\x85", b"\x86", b"R", b".", b"l", b"o"
MEMOIZE, STACK_GLOBAL, BUILD = b"\x94", b"\x93", b"b"


def g(module: str, name: str) -> bytes:
    """GLOBAL module name."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def s(text: str) -> bytes:
    """BINUNICODE text."""
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def su(text: str) -> bytes:
    """SHORT_BINUNICODE text."""
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def binget(i: int) -> bytes:
    return b"h" + bytes([i])


def call1(func: bytes, arg: bytes) -> bytes:
    return func + arg + TUPLE1 + REDUCE


def techniques(marker: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (pickle bytes that would create ``marker`` if unpickled, the global scan must name)."""
    cmd = f"touch {marker}"
    py = f"open({str(marker)!r}, 'w').close()"
    import_os = call1(g("builtins", "__import__"), s("os"))
    getattr_system = g("builtins", "getattr") + import_os + s("system") + TUPLE2 + REDUCE
    return {
        "os.system via REDUCE": (P2 + call1(g("os", "system"), s(cmd)) + STOP, "os.system"),
        "posix.system": (P2 + call1(g("posix", "system"), s(cmd)) + STOP, "posix.system"),
        "subprocess.Popen": (
            P2 + g("subprocess", "Popen") + MARK + s("touch") + s(str(marker)) + LIST + TUPLE1 + REDUCE + STOP,
            "subprocess.Popen",
        ),
        "builtins.eval": (P2 + call1(g("builtins", "eval"), s(py)) + STOP, "builtins.eval"),
        "builtins.exec": (P2 + call1(g("builtins", "exec"), s(py)) + STOP, "builtins.exec"),
        "getattr chain to os": (P2 + call1(getattr_system, s(cmd)) + STOP, "builtins.getattr"),
        "__builtin__.__import__ (py2 name)": (
            P2
            + call1(
                g("builtins", "getattr")
                + call1(g("__builtin__", "__import__"), s("os"))
                + s("system")
                + TUPLE2
                + REDUCE,
                s(cmd),
            )
            + STOP,
            "builtins.__import__",
        ),
        "importlib.import_module": (
            P2
            + call1(
                g("builtins", "getattr")
                + call1(g("importlib", "import_module"), s("os"))
                + s("system")
                + TUPLE2
                + REDUCE,
                s(cmd),
            )
            + STOP,
            "importlib.import_module",
        ),
        "STACK_GLOBAL through the memo": (
            P4
            + su("os")
            + MEMOIZE
            + su("system")
            + MEMOIZE
            + su("x")
            + b"0"
            + binget(0)
            + binget(1)
            + STACK_GLOBAL
            + su(cmd)
            + TUPLE1
            + REDUCE
            + STOP,
            "os.system",
        ),
        "STACK_GLOBAL with computed operands": (
            P4 + call1(g("builtins", "str"), su("os")) + su("system") + STACK_GLOBAL + su(cmd) + TUPLE1 + REDUCE + STOP,
            "<unresolvable STACK_GLOBAL>",
        ),
        "dotted name through a harmless module": (
            P4 + su("pathlib") + su("os.system") + STACK_GLOBAL + su(cmd) + TUPLE1 + REDUCE + STOP,
            "pathlib.os.system",
        ),
        "operator.attrgetter": (
            P2 + call1(call1(g("operator", "attrgetter"), s("system")) + import_os + TUPLE1 + REDUCE, s(cmd)) + STOP,
            "operator.attrgetter",
        ),
        "functools.partial": (
            P2 + g("functools", "partial") + g("os", "system") + s(cmd) + TUPLE2 + REDUCE + b")" + REDUCE + STOP,
            "functools.partial",
        ),
        "nested pickle.loads": (
            P2 + g("pickle", "loads") + b"C" + bytes([0]) + TUPLE1 + REDUCE + STOP,
            "pickle.loads",
        ),
        "nested torch.storage._load_from_bytes": (
            P2 + g("torch.storage", "_load_from_bytes") + b"C" + bytes([0]) + TUPLE1 + REDUCE + STOP,
            "torch.storage._load_from_bytes",
        ),
        "runpy": (P2 + call1(g("runpy", "_run_code"), s(py)) + STOP, "runpy._run_code"),
        "ctypes": (P2 + call1(g("ctypes", "CDLL"), s("libc.so.6")) + STOP, "ctypes.CDLL"),
        "INST opcode": (P2 + MARK + s(cmd) + b"ios\nsystem\n" + STOP, "os.system"),
        "OBJ opcode": (P2 + MARK + g("os", "system") + s(cmd) + OBJ + STOP, "os.system"),
        "torch.load nested": (P2 + call1(g("torch", "load"), s("other.pt")) + STOP, "torch.load"),
        "torch.hub": (P2 + call1(g("torch.hub", "load"), s("evil/repo")) + STOP, "torch.hub.load"),
    }


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "pwned"


def _technique_ids() -> list[str]:
    return list(techniques(Path("/x")))


def test_the_corpus_is_live(marker: Path) -> None:
    """Control: the payloads really run under pickle.loads, so 'no marker' in the tests below means something."""
    for name in ("os.system via REDUCE", "STACK_GLOBAL through the memo", "builtins.exec", "INST opcode"):
        data, _ = techniques(marker)[name]
        pickle.loads(data)  # deliberately, on our own harmless payload
        assert marker.exists(), name
        marker.unlink()


@pytest.mark.parametrize("name", _technique_ids())
def test_scan_flags_and_load_refuses_without_running(
    name: str, tmp_path: Path, marker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, expected = techniques(marker)[name]
    path = tmp_path / "evil.pt"
    path.write_bytes(data)
    report = scan(path)
    assert not report.ok and report.verdict == "UNSAFE"
    assert expected in report.dangerous, (expected, report.dangerous)
    assert expected in report.unsafe
    assert pickle.loads is not None  # scanning imported nothing from the payload
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises((UnsafeCheckpointError, CorruptCheckpointError)):
        tk.load(path)
    with pytest.raises(UnsafeCheckpointError) as info:
        tk.load(path, trust_pickle=True)  # dangerous globals are refused even when trusted
    assert "trust_pickle=True does not unlock" in str(info.value)
    with pytest.raises((UnsafeCheckpointError, CorruptCheckpointError)):
        tk.load_into(torch.nn.Linear(2, 2), path)  # the weights-loading path is just as closed
    assert not marker.exists()


def _torch_zip_with_pkl(tmp_path: Path, payload: bytes, *, entry: str | None = None) -> Path:
    """A real torch.save zip (entries stay stored) whose data.pkl is replaced by ``payload``, or,
    with ``entry``, that carries ``payload`` as an extra entry of that name."""
    real = tmp_path / "real.pt"
    torch.save({"w": torch.ones(3)}, real)
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(real) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            replace = entry is None and info.filename.endswith("/data.pkl")
            dst.writestr(info.filename, payload if replace else src.read(info))
        if entry is not None:
            dst.writestr(entry, payload)
    return path


def test_malicious_data_pkl_inside_a_torch_zip(tmp_path: Path, marker: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, _ = techniques(marker)["os.system via REDUCE"]
    path = _torch_zip_with_pkl(tmp_path, data)
    report = scan(path)
    assert report.format == "torch-zip" and "os.system" in report.dangerous
    assert any(p.endswith("data.pkl") for p in report.pickles)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    for trust in (False, True):
        with pytest.raises(UnsafeCheckpointError):
            tk.load(path, trust_pickle=trust)
    assert not marker.exists()


def test_extra_pkl_entry_in_a_zip_is_scanned(tmp_path: Path, marker: Path) -> None:
    path = _torch_zip_with_pkl(tmp_path, techniques(marker)["builtins.eval"][0], entry="real/constants.pkl")
    assert {"builtins.eval", "<TorchScript archive>"} <= set(scan(path).dangerous)


@pytest.mark.parametrize(
    "data, issue",
    [
        (P2 + P2 + b"}" + STOP, "PROTO"),
        (pickle.dumps({"a": 1}, protocol=2) + b"trailing junk", "after the STOP"),
        (pickle.dumps({"a": 1}, protocol=2) + pickle.dumps([1], protocol=2), "after the STOP"),
        (pickle.dumps({"a": 1}, protocol=2)[:-3], "truncated"),
    ],
    ids=["two PROTO", "trailing bytes", "two pickles", "truncated"],
)
def test_structural_tricks_are_issues_and_refused(
    data: bytes, issue: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "odd.pt"
    path.write_bytes(data)
    report = scan(path)
    assert not report.ok and any(issue in i for i in report.issues), report.issues
    spy_calls: list[Any] = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: spy_calls.append(k))
    for trust in (False, True):
        with pytest.raises(CorruptCheckpointError):
            tk.load(path, trust_pickle=trust)
    assert spy_calls == []  # refused before torch.load
    if issue == "truncated":
        assert report.verdict == "unreadable" and not report.complete


def test_structural_trick_inside_a_zip(tmp_path: Path) -> None:
    payload = pickle.dumps({"a": 1}, protocol=2) + b"junk"
    path = _torch_zip_with_pkl(tmp_path, payload)
    assert any("after the STOP" in i for i in scan(path).issues)
    with pytest.raises(CorruptCheckpointError):
        tk.load(path)


def test_huge_length_claims_do_not_allocate(tmp_path: Path) -> None:
    path = tmp_path / "claim.pt"
    path.write_bytes(P4 + b"\x8e" + struct.pack("<Q", 1 << 60) + b"x" * 100)  # BINBYTES8 of 2**60 bytes
    report = scan(path)
    assert not report.complete and report.verdict == "unreadable"


# ------------------------------------------------------------------------------------------ full pickled models


class Whole(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)


def test_full_model_refusal_names_the_classes(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    torch.save(model, path)
    report = scan(path)
    assert "torch.nn.modules.container.Sequential" in report.unsafe and not report.dangerous
    with pytest.raises(UnsafeCheckpointError) as info:
        tk.load(path)
    text = str(info.value)
    for name in ("torch.nn.modules.container.Sequential", "torch.nn.modules.linear.Linear", "ReLU"):
        assert name in text
    assert "tk.convert" in text and "trust_pickle=True" in text
    assert info.value.unsafe_globals == report.unsafe  # type: ignore[attr-defined]
    loaded = tk.load(path, trust_pickle=True)
    assert torch.equal(loaded[0].weight, model[0].weight)


def test_trusted_unsafe_but_not_dangerous_loads(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(Whole(), path)
    assert f"{__name__}.Whole" in scan(path).unsafe
    assert isinstance(tk.load(path, trust_pickle=True), Whole)


# ------------------------------------------------------------------------------------------ benign corpus


def _benign() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3)
    sd = model.state_dict()
    return {
        "state_dict": sd,
        "adam": opt.state_dict(),
        "lightning": {
            "epoch": 3,
            "global_step": 120,
            "pytorch-lightning_version": "2.2.0",
            "state_dict": OrderedDict((f"model.{k}", v) for k, v in sd.items()),
            "optimizer_states": [opt.state_dict()],
            "lr_schedulers": [sched.state_dict()],
            "hyper_parameters": {"lr": 1e-3, "layers": [4, 4], "name": "net", "dropout": None},
        },
        "guide": {"epoch": 5, "model_state_dict": sd, "optimizer_state_dict": opt.state_dict(), "loss": 0.25},
        "dtypes": {
            str(dt): torch.ones(3, dtype=dt)
            for dt in (torch.float16, torch.bfloat16, torch.int8, torch.bool, torch.complex64, torch.float64)
        },
        "ordered": OrderedDict(
            a=torch.arange(3), b=(1, 2.5, "x"), c={1, 2}, d=torch.Size([2, 3]), e=torch.device("cpu")
        ),
        "tensor": torch.randn(2, 3),
        "param": torch.nn.Parameter(torch.ones(2)),
    }


@pytest.mark.parametrize("name", list(_benign()))
def test_benign_files_have_no_false_alarms(name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.pt"
    torch.save(_benign()[name], path)
    report = scan(path)
    assert report.ok, str(report)
    assert report.verdict == "clean" and report.globals
    tk.load(path)


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.glob("*.pt")))
def test_committed_fixtures_are_clean(fixture: str) -> None:
    report = scan(FIXTURES / fixture)
    assert report.ok, str(report)
    assert report.format == ("torch-legacy" if fixture == "nonzip.pt" else "torch-zip")


def test_safetensors_file_is_clean_without_pickle(tmp_path: Path) -> None:
    path = tk.save({"w": torch.ones(2)}, tmp_path / "c.safetensors")
    report = scan(path)
    assert report.ok and report.format == "safetensors" and report.globals == []


def test_report_dict_and_str(tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "evil.pkl"
    path.write_bytes(techniques(marker)["os.system via REDUCE"][0])
    report = scan(path)
    d = report.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["verdict"] == "UNSAFE" and d["calls"] == {"REDUCE": 1} and d["called"] == ["os.system"]
    assert "DANGEROUS os.system" in str(report)


# ------------------------------------------------------------------------------------------ CLI


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(app, ["scan", *args])


def test_cli_exit_codes_and_table(tmp_path: Path, marker: Path) -> None:
    clean = tmp_path / "clean.pt"
    torch.save({"w": torch.ones(2)}, clean)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(techniques(marker)["os.system via REDUCE"][0])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"PK\x03\x04" + b"\x00" * 64)

    result = _invoke(str(clean))
    assert result.exit_code == 0 and "clean" in result.output
    result = _invoke(str(clean), str(evil))
    assert result.exit_code == 1 and "UNSAFE" in result.output and "os.system" in result.output
    assert "DANGEROUS" in result.output
    result = _invoke(str(clean), str(evil), str(garbage))
    assert result.exit_code == 2
    assert _invoke(str(tmp_path / "missing.pt")).exit_code == 2
    assert not marker.exists()


def test_cli_json(tmp_path: Path, marker: Path) -> None:
    evil = tmp_path / "evil.pt"
    evil.write_bytes(techniques(marker)["STACK_GLOBAL through the memo"][0])
    result = _invoke("--json", str(evil), str(tmp_path / "missing.pt"))
    assert result.exit_code == 2
    out = json.loads(result.stdout)
    assert out[0]["verdict"] == "UNSAFE" and "os.system" in out[0]["dangerous"]
    assert out[1]["verdict"] == "unreadable" and "missing.pt" in out[1]["error"]


def test_cli_help_has_an_example() -> None:
    result = CliRunner().invoke(app, ["scan", "--help"])
    assert result.exit_code == 0 and "Example" in result.output

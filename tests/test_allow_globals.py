"""allow_globals: legacy pickles that need only the classes a user names load through the weights-only unpickler."""

from __future__ import annotations

import argparse
import datetime
import threading
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import torchkeep as tk
from torchkeep.cli import app
from torchkeep.errors import InvalidArgumentError, UnsafeCheckpointError
from torchkeep.scan import scan


@pytest.fixture
def with_namespace(tmp_path: Path) -> Path:
    path = tmp_path / "args.pt"
    torch.save({"w": torch.ones(3), "args": argparse.Namespace(lr=0.1, name="run")}, path)
    return path


def test_default_load_refuses_and_names_the_global_and_the_option(with_namespace: Path) -> None:
    with pytest.raises(UnsafeCheckpointError) as info:
        tk.load(with_namespace)
    assert "argparse.Namespace" in str(info.value) and "allow_globals=" in str(info.value)


def test_named_global_loads_through_the_weights_only_unpickler(with_namespace: Path) -> None:
    before = list(torch.serialization.get_safe_globals())
    tree = tk.load(with_namespace, allow_globals=["argparse.Namespace"])
    assert tree["args"] == argparse.Namespace(lr=0.1, name="run") and torch.equal(tree["w"], torch.ones(3))
    # for that one load only: nothing registered process-wide, a plain safe torch.load still refuses it
    assert list(torch.serialization.get_safe_globals()) == before
    with pytest.raises(Exception, match="Namespace"):
        torch.load(with_namespace, weights_only=True)


def test_other_threads_never_see_the_allowed_globals(with_namespace: Path) -> None:
    from torch import _weights_only_unpickler as wou

    from torchkeep import legacy

    seen: dict[str, bool] = {}
    real = legacy._numpy_arrays

    def spy(extra=None):  # look from another thread while the load's context is entered
        ctx = real(extra)

        class Wrap:
            def __enter__(self):
                value = ctx.__enter__()
                t = threading.Thread(
                    target=lambda: seen.update(other="argparse.Namespace" in wou._get_user_allowed_globals())
                )
                t.start()
                t.join()
                seen["self"] = "argparse.Namespace" in wou._get_user_allowed_globals()
                return value

            def __exit__(self, *exc):
                return ctx.__exit__(*exc)

        return Wrap()

    legacy._numpy_arrays = spy
    try:
        tk.load(with_namespace, allow_globals=["argparse.Namespace"])
    finally:
        legacy._numpy_arrays = real
    assert seen == {"self": True, "other": False}


def test_a_global_outside_the_patterns_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "two.pt"
    torch.save({"args": argparse.Namespace(a=1), "d": datetime.date(2024, 1, 2)}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        tk.load(path, allow_globals=["argparse.Namespace"])
    assert "datetime.date" in str(info.value) and "argparse.Namespace" not in info.value.unsafe_globals
    tree = tk.load(path, allow_globals=["argparse.Namespace", "datetime.date"])
    assert tree["d"] == datetime.date(2024, 1, 2)


@pytest.mark.parametrize(
    "pattern",
    [
        "*",
        "os.*",
        "argparse.*",
        "builtins.*",
        "torch.*",
        "posix.system",
        "builtins.eval",
        "subprocess.Popen",
        "os",
        "a b",
    ],
)
def test_patterns_that_would_allow_code_are_refused(pattern: str, with_namespace: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="allow_globals"):
        tk.load(with_namespace, allow_globals=[pattern])


def test_a_single_string_is_refused(with_namespace: Path) -> None:
    with pytest.raises(TypeError):
        tk.load(with_namespace, allow_globals="argparse.Namespace")


def test_dangerous_globals_stay_refused_whatever_is_allowed(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    code = f"open({str(marker)!r}, 'w').close()".encode()
    path.write_bytes(b"\x80\x02cbuiltins\nexec\nX" + len(code).to_bytes(4, "little") + code + b"\x85R.")
    with pytest.raises(UnsafeCheckpointError):
        tk.load(path, allow_globals=["argparse.Namespace"])
    assert not marker.exists()


def test_scan_load_into_restore_and_convert_take_it(with_namespace: Path, tmp_path: Path) -> None:
    report = scan(with_namespace, allow_globals=["argparse.Namespace"])
    assert report.ok and report.allowed == ["argparse.Namespace"]
    assert not scan(with_namespace).ok
    model = torch.nn.Linear(3, 1, bias=False)
    sd_path = tmp_path / "sd.pt"
    torch.save({"model": {"weight": torch.ones(1, 3)}, "args": argparse.Namespace(x=1)}, sd_path)
    with pytest.raises(UnsafeCheckpointError):
        tk.load_into(model, sd_path)
    tk.load_into(model, sd_path, allow_globals=["argparse.Namespace"])
    assert torch.equal(model.weight, torch.ones(1, 3))
    tree = tk.restore(sd_path, {"model": model}, allow_globals=["argparse.Namespace"])
    assert tree["args"].x == 1
    out = tk.convert(
        sd_path, tmp_path / "out.safetensors", to="safetensors", key="model", allow_globals=["argparse.Namespace"]
    )
    assert torch.equal(tk.load(out)["weight"], torch.ones(1, 3))


def test_cli_allow_global(with_namespace: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["scan", str(with_namespace)]).exit_code == 1
    ok = runner.invoke(app, ["scan", "--allow-global", "argparse.Namespace", str(with_namespace)])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(app, ["scan", "--allow-global", "os.*", str(with_namespace)])
    assert bad.exit_code == 2 and "--allow-global" in bad.output

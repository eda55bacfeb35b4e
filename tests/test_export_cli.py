"""``torchkeep export`` and ``torchkeep quantize`` from a registered-model file, in-process."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from export_models import MLP, SmallCNN, TinyLM, seeded
from typer.testing import CliRunner

import torchkeep as tk
from torchkeep.cli import app

runner = CliRunner()
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def cnn_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return tk.save_model(seeded(SmallCNN()), tmp_path_factory.mktemp("cli") / "cnn.safetensors")


@pytest.mark.slow
def test_export_onnx_from_a_model_file(cnn_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    result = runner.invoke(
        app, ["export", str(cnn_file), "--format", "onnx", "--input-shape", "1x3x32x32", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "verified" in text and "batch 1" in text and "batch 3" in text and "torch.onnx.export(dynamo=True)" in text
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 3, 32, 32)
    model = tk.load_model(cnn_file).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            torch.from_numpy(session.run(None, {"x": x.numpy()})[0]), model(x), rtol=1e-4, atol=1e-5
        )


def test_export_json_report(cnn_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.pt2"
    result = runner.invoke(app, ["export", str(cnn_file), "-s", "2x3x16x16", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["verified"] is True and report["format"] == "torch.export" and report["dynamic_batch"] is True
    assert report["bytes"] == out.stat().st_size and report["max_abs_error"] < 1e-4
    assert [c["name"] for c in report["checks"]] == ["example inputs (batch 2)", "batch 4"]


def test_export_verification_failure_exits_1_and_keeps_the_file(
    cnn_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = importlib.import_module("torchkeep.export.api")
    real = api._runner

    def off_by_a_bit(fmt: str, path: Path, names: list[str]):  # an artifact whose outputs are shifted
        run = real(fmt, path, names)
        return lambda call: [t + 1e-3 for t in run(call)]

    monkeypatch.setattr(api, "_runner", off_by_a_bit)
    out = tmp_path / "model.pt2"
    result = runner.invoke(app, ["export", str(cnn_file), "-s", "2x3x8x8", "-o", str(out)])
    assert result.exit_code == 1 and out.is_file()
    assert "NOT verified" in result.stdout and "FAIL" in result.stdout
    assert "kept there for inspection" in " ".join(result.stderr.split())
    assert "1.00e-03" in result.stdout


def test_export_errors_are_one_red_line(cnn_file: Path, tmp_path: Path) -> None:
    trt = runner.invoke(app, ["export", str(cnn_file), "-s", "1x3x8x8", "-o", str(tmp_path / "m.ep"), "-f", "tensorrt"])
    assert trt.exit_code == 2 and "NVIDIA GPU" in trt.stderr and "Traceback" not in trt.output
    bad = runner.invoke(app, ["export", str(cnn_file), "-s", "1xAx8", "-o", str(tmp_path / "m.pt2")])
    assert bad.exit_code == 2 and "1x3x32x32" in bad.output
    missing = runner.invoke(
        app, ["export", str(tmp_path / "nope.safetensors"), "-s", "1x3", "-o", str(tmp_path / "m.pt2")]
    )
    assert missing.exit_code == 2 and "no such checkpoint" in missing.stderr
    assert not (tmp_path / "m.pt2").exists() and not (tmp_path / "m.ep").exists()


def test_help_teaches() -> None:
    text = " ".join(runner.invoke(app, ["export", "--help"]).stdout.split())
    assert "torchkeep export model.safetensors -s 1x3x32x32 -o model.onnx" in text and "--input-shape" in text
    text = " ".join(runner.invoke(app, ["quantize", "--help"]).stdout.split())
    assert "tk.quantize(tk.load_model(path))" in text and "torchkeep quantize model.safetensors -s 1x128" in text


def test_quantize_command_reports_and_writes_torchscript(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tk.save_model(MLP(sizes=(64, 128, 10)), tmp_path / "mlp.safetensors")
    out = tmp_path / "mlp-int8.pt"
    result = runner.invoke(app, ["quantize", str(path), "-s", "4x64", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["quantized_modules"] == ["net.0", "net.2"] and report["ratio"] > 2.5
    assert 0 < report["max_abs_error"] < 0.1
    assert report["export"]["verified"] is True and report["export"]["format"] == "torchscript"
    x = torch.randn(3, 64)
    qmodel, _ = tk.quantize(tk.load_model(path))
    assert torch.equal(torch.jit.load(str(out))(x), qmodel(x))
    human = runner.invoke(app, ["quantize", str(path)])
    assert human.exit_code == 0 and "smaller" in human.stdout and "quantize at load" in " ".join(human.stdout.split())
    wrong = runner.invoke(app, ["quantize", str(path), "-s", "1x64", "-o", str(tmp_path / "q.onnx")])
    assert wrong.exit_code == 2 and "TorchScriptonly" in "".join(wrong.output.split()).replace("│", "")


# -- errors of the user's making: one red line, exit 2; a failed verification: strict JSON, exit 1 --


@tk.register_model("test-export-cli-rowindex")
class RowIndex(torch.nn.Module):
    """Multiplies row i by i: a trace bakes in the batch size, so another batch size fails to run."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * torch.arange(len(x)).unsqueeze(1)


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return tk.save_model(MLP(), tmp_path_factory.mktemp("cli-mlp") / "mlp.safetensors")


def _strict_json(text: str) -> dict:
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_export_json_of_a_failed_verification_is_strict_json(tmp_path: Path) -> None:
    path = tk.save_model(RowIndex(), tmp_path / "rows.safetensors")
    out = tmp_path / "rows.pt"
    result = runner.invoke(app, ["export", str(path), "-s", "2x4", "-o", str(out), "--json"])
    assert result.exit_code == 1 and out.is_file(), result.output
    report = _strict_json(result.stdout)
    assert report["verified"] is False and report["max_abs_error"] is None
    failed = report["checks"][1]["outputs"][0]
    assert failed["ok"] is False and failed["max_abs"] is None and "failed to run" in failed["reason"]


def _one_red_line(result: object) -> str:
    text = " ".join(result.stderr.split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and text.startswith("error:")
    return text


def test_export_user_errors_exit_2_with_one_line(mlp_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.pt2"
    shape = runner.invoke(app, ["export", str(mlp_file), "-s", "2x5", "-o", str(out)])
    text = _one_red_line(shape)
    assert "shape 2x5" in text and "float32" in text and "--input-shape" in text
    dtype = runner.invoke(app, ["export", str(mlp_file), "-s", "2x8", "--dtype", "int64", "-o", str(out)])
    assert "dtype int64" in _one_red_line(dtype)
    method = runner.invoke(app, ["export", str(mlp_file), "-s", "2x8", "--method", "foo", "-o", str(tmp_path / "m.pt")])
    assert method.exit_code == 2 and "--method" in method.output and "Traceback" not in method.output
    names = runner.invoke(app, ["export", str(mlp_file), "-s", "2x8", "-s", "2x8", "-o", str(out)])
    assert names.exit_code == 2 and "Traceback" not in names.output
    assert not out.exists() and not (tmp_path / "m.pt").exists()


def test_export_float16_casts_the_model_too(mlp_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "half.pt2"
    result = runner.invoke(app, ["export", str(mlp_file), "-s", "2x8", "--dtype", "float16", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = _strict_json(result.stdout)
    assert report["verified"] is True
    assert report["checks"][0]["outputs"][0]["rtol"] == 1e-2, "compared with the float16 tolerances"
    program = torch.export.load(str(out)).module()
    assert program(torch.randn(3, 8, dtype=torch.float16)).dtype == torch.float16


def test_quantize_user_errors_exit_2_and_float16_says_larger(mlp_file: Path) -> None:
    gru = runner.invoke(app, ["quantize", str(mlp_file), "--modules", "gru"])
    assert "no submodule of type GRU" in _one_red_line(gru)
    shape = runner.invoke(app, ["quantize", str(mlp_file), "-s", "2x3"])
    assert "shape 2x3" in _one_red_line(shape)
    half = runner.invoke(app, ["quantize", str(mlp_file), "--dtype", "float16"])
    assert half.exit_code == 0 and "x larger" in half.stdout and "smaller" not in half.stdout
    as_json = runner.invoke(app, ["quantize", str(mlp_file), "--dtype", "float16", "--json"])
    assert as_json.exit_code == 0 and _strict_json(as_json.stdout)["ratio"] < 1


def test_allow_import_finds_a_class_in_the_current_directory(tmp_path: Path) -> None:
    """As with ``python -m``: ``--allow-import`` imports ``model.Net`` from ./model.py; without the
    file, the error names the import that failed."""
    import os
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "torchkeep"
    if not exe.exists():
        pytest.skip("needs the torchkeep console script")
    (tmp_path / "model.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self, width=4):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(width, 2)\n"
        "    def forward(self, x):\n"
        "        return self.fc(x)\n"
    )
    save = "import torchkeep as tk, model\ntk.register_model('cwd-net')(model.Net)\ntk.save_model(model.Net(4), 'net.safetensors')\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", save], cwd=tmp_path, check=True, env=env, timeout=120)
    args = [str(exe), "export", "net.safetensors", "-s", "1x4", "-o", "net.pt", "--allow-import"]
    ok = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    args[2] = str(tmp_path / "net.safetensors")
    bad = subprocess.run(args, cwd=elsewhere, capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "importing model failed (ModuleNotFoundError" in " ".join(bad.stderr.split())


# -- dynamic axes, and errors as every verb reports them ------------------------------------------------------


@pytest.fixture(scope="module")
def lm_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return tk.save_model(TinyLM(), tmp_path_factory.mktemp("cli-lm") / "lm.safetensors")


def test_export_dynamic_makes_the_sequence_dynamic(lm_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "lm.pt2"
    args = ["export", str(lm_file), "-s", "2x12", "--dtype", "int64", "--dynamic", "input_ids:0=batch,1=seq"]
    result = runner.invoke(app, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "dynamic axes input_ids 0=batch,1=seq" in text and "at input shapes 2x12; 4x7" in text
    program = torch.export.load(str(out)).module()
    x = torch.randint(0, 50, (3, 19))
    model = tk.load_model(lm_file).eval()
    with torch.no_grad():
        torch.testing.assert_close(program(x), model(x))
    # without INPUT: every input (here input_ids and attention_mask), in the JSON report
    two = ["-s", "2x12", "-s", "2x12", "--dtype", "int64", "--dynamic", "0=batch,1=seq"]
    both = runner.invoke(app, ["export", str(lm_file), *two, "-o", str(tmp_path / "both.pt2"), "--json"])
    assert both.exit_code == 0, both.output
    report = _strict_json(both.stdout)
    assert report["dynamic_axes"] == {n: {"0": "batch", "1": "seq"} for n in ("input_ids", "attention_mask")}
    assert report["checks"][1]["name"] == "batch 4, seq 7"
    assert report["checks"][1]["shapes"] == {"input_ids": [4, 7], "attention_mask": [4, 7]}


def test_export_help_shows_dynamic_with_an_example() -> None:
    text = " ".join(runner.invoke(app, ["export", "--help"]).stdout.split())
    assert "--dynamic" in text and "--dynamic input_ids:0=batch,1=seq" in text


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--dynamic", "ids:0=batch"], "--dynamic ids: the model has no input named 'ids'; its inputs are input_ids"),
        (
            ["--dynamic", "input_ids:2=x"],
            "--dynamic input_ids: input 'input_ids' has 2 dimension(s), so it has no axis 2",
        ),
        (["--dynamic", "input_ids:0=n,1=n"], "give axes of different sizes different names"),
    ],
)
def test_export_argument_errors_name_the_file_and_the_flag(
    lm_file: Path, tmp_path: Path, extra: list[str], says: str
) -> None:
    args = ["export", str(lm_file), "-s", "2x12", "--dtype", "int64", *extra, "-o", str(tmp_path / "m.pt2")]
    human = runner.invoke(app, args)
    text = _one_red_line(human)
    assert text == f"error: {lm_file}: {says}" or (text.startswith(f"error: {lm_file}: ") and says in text)
    assert "dynamic_axes" not in text, "the flag, never the Python keyword"
    as_json = runner.invoke(app, [*args, "--json"])
    assert as_json.exit_code == 2
    doc = _strict_json(as_json.stdout)
    assert doc["ok"] is False and doc["path"] == str(lm_file) and says in doc["error"]
    assert not (tmp_path / "m.pt2").exists()


def test_export_usage_errors_exit_2_with_valid_json(lm_file: Path, tmp_path: Path) -> None:
    bad = ["export", str(lm_file), "-s", "2x12", "--dynamic", "input_ids:x=batch", "-o", str(tmp_path / "m.pt2")]
    result = runner.invoke(app, [*bad, "--json"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    doc = _strict_json(result.stdout)
    assert doc["ok"] is False and "--dynamic" in doc["error"] and "input_ids:0=batch,1=seq" in doc["error"]
    suffix = runner.invoke(app, ["export", str(lm_file), "-s", "2x12", "-o", str(tmp_path / "m.bin"), "--json"])
    assert suffix.exit_code == 2 and "-o" in _strict_json(suffix.stdout)["error"]
    assert "--format" in _strict_json(suffix.stdout)["error"] and "format=" not in suffix.stdout
    shape = runner.invoke(
        app, ["export", str(lm_file), "-s", "2x12", "--dtype", "float32", "-o", str(tmp_path / "m.pt2"), "--json"]
    )
    doc = _strict_json(shape.stdout)
    assert shape.exit_code == 2 and doc["path"] == str(lm_file) and "--input-shape" in doc["error"]


def test_export_errors_of_the_exporter_name_the_artifact_and_flags(tmp_path: Path) -> None:
    path = tk.save_model(RowIndex(), tmp_path / "rows.safetensors")
    out = tmp_path / "rows.pt2"
    result = runner.invoke(app, ["export", str(path), "-s", "2x4", "-o", str(out), "--json"])
    doc = _strict_json(result.stdout)
    assert result.exit_code == 2 and doc["ok"] is False and doc["path"] == str(out)
    assert doc["error"].startswith(f"{out}: export to torch.export failed") and "--static-batch" in doc["error"]
    assert "dynamic_batch" not in doc["error"] and not out.exists()
    verbose = runner.invoke(app, ["-v", "export", str(path), "-s", "2x4", "-o", str(out)])
    assert verbose.exit_code == 2 and "Traceback" in verbose.stderr and "ExportError" in verbose.stderr


def test_quantize_errors_name_the_file_and_the_flag_with_valid_json(mlp_file: Path) -> None:
    gru = runner.invoke(app, ["quantize", str(mlp_file), "--modules", "gru", "--json"])
    doc = _strict_json(gru.stdout)
    assert gru.exit_code == 2 and doc == {
        "ok": False,
        "error": f"{mlp_file}: MLP has no submodule of type GRU to quantize: pass --modules with the layer types it "
        "has (linear)",
        "path": str(mlp_file),
    }
    shape = runner.invoke(app, ["quantize", str(mlp_file), "-s", "2x3", "--json"])
    doc = _strict_json(shape.stdout)
    assert shape.exit_code == 2 and doc["path"] == str(mlp_file) and "--input-shape" in doc["error"]
    usage = runner.invoke(app, ["quantize", str(mlp_file), "--dtype", "int4", "--json"])
    assert usage.exit_code == 2 and "--dtype" in _strict_json(usage.stdout)["error"]
    verbose = runner.invoke(app, ["-v", "quantize", str(mlp_file), "-s", "2x3"])
    assert verbose.exit_code == 2 and "Traceback" in verbose.stderr and "mat1 and mat2" in verbose.stderr

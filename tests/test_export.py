"""tk.export: every format on four models, dynamic batch, verification, atomicity, unavailable formats."""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import pytest
import torch
from export_models import MLP, SignBranch, SmallCNN, TwoInputs, seeded, transformer_layer
from torch.utils import _pytree as pytree

import torchkeep as tk
from torchkeep.errors import ExportError, ExportUnavailableError, ExportVerificationError, TorchkeepError

export_api = importlib.import_module("torchkeep.export.api")
verify_export = export_api.verify_export

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")

SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "torch.export": ".pt2"}


def _case(name: str) -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    if name == "mlp":
        return MLP().train(), torch.randn(2, 8)
    if name == "cnn":  # batch 1: the dynamic batch must still be dynamic
        return seeded(SmallCNN()), torch.randn(1, 3, 8, 8)
    if name == "two-input":
        return TwoInputs().train(), ((torch.randn(2, 4), torch.randn(2, 6)), {"scale": torch.randn(2, 3)})
    return transformer_layer().train(), torch.randn(2, 5, 16)


def _run_artifact(fmt: str, path: Path, call: tuple[tuple, dict]) -> list[torch.Tensor]:
    """Run an artifact with its own runtime, independently of torchkeep's verification code."""
    args, kwargs = call
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), tensors, strict=True)}
        return [torch.from_numpy(o) for o in session.run(None, feed)]
    if fmt == "torchscript":
        return pytree.tree_leaves(torch.jit.load(str(path))(*tensors))
    return pytree.tree_leaves(torch.export.load(str(path)).module()(*args, **kwargs))


def _other_batch(call: object, batch: int) -> tuple[tuple, dict]:
    args, kwargs = importlib.import_module("torchkeep.export._inputs").as_call(call)
    torch.manual_seed(1)
    return pytree.tree_map(lambda t: torch.randn(batch, *t.shape[1:]), (args, kwargs))


MODELS = ["mlp", "cnn", "two-input", "transformer"]
FORMATS = [
    pytest.param("onnx", marks=pytest.mark.slow),
    "torchscript",
    "torch.export",
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each (format, model) exported once, shared by the tests that look at it."""
    cache: dict = {}

    def get(fmt: str, name: str) -> tuple:
        if (fmt, name) not in cache:
            model, inputs = _case(name)
            path = tmp_path_factory.mktemp("export") / f"{name}{SUFFIX[fmt]}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                report = tk.export(model, inputs, path)
            cache[fmt, name] = (model, inputs, path, report)
        return cache[fmt, name]

    return get


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_exports_verifies_and_runs_another_batch(exported, fmt: str, name: str) -> None:
    model, _, path, report = exported(fmt, name)
    assert report.format == fmt and report.verified and report.path == str(path) and path.is_file()
    assert report.dynamic_batch and len(report.checks) == 2 and report.checks[1].name.startswith("batch ")
    assert report.bytes == path.stat().st_size > 0 and report.export_seconds > 0
    assert report.max_abs_error < 1e-4
    assert model.training, "the model's training mode is restored after export"
    # independently of the report: a batch size the export never saw, run by the artifact's own runtime
    call = _other_batch(_case(name)[1], 7)
    model.eval()
    with torch.no_grad():
        want = pytree.tree_leaves(model(*call[0], **call[1]))
    got = _run_artifact(fmt, path, call)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and w.shape[0] == 7
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_names_follow_the_signature_and_the_output_structure(exported, fmt: str) -> None:
    report = exported(fmt, "two-input")[3]
    assert report.input_names == ["x", "y", "scale"]
    assert report.output_names == ["logits", "aux.0", "aux.1"]
    assert exported(fmt, "cnn")[3].input_names == ["x"] and exported(fmt, "cnn")[3].output_names == ["output"]


@pytest.mark.slow
def test_onnx_uses_the_dynamo_exporter_with_a_symbolic_batch(exported) -> None:
    import onnx

    _, _, path, report = exported("onnx", "cnn")
    assert report.exporter == "torch.onnx.export(dynamo=True)" and report.fallback == "" and report.opset
    graph = onnx.load(str(path)).graph
    dim0 = graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value, "batch axis must be symbolic, not a fixed size"
    assert [i.name for i in graph.input] == ["x"] and [o.name for o in graph.output] == ["output"]


def test_eval_semantics_dropout_and_batchnorm(exported) -> None:
    model, inputs, path, _ = exported("torch.export", "cnn")
    program = torch.export.load(str(path)).module()
    a, b = program(inputs), program(inputs)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # no dropout at inference
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(a, model(inputs))  # running statistics, not batch statistics
    model.train()


def test_static_batch_checks_once_and_fixes_the_shape(tmp_path: Path) -> None:
    model, inputs = _case("mlp")
    report = tk.export(model, inputs, tmp_path / "m.pt2", dynamic_batch=False)
    assert (
        report.verified and not report.dynamic_batch and [c.name for c in report.checks] == ["example inputs (batch 2)"]
    )
    with pytest.raises(Exception):  # noqa: B017 - the guard error type is torch's business
        torch.export.load(str(tmp_path / "m.pt2")).module()(torch.randn(3, 8))


def test_torchscript_warns_that_it_is_deprecated(tmp_path: Path) -> None:
    model, inputs = _case("mlp")
    with pytest.warns(FutureWarning, match="TorchScript is deprecated"):
        report = tk.export(model, inputs, tmp_path / "m.ts")
    assert report.exporter == "torch.jit.trace" and any("deprecated" in w for w in report.warnings)


def test_torchscript_script_method(tmp_path: Path) -> None:
    model, inputs = _case("mlp")
    with pytest.warns(FutureWarning):
        report = tk.export(model, inputs, tmp_path / "m.pt", method="script")
    assert report.exporter == "torch.jit.script" and report.verified


# -- verification catches what is wrong ------------------------------------------------------


def test_trace_frozen_branch_is_caught_by_verify_inputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SignBranch().train()
    x, other = torch.rand(2, 4) + 0.1, -torch.rand(2, 4) - 0.1  # positive sum, negative sum
    path = tmp_path / "branch.pt"
    with pytest.warns(FutureWarning), pytest.raises(ExportVerificationError) as info:
        tk.export(model, x, path, verify_inputs=[other])
    err = info.value
    assert isinstance(err, TorchkeepError) and isinstance(err, RuntimeError)
    assert err.path == str(path) and path.is_file(), "the artifact is kept for inspection"
    failed = {f[0] for f in err.failures}
    assert failed == {"verify_inputs[0]"}
    assert err.report.checks[0].ok and err.failures[0][2] > 1e-3
    assert "verify_inputs[0]" in str(err) and "kept" in str(err)
    # the tolerances actually applied (float32 defaults), not the None that was passed
    assert "rtol=0.0001, atol=1e-05" in str(err) and "None" not in str(err)
    assert err.report.checks[1].outputs[0].rtol == 1e-4 and err.report.checks[1].outputs[0].atol == 1e-5
    assert all(m.training for m in model.modules()), "training mode restored after a verification error"


def _alter_weights(fmt: str, path: Path) -> None:
    if fmt == "onnx":
        import onnx
        from onnx import numpy_helper

        m = onnx.load(str(path))
        init = max(m.graph.initializer, key=lambda t: len(t.raw_data) or 0)
        arr = numpy_helper.to_array(init).copy()
        arr += 0.5
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
        onnx.save(m, str(path))
    elif fmt == "torchscript":
        m = torch.jit.load(str(path))
        with torch.no_grad():
            next(iter(m.parameters())).add_(0.5)
        m.save(str(path))
    else:
        program = torch.export.load(str(path))
        with torch.no_grad():
            next(iter(program.state_dict.values())).add_(0.5)
        torch.export.save(program, str(path))


@pytest.mark.parametrize("fmt", FORMATS)
def test_verify_export_catches_weights_altered_after_export(tmp_path: Path, fmt: str) -> None:
    model, inputs = _case("mlp")
    path = tmp_path / f"m{SUFFIX[fmt]}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        tk.export(model, inputs, path)
    assert verify_export(path, model, inputs).verified
    _alter_weights(fmt, path)
    with pytest.raises(ExportVerificationError) as info:
        verify_export(path, model, inputs)
    report = info.value.report
    assert not report.verified and report.max_abs_error > 0.1
    assert all(not c.ok for c in report.checks)
    assert "max abs error" in str(info.value)


def test_verification_reports_an_artifact_that_cannot_run_another_batch(tmp_path: Path) -> None:
    model, inputs = _case("mlp")
    tk.export(model, inputs, tmp_path / "m.pt2", dynamic_batch=False)
    with pytest.raises(ExportVerificationError) as info:
        verify_export(tmp_path / "m.pt2", model, inputs, dynamic_batch=True)
    (check, output, *_rest, reason) = info.value.failures[0]
    assert check == "batch 4" and output == "output" and "failed to run" in reason


def test_tolerances_apply(tmp_path: Path) -> None:
    model, inputs = _case("transformer")
    tk.export(model, inputs, tmp_path / "t.pt2")
    with pytest.raises(ExportVerificationError):
        verify_export(tmp_path / "t.pt2", model, inputs, rtol=0.0, atol=1e-12)
    assert verify_export(tmp_path / "t.pt2", model, inputs, rtol=0.0, atol=1e-3).verified


# -- writing ---------------------------------------------------------------------------------


def test_failed_export_writes_nothing_and_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "m.pt2"
    path.write_bytes(b"previous artifact")
    model = SignBranch().train()  # torch.export refuses a Python branch on a tensor value
    with pytest.raises(ExportError) as info:
        tk.export(model, torch.randn(2, 4), path)
    assert isinstance(info.value, RuntimeError) and "torch.export" in str(info.value)
    assert all(m.training for m in model.modules()), "training mode restored after an export error"
    assert path.read_bytes() == b"previous artifact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2"], "no temporary files left behind"


def test_tensorrt_is_unavailable_without_torch_tensorrt_and_a_gpu(tmp_path: Path) -> None:
    model, inputs = _case("mlp")
    with pytest.raises(ExportUnavailableError) as info:
        tk.export(model, inputs, tmp_path / "m.engine", format="tensorrt")
    err = info.value
    assert isinstance(err, ImportError) and err.format == "tensorrt"
    assert "an NVIDIA GPU with CUDA" in err.missing or "torch_tensorrt" in err.missing
    assert "NVIDIA GPU" in str(err) and "pip install torch-tensorrt" in str(err)
    assert list(tmp_path.iterdir()) == []


def test_format_from_suffix_and_errors(tmp_path: Path) -> None:
    assert export_api.format_for("a.onnx") == "onnx" and export_api.format_for("a.ts") == "torchscript"
    with pytest.raises(ValueError, match="cannot tell the export format"):
        tk.export(torch.nn.Linear(2, 2), torch.randn(2, 2), tmp_path / "m.bin")
    with pytest.raises(ValueError, match="unknown export format"):
        tk.export(torch.nn.Linear(2, 2), torch.randn(2, 2), tmp_path / "m.bin", format="tflite")
    with pytest.raises(ValueError, match="output_names has 2"):
        tk.export(torch.nn.Linear(2, 2), torch.randn(2, 2), tmp_path / "m.pt2", output_names=["a", "b"])


@pytest.mark.slow
def test_onnx_legacy_and_fallback_are_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, inputs = _case("mlp")
    legacy = tk.export(model, inputs, tmp_path / "legacy.onnx", legacy=True)
    assert legacy.exporter == "torch.onnx.export(dynamo=False)" and legacy.fallback == "" and legacy.verified
    real = torch.onnx.export

    def dynamo_breaks(*args: object, **kwargs: object) -> object:
        if kwargs.get("dynamo"):
            raise RuntimeError("simulated exporter failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_breaks)
    with pytest.warns(UserWarning, match="TorchScript-based") as caught:
        report = tk.export(model, inputs, tmp_path / "fallback.onnx")
    assert caught[0].filename == __file__, "the warning points at the caller"
    assert report.exporter == "torch.onnx.export(dynamo=False)" and report.verified
    assert "simulated exporter failure" in report.fallback and report.warnings[0] == report.fallback
    assert [c.name for c in report.checks] == ["example inputs (batch 2)", "batch 4"]

    def dynamo_breaks_in_colour(*args: object, **kwargs: object) -> object:
        if kwargs.get("dynamo"):
            try:
                raise ValueError("\x1b[96mop not supported\x1b[0m: aten::frobnicate\nmore detail")
            except ValueError as e:
                raise RuntimeError("Failed to export. \x1b[96mThis is step 1/3\x1b[0m of exporting") from e
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_breaks_in_colour)
    with pytest.warns(UserWarning):
        report = tk.export(model, inputs, tmp_path / "fallback2.onnx")
    assert "\x1b" not in report.fallback and "op not supported: aten::frobnicate" in report.fallback
    assert "ValueError" in report.fallback and "more detail" not in report.fallback


def test_report_to_dict_is_json_ready(exported) -> None:
    import json

    d = exported("torch.export", "two-input")[3].to_dict()
    back = json.loads(json.dumps(d))
    assert back["verified"] is True and back["format"] == "torch.export"
    assert [o["name"] for o in back["checks"][0]["outputs"]] == ["logits", "aux.0", "aux.1"]
    assert back["checks"][0]["outputs"][0]["shape"] == [2, 3]


def test_the_package_is_callable_like_the_function(tmp_path: Path) -> None:
    package = importlib.import_module("torchkeep.export")
    report = package(torch.nn.Linear(3, 2), torch.randn(2, 3), tmp_path / "m.pt2")
    assert isinstance(report, tk.ExportReport) and report.verified


# -- refusals, fixed batch sizes, dtypes -------------------------------------------------------


@pytest.mark.slow
def test_onnx_refuses_a_value_dependent_branch_instead_of_tracing_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SignBranch().train()
    x, other = torch.rand(2, 4) + 0.1, -torch.rand(2, 4) - 0.1
    path = tmp_path / "branch.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no silent (or warned) fallback to tracing
        with pytest.raises(ExportError) as info:
            tk.export(model, x, path)
    text = str(info.value)
    assert info.value.format == "onnx" and "\x1b" not in text
    assert "GuardOnDataDependentSymNode" in text and "torch.where" in text and "legacy=True" in text
    assert list(tmp_path.iterdir()) == [] and all(m.training for m in model.modules())
    # traced knowingly: the frozen branch is caught by inputs that take the other one
    with pytest.raises(ExportVerificationError) as failed:
        tk.export(model, x, path, legacy=True, verify_inputs=[other])
    assert {f[0] for f in failed.value.failures} == {"verify_inputs[0]"} and path.is_file()
    assert failed.value.report.exporter == "torch.onnx.export(dynamo=False)" and failed.value.report.fallback == ""


class _FixedBatch(torch.nn.Module):
    """Runs only with batch 2: the batch size is baked into a reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).view(2, 4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_fixed_batch_size_is_an_export_error_and_nothing_is_written(tmp_path: Path, fmt: str) -> None:
    model = _FixedBatch().train()
    path = tmp_path / f"fixed{SUFFIX[fmt]}"
    with pytest.raises(ExportError) as info:
        tk.export(model, torch.randn(2, 4), path)
    assert "cannot run batch 4" in str(info.value) and "dynamic_batch=False" in str(info.value)
    assert list(tmp_path.iterdir()) == [], "nothing committed, no staging directory left"
    assert all(m.training for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        report = tk.export(model, torch.randn(2, 4), path, dynamic_batch=False)
    assert report.verified and path.is_file()


def test_an_artifact_that_cannot_be_checked_is_not_committed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def cannot_load(fmt: str, path: Path, names: list[str]):
        assert ".tmp-" in str(path), "verified from the staging directory"
        raise ExportError(fmt, "the runtime cannot load it", "hint")

    monkeypatch.setattr(export_api, "_runner", cannot_load)
    path = tmp_path / "m.pt2"
    path.write_bytes(b"previous artifact")
    with pytest.raises(ExportError, match="cannot load it"):
        tk.export(*_case("mlp"), path)
    assert path.read_bytes() == b"previous artifact" and [p.name for p in tmp_path.iterdir()] == ["m.pt2"]


def test_an_output_of_another_dtype_fails_verification(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchkeep.export.report import compare

    assert not compare("o", torch.ones(3, dtype=torch.float16), torch.ones(3), None, None).ok
    mismatch = compare("o", torch.tensor([1.0, 2.0]), torch.tensor([1, 2]), None, None)
    assert not mismatch.ok and mismatch.reason == "dtype float32 != int64 (eager)"
    real = export_api._runner

    def doubles(fmt: str, path: Path, names: list[str]):
        run = real(fmt, path, names)
        return lambda call: [t.double() for t in run(call)]

    monkeypatch.setattr(export_api, "_runner", doubles)
    with pytest.raises(ExportVerificationError) as info:
        tk.export(*_case("mlp"), tmp_path / "m.pt2")
    assert "dtype float64 != float32" in str(info.value) and (tmp_path / "m.pt2").is_file()


@pytest.mark.slow
def test_bfloat16_onnx_that_onnxruntime_cannot_run_is_an_export_error(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).to(torch.bfloat16)
    with pytest.raises(ExportError) as info:
        tk.export(model, torch.randn(2, 8, dtype=torch.bfloat16), tmp_path / "m.onnx")
    assert "onnxruntime cannot load" in str(info.value) and "float32" in str(info.value)
    assert list(tmp_path.iterdir()) == []


# -- ONNX external data ------------------------------------------------------------------------


@pytest.mark.slow
def test_onnx_external_data_is_named_per_export_and_replaced_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime as ort
    from torch.onnx._internal.exporter import _onnx_program

    files_module = importlib.import_module("torchkeep.export._files")
    assert hasattr(_onnx_program, "_LARGE_MODEL_THRESHOLD")
    monkeypatch.setattr(_onnx_program, "_LARGE_MODEL_THRESHOLD", 0)  # as if over 2 GB: weights go to a data file
    torch.manual_seed(0)
    a, b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    x = torch.randn(2, 64)
    path = tmp_path / "model.onnx"

    def run_onnx() -> torch.Tensor:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])

    first = tk.export(a, x, path)
    data_a = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".data"))
    assert len(data_a) == 1 and data_a[0].startswith("model.") and data_a[0] != "model.onnx.data"
    assert first.files == [str(tmp_path / data_a[0]), str(path)] and first.path == str(path)
    assert first.bytes == sum(p.stat().st_size for p in tmp_path.iterdir()) > 64 * 64 * 4
    again = verify_export(path, a, x)
    assert again.files == first.files and again.bytes == first.bytes

    # a crash between moving the new data into place and the new .onnx: the old pair still works
    real_replace = files_module.os.replace

    def crash_at_main_file(src: object, dst: object) -> None:
        if str(dst) == str(path):
            raise KeyboardInterrupt("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(files_module.os, "replace", crash_at_main_file)
    with pytest.raises(KeyboardInterrupt):
        tk.export(b, x, path)
    monkeypatch.setattr(files_module.os, "replace", real_replace)
    with torch.no_grad():
        torch.testing.assert_close(run_onnx(), a(x))

    second = tk.export(b, x, path)
    data_b = [Path(f).name for f in second.files[:-1]]
    assert len(data_b) == 1 and data_b[0] != data_a[0]
    assert not (tmp_path / data_a[0]).exists(), "the previous export's data file is removed"
    with torch.no_grad():
        torch.testing.assert_close(run_onnx(), b(x))

    monkeypatch.setattr(_onnx_program, "_LARGE_MODEL_THRESHOLD", 2**31)  # small again: weights inside the .onnx
    third = tk.export(a, x, path)
    assert third.files == [str(path)] and third.bytes == path.stat().st_size
    leftover = {p.name for p in tmp_path.iterdir() if not p.name.startswith(".")}
    assert data_b[0] not in leftover and "model.onnx" in leftover
    with torch.no_grad():
        torch.testing.assert_close(run_onnx(), a(x))


# -- TensorRT, with a stand-in for torch_tensorrt ------------------------------------------------


def test_tensorrt_compiles_a_copy_on_the_device_and_moves_keyword_inputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys
    import types

    trt = importlib.import_module("torchkeep.export.tensorrt")
    seen: dict = {}

    def compile(module: torch.nn.Module, **kw: object) -> torch.nn.Module:
        seen["model"] = module
        seen["devices"] = {t.device.type for t in pytree.tree_leaves(kw) if isinstance(t, torch.Tensor)}
        return module

    def save(module: torch.nn.Module, file: str, **kw: object) -> None:
        Path(file).write_bytes(b"engine")

    fake = types.ModuleType("torch_tensorrt")
    fake.compile, fake.save = compile, save
    monkeypatch.setitem(sys.modules, "torch_tensorrt", fake)
    monkeypatch.setattr(trt, "require_tensorrt", lambda: None)
    monkeypatch.setattr(trt, "_device", lambda: torch.device("meta"))  # stands in for "cuda"
    model, inputs = _case("two-input")
    reference = TwoInputs()
    reference.load_state_dict(model.state_dict())
    reference.eval()

    def load(path: Path):  # a runtime that computes what the engine would
        def run(call: tuple) -> list:
            with torch.no_grad():
                return pytree.tree_leaves(reference(*call[0], **call[1]))

        return run

    monkeypatch.setattr(trt, "load_tensorrt", load)
    report = tk.export(model, inputs, tmp_path / "m.ep", format="tensorrt")
    assert report.verified and not report.dynamic_batch and (tmp_path / "m.ep").read_bytes() == b"engine"
    assert seen["model"] is not model and next(seen["model"].parameters()).device.type == "meta"
    assert seen["devices"] == {"meta"}, "positional and keyword inputs are moved to the device"
    assert all(p.device.type == "cpu" for p in model.parameters()), "the user's model stays where it was"
    assert model.training


# -- the report as strict JSON, the public names ---------------------------------------------------


def test_to_dict_of_a_failed_check_is_strict_json() -> None:
    import json

    from torchkeep.export.report import Check, OutputError

    failed = OutputError("output", [], float("inf"), float("nan"), False, "the artifact failed to run")
    report = tk.ExportReport(
        path="m.pt", format="torchscript", exporter="torch.jit.trace", checks=[Check("b", [failed])]
    )
    text = json.dumps(report.to_dict(), allow_nan=False)
    back = json.loads(text)
    assert back["max_abs_error"] is None and back["checks"][0]["outputs"][0]["max_rel"] is None
    assert back["verified"] is False


def test_tk_export_is_the_callable_package(tmp_path: Path) -> None:
    import sys

    assert tk.export is sys.modules["torchkeep.export"]
    report = tk.export(torch.nn.Linear(3, 2), torch.randn(2, 3), tmp_path / "m.pt2")
    assert isinstance(report, tk.ExportReport) and report.verified
    model = torch.nn.Linear(3, 2)
    tk.export(model, torch.randn(2, 3), tmp_path / "n.pt2")
    assert tk.export.verify_export(tmp_path / "n.pt2", model, torch.randn(2, 3)).verified
    import torchkeep.export.api as api_module

    assert api_module.export is tk.export.export and tk.export is sys.modules["torchkeep.export"]
    assert callable(tk.quantize) and tk.QuantizeReport.__name__ == "QuantizeReport"
    assert tk.ExportReport is api_module.ExportReport


# -- typed argument errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "argument", "says"),
    [
        ({"path": "m.bin"}, "path", "cannot tell the export format"),
        ({"path": "m.bin", "format": "tflite"}, "format", "unknown export format"),
        ({"path": "m.pt2", "method": "compile"}, "method", "'trace'"),
        ({"path": "m.pt2", "output_names": ["a", "b"]}, "output_names", "pass exactly 1"),
        ({"path": "m.pt2", "input_names": []}, "input_names", "pass exactly 1"),
        ({"path": "m.pt2", "verify_inputs": [torch.randn(2, 5)]}, "verify_inputs[0]", "eager model cannot run"),
    ],
)
def test_bad_export_arguments_are_typed_value_errors(tmp_path: Path, kwargs: dict, argument: str, says: str) -> None:
    kwargs = dict(kwargs)
    path = tmp_path / kwargs.pop("path")
    with pytest.raises(tk.errors.InvalidArgumentError) as info:
        tk.export(torch.nn.Linear(2, 2), torch.randn(2, 2), path, **kwargs)
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, TorchkeepError)
    assert err.argument == argument and says in str(err) and str(err).startswith(f"{argument}=")
    assert list(tmp_path.iterdir()) == []


def test_example_inputs_of_another_type_are_a_typed_type_error(tmp_path: Path) -> None:
    with pytest.raises(tk.errors.ArgumentTypeError, match=r"example_inputs must be a tensor.*not int") as info:
        tk.export(torch.nn.Linear(2, 2), 3, tmp_path / "m.pt2")
    assert isinstance(info.value, TypeError) and info.value.argument == "example_inputs"


def test_torchscript_writer_refuses_an_unknown_method(tmp_path: Path) -> None:
    from torchkeep.export.torchscript import export_torchscript

    with pytest.raises(tk.errors.InvalidArgumentError, match=r"method='jit': pass 'trace'") as info:
        export_torchscript(torch.nn.Linear(2, 2), ((torch.randn(2, 2),), {}), tmp_path / "m.pt", method="jit")
    assert isinstance(info.value, ValueError)


def test_verify_export_of_a_missing_artifact_says_so(tmp_path: Path) -> None:
    from torchkeep.export import verify_export

    with pytest.raises(tk.errors.CheckpointNotFoundError, match=r"written by tk\.export") as info:
        verify_export(tmp_path / "absent.pt2", torch.nn.Linear(2, 2), torch.randn(2, 2))
    assert isinstance(info.value, FileNotFoundError)

"""tk.export with keyword inputs and dynamic axes beyond the batch (a sequence axis), checked at other sizes;
failure messages that name the cause, whole, with the exporters' own output kept off the terminal."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from export_models import SignBranch, TinyLM

import torchkeep as tk
from torchkeep.errors import ArgumentTypeError, ExportError, ExportVerificationError, InvalidArgumentError
from torchkeep.export import verify_export

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")

AXES = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
OTHER_SHAPES = [(3, 7), (1, 19)]  # the example is 2x12


def _lm() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    return TinyLM().train(), torch.randint(0, 50, (2, 12)), mask


def _inputs(batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch * 100 + seq)
    return torch.randint(0, 50, (batch, seq), generator=g), torch.ones(batch, seq, dtype=torch.long)


def _eager(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids, attention_mask=mask)


def test_dynamic_axes_and_kwargs_make_batch_and_sequence_dynamic_in_a_pt2(tmp_path: Path) -> None:
    model, ids, mask = _lm()
    path = tmp_path / "lm.pt2"
    report = tk.export(model, ids, path, kwargs={"attention_mask": mask}, dynamic_axes=AXES)
    assert report.verified and report.input_names == ["input_ids", "attention_mask"]
    assert report.dynamic_axes == AXES and report.dynamic_batch and report.defaults == []
    assert [c.name for c in report.checks] == ["example inputs (batch 2, seq 12)", "batch 4, seq 7"]
    assert report.checks[1].shapes == {"input_ids": [4, 7], "attention_mask": [4, 7]}
    assert report.checks[0].shapes == {"input_ids": [2, 12], "attention_mask": [2, 12]}
    assert model.training, "the model's training mode is restored"
    program = torch.export.load(str(path)).module()
    for batch, seq in OTHER_SHAPES:
        x, m = _inputs(batch, seq)
        torch.testing.assert_close(program(x, attention_mask=m), _eager(model, x, m), rtol=1e-5, atol=1e-6)


def test_example_inputs_as_a_dict_of_named_inputs(tmp_path: Path) -> None:
    model, ids, mask = _lm()
    report = tk.export(model, {"attention_mask": mask, "input_ids": ids}, tmp_path / "lm.pt2", dynamic_axes=AXES)
    assert report.verified and report.input_names == ["input_ids", "attention_mask"], "forward's order"
    assert report.checks[1].name == "batch 4, seq 7"


def test_dynamic_axes_onnx_names_the_graph_dimensions_and_runs_other_shapes(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    model, ids, mask = _lm()
    path = tmp_path / "lm.onnx"
    report = tk.export(model, ids, path, kwargs={"attention_mask": mask}, dynamic_axes=AXES)
    assert report.verified and report.exporter == "torch.onnx.export(dynamo=True)"
    graph = onnx.load(str(path)).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims == {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"]}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, seq in OTHER_SHAPES:
        x, m = _inputs(batch, seq)
        got = session.run(None, {"input_ids": x.numpy(), "attention_mask": m.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), _eager(model, x, m), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_dynamic_axes_with_the_torchscript_based_onnx_exporter_cover_the_outputs(tmp_path: Path) -> None:
    import onnx

    model, ids, mask = _lm()
    path = tmp_path / "legacy.onnx"
    report = tk.export(model, ids, path, kwargs={"attention_mask": mask}, dynamic_axes=AXES, legacy=True)
    assert report.verified and report.checks[1].name == "batch 4, seq 7"
    out = onnx.load(str(path)).graph.output[0]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", "seq", 50]


def test_torchscript_records_no_axes_but_is_checked_at_other_sizes(tmp_path: Path) -> None:
    model, ids, mask = _lm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        report = tk.export(model, ids, tmp_path / "lm.pt", kwargs={"attention_mask": mask}, dynamic_axes=AXES)
    assert report.verified and report.checks[1].shapes["input_ids"] == [4, 7]


def test_torch_dynamic_shapes_are_passed_as_given_and_bound_the_checked_sizes(tmp_path: Path) -> None:
    model, ids, _ = _lm()
    dim = torch.export.Dim
    shapes = {"input_ids": {0: dim("b", max=64), 1: dim("seq", min=2, max=16)}}
    report = tk.export(model, ids, tmp_path / "lm.pt2", dynamic_shapes=shapes)
    assert report.verified and report.dynamic_axes == {"input_ids": {0: "b", 1: "seq"}}
    assert report.checks[1].name == "b 4, seq 7"
    program = torch.export.load(str(tmp_path / "lm.pt2")).module()
    with pytest.raises(Exception):  # noqa: B017 - over the bound the program's own guard refuses
        program(torch.randint(0, 50, (2, 17)))
    auto = tk.export(model, ids, tmp_path / "auto.pt2", dynamic_shapes=({0: dim.AUTO, 1: dim.DYNAMIC},))
    assert auto.verified and auto.checks[1].shapes == {"input_ids": [4, 7]}


def test_a_sequence_length_the_model_fixes_is_an_export_error_naming_the_axis(tmp_path: Path) -> None:
    class FixedLength(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(50, 8)
            self.pos = torch.nn.Parameter(torch.randn(12, 8))

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.emb(input_ids) + self.pos

    _, ids, _ = _lm()
    with pytest.raises(ExportError) as info:
        tk.export(FixedLength(), ids, tmp_path / "m.pt2", dynamic_axes={"input_ids": {0: "batch", 1: "seq"}})
    text = str(info.value)
    assert text.startswith(f"{tmp_path / 'm.pt2'}: export to torch.export failed: the model cannot run batch 4, seq 7")
    assert "the size of seq is fixed" in text and "dynamic_axes=" in text and info.value.path == str(tmp_path / "m.pt2")
    assert list(tmp_path.iterdir()) == []
    report = tk.export(FixedLength(), ids, tmp_path / "m.pt2", dynamic_axes={"input_ids": {0: "batch"}})
    assert report.verified and report.checks[1].name == "batch 4"


@pytest.mark.parametrize(
    ("kwargs", "error", "says"),
    [
        (
            {"dynamic_axes": {"ids": {0: "batch"}}},
            InvalidArgumentError,
            "no input named 'ids'; its inputs are input_ids",
        ),
        ({"dynamic_axes": {"input_ids": {2: "x"}}}, InvalidArgumentError, "has 2 dimension(s), so it has no axis 2"),
        ({"dynamic_axes": {"input_ids": {0: ""}}}, InvalidArgumentError, "non-empty string"),
        ({"dynamic_axes": {"input_ids": "0"}}, ArgumentTypeError, "a dict {axis: name} or a list of axes"),
        ({"dynamic_axes": [0, 1]}, ArgumentTypeError, "dynamic_axes must be a dict"),
        ({"dynamic_axes": {"input_ids": {0: "n", 1: "n"}}}, InvalidArgumentError, "give axes of different sizes"),
        ({"dynamic_axes": {}, "dynamic_shapes": ()}, InvalidArgumentError, "either dynamic_axes"),
        ({"dynamic_shapes": ({0: None}, {1: None})}, InvalidArgumentError, "one entry per input (1)"),
    ],
)
def test_bad_dynamic_axes_are_typed_errors_naming_the_fix(tmp_path: Path, kwargs: dict, error: type, says: str) -> None:
    model, ids, _ = _lm()
    with pytest.raises(error) as info:
        tk.export(model, ids, tmp_path / "m.pt2", **kwargs)
    assert says in str(info.value) and info.value.argument.startswith(("dynamic_axes", "dynamic_shapes"))
    assert list(tmp_path.iterdir()) == []


def test_a_list_of_axes_names_them_after_the_input(tmp_path: Path) -> None:
    model, ids, _ = _lm()
    report = tk.export(model, ids, tmp_path / "m.pt2", dynamic_axes={"input_ids": [0, 1]})
    assert report.dynamic_axes == {"input_ids": {0: "input_ids_dim0", 1: "input_ids_dim1"}} and report.verified


# -- failures: the cause, the whole message, nothing on the terminal ------------------------------------------


class DynamicCache:
    """Stands in for the transformers cache object (a class of that name, not a tensor)."""


class ReturnsACache(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple:
        return self.fc(x), DynamicCache()


@pytest.mark.parametrize("suffix", [".pt2", ".pt"])
def test_a_cache_object_output_is_refused_naming_use_cache(tmp_path: Path, suffix: str) -> None:
    with pytest.raises(ExportError) as info:
        tk.export(ReturnsACache(), torch.randn(2, 4), tmp_path / f"m{suffix}")
    text = str(info.value)
    assert "returns a DynamicCache" in text and "at output 'output_1'" in text
    assert "use_cache=False" in text and "Python branch" not in text
    assert list(tmp_path.iterdir()) == []


def test_exporter_output_stays_off_the_terminal_and_goes_to_the_error(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ExportError) as info:
        tk.export(SignBranch(), torch.randn(2, 4), tmp_path / "m.pt2")
    out, err = capfd.readouterr()
    assert out == "" and err == "", "torch's graph dump and shape warnings are captured"
    e = info.value
    assert "Python branch on a tensor value" in str(e) and "torch.where" in str(e)
    assert "def forward" in e.details and "GuardOnDataDependentSymNode" in e.details, "the partial graph is kept"
    assert e.log and f"The exporter's full output is in {e.log}." in str(e)
    assert Path(e.log).read_text(encoding="utf-8") == e.details
    Path(e.log).unlink()


def test_a_check_at_a_size_the_onnx_graph_fixes_says_so_in_a_whole_message(tmp_path: Path) -> None:
    model, ids, _ = _lm()
    path = tmp_path / "static.onnx"
    tk.export(model, ids, path, dynamic_batch=False)
    with pytest.raises(ExportVerificationError) as info:
        verify_export(path, model, ids, dynamic_axes={"input_ids": {0: "batch", 1: "seq"}})
    text = str(info.value)
    reason = info.value.failures[0][4]
    assert "Got invalid dimensions for input: input_ids" in reason and "Expected: 2" in reason
    assert reason.endswith("or feed the sizes of the example inputs)"), "the hint is whole"
    assert f"{reason} (max abs error inf, max rel error inf)" in text
    assert text.endswith("if the differences are expected (e.g. float16).")

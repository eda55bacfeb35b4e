"""tk.quantize: dynamic int8 quantization, its report, saving (refused, with the float-model alternative)."""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import pytest
import torch
from export_models import MLP
from torch import nn

import torchkeep as tk
from torchkeep.errors import UnsupportedObjectError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP(sizes=(64, 128, 10)).train()


def _packed(qmodel: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """(name, int8 weight, bias) of every dynamically quantized Linear."""
    out = []
    for name, m in qmodel.named_modules():
        if hasattr(m, "_packed_params") and hasattr(m._packed_params, "_weight_bias"):
            w, b = m._packed_params._weight_bias()
            out.append((name, w, b))
    return out


def test_quantize_reports_size_and_error_and_leaves_the_float_model_alone() -> None:
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 64)
    qmodel, report = tk.quantize(model, example_inputs=x)
    assert report.quantized_modules == ["net.0", "net.2"] and report.dtype == "qint8"
    assert report.bytes_before > 2.5 * report.bytes_after, "int8 weights are 4x smaller than float32 (+ overhead)"
    assert report.ratio == report.bytes_before / report.bytes_after
    with torch.no_grad():
        model.eval()
        real = float((qmodel(x) - model(x)).abs().max())
        model.train()
    assert report.max_abs_error == pytest.approx(real) and 0 < real < 0.1
    assert report.outputs[0]["name"] == "output" and report.max_rel_error > 0
    assert model.training and not qmodel.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert isinstance(model.net[0], nn.Linear) and _packed(qmodel)[0][1].dtype == torch.qint8


def test_float16_and_module_selection() -> None:
    model = _mlp()
    _qmodel, report = tk.quantize(model, dtype=torch.float16, modules=(nn.Linear,))
    assert report.dtype == "float16" and report.max_abs_error is None and report.quantized_modules == ["net.0", "net.2"]
    assert report.ratio < 1, "float16 packing is not a size saving: the saved state grows slightly"
    with pytest.raises(ValueError, match="no submodule of type GRU"):
        tk.quantize(model, modules=(nn.GRU,))
    with pytest.raises(ValueError, match=r"qint8 or torch\.float16"):
        tk.quantize(model, dtype=torch.quint8)


def test_lstm_is_quantized() -> None:
    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(8, 16, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0])

    torch.manual_seed(0)
    qmodel, report = tk.quantize(Tagger(), example_inputs=torch.randn(2, 5, 8))
    assert report.quantized_modules == ["head", "rnn"] and report.max_abs_error < 0.1
    assert type(qmodel.rnn).__name__ == "LSTM" and type(qmodel.rnn).__module__.startswith("torch.ao.nn.quantized")


def test_a_quantized_model_is_refused_by_torchkeep_files(tmp_path: Path) -> None:
    qmodel, _ = tk.quantize(_mlp())
    for save in (
        lambda: tk.save({"model": qmodel}, tmp_path / "q.safetensors"),
        lambda: tk.save_model(qmodel, tmp_path / "q.safetensors"),
    ):
        with pytest.raises(UnsupportedObjectError) as info:
            save()
        assert isinstance(info.value, TypeError) and "qint8" in str(info.value)
        assert "_packed_params" in str(info.value), "the message names the packed weights"
        assert "quantize after loading" in str(info.value), "the message gives the alternative"
    assert list(tmp_path.iterdir()) == [], "nothing is written"


def test_save_float_then_quantize_at_load_gives_an_identical_quantized_model(tmp_path: Path) -> None:
    model = _mlp()
    q1, r1 = tk.quantize(model)
    path = tk.save_model(model, tmp_path / "model.safetensors")
    q2, r2 = tk.quantize(tk.load_model(path))
    p1, p2 = _packed(q1), _packed(q2)
    assert [n for n, _, _ in p1] == [n for n, _, _ in p2] == ["net.0", "net.2"]
    for (_, w1, b1), (_, w2, b2) in zip(p1, p2, strict=True):
        assert torch.equal(w1.int_repr(), w2.int_repr())
        assert w1.q_scale() == w2.q_scale() and w1.q_zero_point() == w2.q_zero_point()
        assert torch.equal(b1, b2)
    x = torch.randn(4, 64)
    assert torch.equal(q1(x), q2(x)) and r1.bytes_after == r2.bytes_after


def test_a_quantized_model_exports_to_torchscript(tmp_path: Path) -> None:
    qmodel, _ = tk.quantize(_mlp())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = tk.export(qmodel, torch.randn(2, 64), tmp_path / "q.pt")
    assert report.verified and report.max_abs_error == 0.0
    loaded = torch.jit.load(str(tmp_path / "q.pt"))
    x = torch.randn(5, 64)
    assert torch.equal(loaded(x), qmodel(x))


def test_module_docs_name_the_deprecation_and_the_replacement() -> None:
    doc = importlib.import_module("torchkeep.export.quantize").__doc__
    assert "torch.ao.quantization.quantize_dynamic" in doc and "torchao" in doc and "deprecated" in doc


# -- typed argument errors ---------------------------------------------------------------------


def test_bad_quantize_arguments_are_typed_errors() -> None:
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"dtype=torch\.int8: .*qint8 or torch\.float16") as info:
        tk.quantize(_mlp(), dtype=torch.int8)
    assert isinstance(info.value, ValueError) and info.value.argument == "dtype"
    with pytest.raises(tk.errors.InvalidArgumentError, match="modules is empty") as info:
        tk.quantize(_mlp(), modules=())
    assert isinstance(info.value, ValueError)
    with pytest.raises(tk.errors.InvalidArgumentError, match="no submodule of type GRU") as info:
        tk.quantize(_mlp(), modules=(nn.GRU,))
    assert isinstance(info.value, ValueError) and info.value.argument == "modules"
    with pytest.raises(tk.errors.ArgumentTypeError, match=r"modules must be a tuple of nn\.Module subclasses") as info:
        tk.quantize(_mlp(), modules=(nn.Linear(2, 2),))
    assert isinstance(info.value, TypeError)
    with pytest.raises(tk.errors.ArgumentTypeError, match=r"model must be an nn\.Module") as info:
        tk.quantize({"w": torch.ones(2)})  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError)

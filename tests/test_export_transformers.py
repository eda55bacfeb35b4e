"""Deployable language models: tiny GPT-2 (tied weights, use_cache on by default) and BERT, built from configs,
exported to ONNX and torch.export with dynamic batch and sequence, and run at shapes the export never saw."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchkeep as tk
from torchkeep.errors import ExportError

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers", reason="pip install 'torchkeep[transformers]'")

pytestmark = pytest.mark.filterwarnings("ignore")

EXAMPLE = (2, 12)
OTHER_SHAPES = [(3, 7), (1, 19)]
TOKEN_AXES = {0: "batch", 1: "seq"}


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
    model = transformers.GPT2LMHeadModel(config)
    assert config.use_cache and model.lm_head.weight is model.transformer.wte.weight, "the default: cache on, tied"
    return model


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37
    )
    return transformers.BertModel(config)


def _tokens(batch: int, seq: int, *, bert: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(batch * 100 + seq)
    inputs = {"input_ids": torch.randint(0, 100, (batch, seq), generator=g)}
    if bert:
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, seq - 2 :] = 0  # padding in the first row
        inputs["attention_mask"] = mask
        inputs["token_type_ids"] = (torch.arange(seq) >= seq // 2).long().expand(batch, seq).contiguous()
    return inputs


def _eager(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        out = model(**inputs, use_cache=False)
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def _check_report(report: tk.ExportReport, inputs: list[str], outputs: list[str]) -> None:
    assert report.verified and report.input_names == inputs and report.output_names == outputs
    assert report.dynamic_axes == dict.fromkeys(inputs, TOKEN_AXES)
    assert [c.name for c in report.checks] == ["example inputs (batch 2, seq 12)", "batch 4, seq 7"]
    assert report.checks[1].shapes == {name: [4, 7] for name in inputs}
    defaults = " ".join(report.defaults)
    assert "use_cache=False" in defaults and "dynamic_axes=" in defaults and "a dict of tensors" in defaults


def _run_onnx(path: Path, model: torch.nn.Module, *, bert: bool) -> None:
    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(path)).graph
    for i in graph.input:
        assert [d.dim_param for d in i.type.tensor_type.shape.dim] == ["batch", "seq"], i.name
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    for batch, seq in OTHER_SHAPES:
        inputs = _tokens(batch, seq, bert=bert)
        got = session.run(None, {k: v.numpy() for k, v in inputs.items()})
        want = _eager(model, inputs)
        assert names == list(want)
        for name, g in zip(names, got, strict=True):
            assert g.shape[:2] == (batch, seq) or name == "pooler_output"
            torch.testing.assert_close(torch.from_numpy(g), want[name], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_gpt2_exports_to_onnx_with_dynamic_batch_and_sequence(tmp_path: Path) -> None:
    model = _gpt2()
    path = tmp_path / "gpt2.onnx"
    report = tk.export(model, _tokens(*EXAMPLE)["input_ids"], path)
    _check_report(report, ["input_ids"], ["logits"])
    assert report.exporter == "torch.onnx.export(dynamo=True)" and report.fallback == ""
    _run_onnx(path, model, bert=False)


@pytest.mark.slow
def test_bert_exports_to_onnx_with_dynamic_batch_and_sequence(tmp_path: Path) -> None:
    model = _bert()
    path = tmp_path / "bert.onnx"
    report = tk.export(model, _tokens(*EXAMPLE, bert=True), path)
    _check_report(report, ["input_ids", "attention_mask", "token_type_ids"], ["last_hidden_state", "pooler_output"])
    _run_onnx(path, model, bert=True)


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_lm_exports_to_pt2_and_runs_other_shapes(tmp_path: Path, name: str) -> None:
    bert = name == "bert"
    model = _bert() if bert else _gpt2()
    path = tmp_path / f"{name}.pt2"
    # GPT-2 from a positional tensor, BERT from named inputs: the program is called as it was exported
    example = _tokens(*EXAMPLE, bert=True) if bert else _tokens(*EXAMPLE)["input_ids"]
    report = tk.export(model, example, path)
    inputs = ["input_ids", "attention_mask", "token_type_ids"] if bert else ["input_ids"]
    _check_report(report, inputs, ["last_hidden_state", "pooler_output"] if bert else ["logits"])
    program = torch.export.load(str(path)).module()
    for batch, seq in OTHER_SHAPES:
        tokens = _tokens(batch, seq, bert=bert)
        got = program(**tokens) if bert else program(tokens["input_ids"])
        want = _eager(model, tokens)
        assert type(got) is dict and list(got) == list(want), "a plain dict of tensors"
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_the_pt2_of_an_lm_loads_and_runs_without_transformers(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.pt2"
    tk.export(_gpt2(), _tokens(*EXAMPLE)["input_ids"], path)
    code = (
        "import sys, torch; sys.modules['transformers'] = None\n"
        f"out = torch.export.load({str(path)!r}).module()(torch.randint(0, 100, (1, 19)))\n"
        "print(type(out).__name__, tuple(out['logits'].shape))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["dict", "(1,", "19,", "100)"]


def test_use_cache_true_is_refused_naming_the_cache_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ExportError) as info:
        tk.export(_gpt2(), _tokens(*EXAMPLE)["input_ids"], tmp_path / "gpt2.pt2", kwargs={"use_cache": True})
    text = str(info.value)
    assert "returns a DynamicCache" in text and "use_cache=False" in text and "the default" in text
    assert "Python branch" not in text and list(tmp_path.iterdir()) == []


def test_the_defaults_can_be_overridden(tmp_path: Path) -> None:
    model = _gpt2()
    ids = _tokens(*EXAMPLE)["input_ids"]
    static = tk.export(model, ids, tmp_path / "static.pt2", dynamic_batch=False)
    assert static.verified and static.dynamic_axes == {} and len(static.checks) == 1
    assert not any("dynamic axes" in d for d in static.defaults) and any("use_cache" in d for d in static.defaults)
    batch_only = tk.export(model, ids, tmp_path / "batch.pt2", dynamic_axes={"input_ids": {0: "batch"}})
    assert batch_only.verified and batch_only.checks[1].shapes == {"input_ids": [4, 12]}


def test_a_plain_model_never_imports_transformers(tmp_path: Path) -> None:
    code = (
        "import sys, torch, torchkeep as tk\n"
        f"r = tk.export(torch.nn.Linear(3, 2), torch.randn(2, 3), {str(tmp_path / 'm.pt2')!r})\n"
        "print(r.verified, r.defaults, 'transformers' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(tk.__file__).parent.parent)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True", "[]", "False"]

"""PEFT adapters: files peft saves load strictly with load_into, and adapters saved by torchkeep load back.

Real peft on tiny transformers models built from configs (nothing is downloaded): a LoRA adapter
trained for a few optimiser steps, saved, and loaded into a fresh PEFT model of the same config
gives bitwise the trained model's outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import torchkeep as tk
from torchkeep import adapters
from torchkeep.errors import InvalidArgumentError, KeyMismatchError, TooFewMatchesError

peft = pytest.importorskip("peft", reason="pip install 'torchkeep[peft]'")
transformers = pytest.importorskip("transformers", reason="pip install 'torchkeep[transformers]'")


def llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)  # the same base weights every time, as from_pretrained would give
    return transformers.LlamaForCausalLM(cfg)


def gpt2() -> torch.nn.Module:
    cfg = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


BASES: dict[str, tuple[Callable[[], torch.nn.Module], dict[str, Any]]] = {
    # LoRA on two projections, and a trained copy of the head (modules_to_save)
    "llama": (llama, {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}),
    # GPT-2's Conv1D attention (fan_in_fan_out), tied embeddings
    "gpt2": (gpt2, {"target_modules": ["c_attn"], "fan_in_fan_out": True}),
}
TOKENS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


def peft_model(kind: str = "llama", seed: int = 1) -> torch.nn.Module:
    build, extra = BASES[kind]
    torch.manual_seed(seed)  # the adapter's own initialisation differs from one model to the next
    return peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **extra))


def train(model: torch.nn.Module, steps: int = 3) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(input_ids=TOKENS, labels=TOKENS).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


@pytest.fixture(scope="module", params=list(BASES))
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, Path]:
    """(kind, a trained PEFT model, the folder peft's save_pretrained wrote)."""
    model = peft_model(request.param)
    train(model)
    folder = tmp_path_factory.mktemp(request.param) / "adapter"
    model.save_pretrained(folder)
    return request.param, model, folder


def test_a_peft_saved_adapter_loads_strictly_and_computes_bit_for_bit(trained: tuple[str, Any, Path]) -> None:
    kind, model, folder = trained
    names = load_file(str(folder / "adapter_model.safetensors"))
    assert names and all(".default." not in k for k in names)  # peft's names: no adapter name in them
    for source in (folder, folder / "adapter_model.safetensors"):
        fresh = peft_model(kind, seed=2)
        assert not torch.equal(logits(fresh), logits(model))
        report = tk.load_into(fresh, source)  # strict by default
        assert report.ok and report.missing == [] and report.unexpected == []
        assert report.adapter == "default" and report.mapped == len(names) == len(report.matched)
        assert report.kept and all("lora_" not in k and "modules_to_save" not in k for k in report.kept)
        assert f"mapped {len(names)} adapter tensors to adapter 'default'" in str(report)
        assert report.to_dict()["adapter"] == "default"
        assert torch.equal(logits(fresh), logits(model))


def test_a_strict_load_demands_every_adapter_tensor(trained: tuple[str, Any, Path], tmp_path: Path) -> None:
    kind, _, folder = trained
    names = load_file(str(folder / "adapter_model.safetensors"))
    dropped = sorted(k for k in names if "lora_B" in k)[0]
    save_file({k: v for k, v in names.items() if k != dropped}, str(tmp_path / "adapter_model.safetensors"))
    fresh = peft_model(kind, seed=2)
    before = logits(fresh)
    with pytest.raises(KeyMismatchError) as info:
        tk.load_into(fresh, tmp_path / "adapter_model.safetensors")
    want = dropped.replace("lora_B.weight", "lora_B.default.weight")
    assert info.value.missing == [want] and info.value.unexpected == []  # only the adapter's tensor, no base one
    assert torch.equal(logits(fresh), before)  # nothing loaded
    fix = str(info.value).split("fix: ")[1]
    assert fix.startswith("pass strict=False to load")
    report = tk.load_into(fresh, tmp_path / "adapter_model.safetensors", strict=False)
    assert report.missing == [want] and report.mapped == len(names) - 1


def test_an_adapter_into_a_model_without_one_says_to_wrap_it_and_that_passes(trained: tuple[str, Any, Path]) -> None:
    """The issue's case the other way round: load_into used to offer strict=False, which loaded nothing."""
    kind, model, folder = trained
    base = BASES[kind][0]()
    with pytest.raises(KeyMismatchError) as strict:
        tk.load_into(base, folder)
    with pytest.raises(TooFewMatchesError) as loose:
        tk.load_into(base, folder, strict=False)
    for err in (strict.value, loose.value):
        assert "PEFT adapter weights" in str(err) and "strict=False" not in str(err).split("fix:")[1]
    advice = str(strict.value).split("model = ", 1)[1].split(", then load again")[0]
    assert advice == f"peft.get_peft_model(model, peft.PeftConfig.from_pretrained({str(folder)!r}))"
    wrapped = eval(advice, {"peft": peft, "model": base})  # the advice, as written
    assert tk.load_into(wrapped, folder).ok
    assert torch.equal(logits(wrapped), logits(model))


def test_names_without_peft_prefix_and_other_adapters(trained: tuple[str, Any, Path], tmp_path: Path) -> None:
    kind, model, folder = trained
    names = load_file(str(folder / "adapter_model.safetensors"))
    # a file written for a model that holds the adapter itself (transformers' add_adapter): no base_model.model.
    bare = {k.removeprefix("base_model.model."): v for k, v in names.items()}
    save_file(bare, str(tmp_path / "bare.safetensors"))
    fresh = peft_model(kind, seed=2)
    assert tk.load_into(fresh, tmp_path / "bare.safetensors").ok
    assert torch.equal(logits(fresh), logits(model))
    # a model with two adapters: the active one by default, another by name
    two = peft_model(kind, seed=2)
    two.add_adapter("other", peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **BASES[kind][1]))
    assert tk.load_into(two, folder).adapter == "default"
    report = tk.load_into(two, folder, adapter="other")
    assert report.adapter == "other" and all(".other." in k or "modules_to_save" in k for k in report.matched)
    two.set_adapter("other")
    assert torch.equal(logits(two), logits(model))
    with pytest.raises(InvalidArgumentError, match=r"adapter='nope': the model's adapters are \['default', 'other'\]"):
        tk.load_into(two, folder, adapter="nope")


def test_a_whole_peft_model_state_dict_is_loaded_strictly_in_full(trained: tuple[str, Any, Path]) -> None:
    """A checkpoint that holds base weights is not an adapter file: every tensor is demanded."""
    kind, model, _ = trained
    full = model.state_dict()
    fresh = peft_model(kind, seed=2)
    report = tk.load_into(fresh, full)
    assert report.ok and report.kept == [] and report.adapter == "" and torch.equal(logits(fresh), logits(model))
    base_key = next(k for k in full if ".base_layer." in k)
    with pytest.raises(KeyMismatchError) as info:
        tk.load_into(peft_model(kind, seed=2), {k: v for k, v in full.items() if k != base_key})
    assert info.value.missing == [base_key]


def test_the_fallback_names_are_peft_names(trained: tuple[str, Any, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Without peft's own mapping, the documented fallback finds the same names, and the load is the same."""
    kind, model, folder = trained
    keys = list(model.state_dict())
    by_peft = adapters.find(model, keys)
    monkeypatch.setattr(adapters, "_by_peft", lambda *args: None)
    by_names = adapters.find(model, keys)
    assert by_peft is not None and by_names is not None
    assert (by_peft.via, by_names.via) == ("peft", "names")
    assert by_names.names == by_peft.names and by_names.required == by_peft.required
    fresh = peft_model(kind, seed=2)
    assert tk.load_into(fresh, folder).ok and torch.equal(logits(fresh), logits(model))


def test_a_module_named_like_peft_loads_without_peft() -> None:
    """The fallback alone: a plain module whose layers are named as peft names them."""

    class Lora(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base_layer = torch.nn.Linear(4, 4)
            self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(4, 2, bias=False)})
            self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(2, 4, bias=False)})

    model = torch.nn.Sequential(Lora())
    saved = {"0.lora_A.weight": torch.ones(2, 4), "0.lora_B.weight": torch.full((4, 2), 2.0)}
    report = tk.load_into(model, saved)
    assert report.ok and report.mapped == 2 and report.kept == ["0.base_layer.bias", "0.base_layer.weight"]
    assert torch.equal(model[0].lora_B["default"].weight, saved["0.lora_B.weight"])


# -- saved with torchkeep ------------------------------------------------------------------------------------


def test_save_adapter_round_trip_and_peft_reads_it(trained: tuple[str, Any, Path], tmp_path: Path) -> None:
    from torchkeep.integrations.peft import save_adapter

    kind, model, folder = trained
    path = save_adapter(model, tmp_path / "ours", metadata={"step": 3})
    assert sorted(os.listdir(tmp_path / "ours")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert tk.verify(path)["ok"] and tk.verify(path)["checksums"] and tk.inspect(path)["metadata"]["step"] == 3
    # the same names as peft's file, and the same config
    assert set(load_file(str(path))) == set(load_file(str(folder / "adapter_model.safetensors")))

    def config_of(p: Path) -> dict:
        cfg = json.loads(p.read_text())
        if isinstance(cfg.get("target_modules"), list):  # peft keeps a set: its order means nothing
            cfg["target_modules"] = sorted(cfg["target_modules"])
        return cfg

    assert config_of(tmp_path / "ours" / "adapter_config.json") == config_of(folder / "adapter_config.json")
    fresh = peft_model(kind, seed=2)
    report = tk.load_into(fresh, tmp_path / "ours")
    assert report.ok and report.adapter == "default" and torch.equal(logits(fresh), logits(model))
    by_peft = peft.PeftModel.from_pretrained(BASES[kind][0](), str(tmp_path / "ours"))
    assert torch.equal(logits(by_peft), logits(model))


def test_adapter_and_optimizer_checkpoint_resumes_training_exactly(tmp_path: Path) -> None:
    """Only the adapter (and the optimizer over it) in a training checkpoint: restore, train on, same weights."""
    from torchkeep.integrations.peft import adapter_state

    model = peft_model("llama")
    opt = train(model, steps=2)
    path = tk.save({"adapter": adapter_state(model), "optimizer": opt, "step": 2}, tmp_path / "ckpt.safetensors")
    assert all("lora" in k or "lm_head" in k for k in tk.load(path)["adapter"])  # no base weight in the file
    fresh = peft_model("llama", seed=2)
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    assert tk.restore(path, {"adapter": fresh, "optimizer": fresh_opt})["step"] == 2
    assert torch.equal(logits(fresh), logits(model))
    for m, o in ((model, opt), (fresh, fresh_opt)):
        m.train()
        m(input_ids=TOKENS, labels=TOKENS).loss.backward()
        o.step()
    assert torch.equal(logits(fresh), logits(model))
    assert tk.load_into(peft_model("llama", seed=3), path).adapter == "default"  # the "adapter" entry is found


def test_peft_stays_an_optional_lazy_import() -> None:
    """load_into never imports peft; without peft the integration imports and says what to install."""
    code = (
        "import sys, torch, torchkeep as tk\n"
        "tk.load_into(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).state_dict())\n"
        "assert 'peft' not in sys.modules, 'imported'\n"
        "sys.modules['peft'] = None\n"
        "from torchkeep.integrations.peft import save_adapter\n"
        "try:\n"
        "    save_adapter(torch.nn.Linear(2, 2), 'x')\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ImportError: torchkeep.integrations.peft needs peft: pip install 'torchkeep[peft]'" in r.stdout


def test_a_trainer_checkpoint_folder_of_a_peft_model_resolves_to_its_adapter(tmp_path) -> None:
    # what TorchkeepTrainer leaves in checkpoint-N/ for a PEFT model: the adapter beside the state file
    from torchkeep import kinds

    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    tk.save({"optimizer": {"state": {}}}, tmp_path / "torchkeep-state.safetensors")
    tk.save({"w": torch.ones(1)}, tmp_path / "adapter_model.safetensors")
    assert kinds.detect(tmp_path).file == tmp_path / "adapter_model.safetensors"

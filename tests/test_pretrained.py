"""Hugging Face model folders both ways: save_model -> from_pretrained, save_pretrained -> load_model,
convert(to="hf"), ties through every build path, and the warning on a tree saved where a model goes."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

import torchkeep as tk

transformers = pytest.importorskip("transformers", reason="pip install 'torchkeep[transformers]'")
transformers.logging.set_verbosity_error()


def _tiny(kind: str) -> torch.nn.Module:
    T = transformers
    torch.manual_seed(0)
    if kind == "gpt2":
        return T.GPT2LMHeadModel(
            T.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0)
        )
    if kind == "bert":
        return T.BertForMaskedLM(
            T.BertConfig(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100
            )
        )
    if kind == "llama":
        cfg = T.LlamaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=100,
            tie_word_embeddings=True,
        )
        return T.LlamaForCausalLM(cfg)
    assert kind == "t5"
    return T.T5ForConditionalGeneration(
        T.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=100, decoder_start_token_id=0)
    )


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    extra = {"decoder_input_ids": x} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        return model.eval()(x, **extra).logits


def _ties(model: torch.nn.Module) -> list[tuple[str, str]]:
    table = getattr(model, "all_tied_weights_keys", None) or {}
    return [(a, b) for a, b in table.items()]


X = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama", "t5"])
def test_save_model_folder_loads_in_from_pretrained_and_back(kind: str, tmp_path) -> None:
    model = _tiny(kind).eval()
    ref = _logits(model, X)
    out = tk.save_model(model, tmp_path / "hf", max_shard_size="40KB")
    assert (out / "config.json").is_file() and (out / "model.safetensors.index.json").is_file()
    assert json.loads((out / "config.json").read_text())["architectures"] == [type(model).__name__]

    theirs, info = type(model).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert torch.equal(_logits(theirs, X), ref)

    ours = tk.load_model(out)
    assert type(ours) is type(model) and not ours.training
    assert torch.equal(_logits(ours, X), ref)
    for a, b in _ties(model):
        assert ours.get_parameter(a) is ours.get_parameter(b), (a, b)
    report = tk.verify(out)  # every shard carries torchkeep checksums
    assert report["ok"] and report["checksums"] and report["shards"] > 1


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama", "t5"])
def test_save_pretrained_folder_loads_with_load_model(kind: str, tmp_path) -> None:
    model = _tiny(kind).eval()
    model.save_pretrained(tmp_path)
    ours = tk.load_model(tmp_path)
    assert torch.equal(_logits(ours, X), _logits(model, X))
    # the weights file itself, too
    assert torch.equal(_logits(tk.load_model(tmp_path / "model.safetensors"), X), _logits(model, X))


def test_single_file_save_model_of_a_transformers_model(tmp_path) -> None:
    model = _tiny("gpt2").train()
    path = tk.save_model(model, tmp_path / "gpt2.safetensors")
    back = tk.load_model(path)
    assert type(back) is type(model) and back.training
    assert back.lm_head.weight is back.transformer.wte.weight
    assert torch.equal(_logits(back, X), _logits(model, X))


def test_registered_subclass_round_trips_through_the_folder(tmp_path) -> None:
    @tk.register_model("test-pretrained-gpt2-sub")
    class MyGPT(transformers.GPT2LMHeadModel):
        pass

    model = MyGPT(_tiny("gpt2").config).eval()
    out = tk.save_model(model, tmp_path / "sub")
    back = tk.load_model(out)
    assert type(back) is MyGPT and back.lm_head.weight is back.transformer.wte.weight
    assert torch.equal(_logits(back, X), _logits(model, X))


def test_unknown_architecture_is_refused_without_running_remote_code(tmp_path) -> None:
    model = _tiny("gpt2")
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["SomeRemoteModel"]
    cfg["auto_map"] = {"AutoModel": "modeling_remote.SomeRemoteModel"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "modeling_remote.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(tk.errors.UnknownModelError, match="trust_remote_code"):
        tk.load_model(tmp_path)


class TiedLM(torch.nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 4) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x))


tk.register_model("test-pretrained-tied-lm")(TiedLM)


class TiedWithBuffer(TiedLM):
    """Not buildable on the meta device (a non-persistent buffer): the plain build path."""

    def __init__(self, vocab: int = 11, dim: int = 4) -> None:
        super().__init__(vocab, dim)
        self.register_buffer("scale", torch.ones(1), persistent=False)


tk.register_model("test-pretrained-tied-buffer")(TiedWithBuffer)


@pytest.mark.parametrize("cls", [TiedLM, TiedWithBuffer], ids=["meta-build", "plain-build"])
@pytest.mark.parametrize("layout", ["file", "folder"])
def test_ties_survive_every_load_model_path(cls: type, layout: str, tmp_path) -> None:
    model = cls()
    path = tk.save_model(model, tmp_path / "m.safetensors" if layout == "file" else tmp_path / "m")
    back = tk.load_model(path)
    assert back.head.weight is back.emb.weight
    opt = torch.optim.SGD(back.parameters(), lr=0.5)
    back(torch.arange(5)).sum().backward()
    opt.step()
    assert back.head.weight is back.emb.weight and torch.equal(back.head.weight, back.emb.weight)
    assert not torch.equal(back.emb.weight, model.emb.weight)  # the step changed the one shared weight


def test_convert_training_checkpoint_to_a_from_pretrained_folder(tmp_path) -> None:
    model = _tiny("gpt2")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(X, labels=X).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with tk.CheckpointManager(tmp_path / "run") as mgr:
        ckpt = mgr.save({"model": model, "optimizer": opt, "step": 2}, step=2).path
    # config=: a config object; its architectures is unset, so the class is found from the weights' names
    assert model.config.architectures is None
    out = tk.convert(ckpt, tmp_path / "hf", to="hf", config=model.config)
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(theirs) is type(model) and torch.equal(_logits(theirs, X), _logits(model, X))


def test_convert_to_hf_takes_the_config_from_the_tree_or_says_what_to_pass(tmp_path) -> None:
    model = _tiny("bert").eval()
    cfg = model.config.to_dict()
    with_cfg = tk.save({"model": model, "config": cfg}, tmp_path / "a.safetensors")
    out = tk.convert(with_cfg, tmp_path / "hf", to="hf")
    assert torch.equal(_logits(transformers.BertForMaskedLM.from_pretrained(out), X), _logits(model, X))
    bare = tk.save({"model": model}, tmp_path / "b.safetensors")
    with pytest.raises(tk.errors.ConversionError, match="config="):
        tk.convert(bare, tmp_path / "hf2", to="hf")
    with pytest.raises(tk.errors.ConversionError, match="holds the input"):
        tk.convert(tmp_path / "hf" / "model.safetensors", tmp_path / "hf", to="hf", config=cfg)


def test_cli_convert_to_hf(tmp_path) -> None:
    from typer.testing import CliRunner

    from torchkeep.cli import app

    model = _tiny("gpt2").eval()
    model.config.save_pretrained(tmp_path / "base")
    ckpt = tk.save({"model": model, "epoch": 1}, tmp_path / "c.safetensors")
    r = CliRunner().invoke(
        app, ["convert", str(ckpt), str(tmp_path / "out"), "--to", "hf", "--config", str(tmp_path / "base")]
    )
    assert r.exit_code == 0, r.output
    assert torch.equal(_logits(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out"), X), _logits(model, X))
    r = CliRunner().invoke(app, ["convert", str(ckpt), str(tmp_path / "out2"), "--to", "hf"])
    assert r.exit_code == 2 and "--config" in r.output and "Traceback" not in r.output


def test_saving_a_tree_where_from_pretrained_looks_warns(tmp_path) -> None:
    model = _tiny("gpt2")
    with pytest.warns(UserWarning, match="save_model"):
        tk.save({"model": model}, tmp_path / "model.safetensors")
    model.config.save_pretrained(tmp_path / "folder")
    with pytest.warns(UserWarning, match="'model/'"):
        tk.save({"model": model, "step": 3}, tmp_path / "folder" / "ckpt.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tk.save(model.state_dict(), tmp_path / "flat" / "model.safetensors")  # flat names: fine
        tk.save({"model": model}, tmp_path / "elsewhere" / "ckpt.safetensors")


diffusers = None
try:  # optional: the same folder layout for diffusers models
    import diffusers
except ImportError:
    pass


@pytest.mark.skipif(diffusers is None, reason="pip install 'torchkeep[diffusers]'")
def test_diffusers_model_both_ways(tmp_path) -> None:
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([3])
    with torch.no_grad():
        ref = unet(x, t).sample
    out = tk.save_model(unet, tmp_path / "unet")
    assert (out / "diffusion_pytorch_model.safetensors").is_file()
    with torch.no_grad():
        assert torch.equal(diffusers.UNet2DModel.from_pretrained(out)(x, t).sample, ref)
        assert torch.equal(tk.load_model(out)(x, t).sample, ref)
    unet.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        assert torch.equal(tk.load_model(tmp_path / "theirs")(x, t).sample, ref)
    assert os.path.isfile(tmp_path / "theirs" / "config.json")

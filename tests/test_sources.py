"""Finding the weights: checkpoint layouts, ambiguity and key=, shards, legacy and safetensors files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import torchkeep as tk
from torchkeep.errors import (
    AmbiguousCheckpointError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    KeyMismatchError,
    MissingShardError,
    TorchkeepError,
)
from torchkeep.loading import load_into
from torchkeep.sources import LazyTensor, candidates, lookup, open_source

FIXTURES = Path(__file__).parent / "fixtures" / "legacy"


class Small(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layer = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)


def same(a: nn.Module, b: nn.Module) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def test_lightning_style_checkpoint(tmp_path: Path) -> None:
    src = Small(1)
    ckpt = {
        "epoch": 3,
        "global_step": 120,
        "state_dict": {"model." + k: v for k, v in src.state_dict().items()},
        "optimizer_states": [torch.optim.Adam(src.parameters()).state_dict()],
        "hyper_parameters": {"lr": 0.001},
    }
    torch.save(ckpt, tmp_path / "epoch=3.ckpt")
    model = Small(2)
    report = load_into(model, tmp_path / "epoch=3.ckpt")
    assert report.ok and report.key == "state_dict" and report.renamed == [("model.", "", 4)]
    assert same(model, src)


def test_guide_style_checkpoint_with_optimizer_state(tmp_path: Path) -> None:
    src = Small(1)
    opt = torch.optim.Adam(src.parameters())
    src.layer(torch.randn(2, 4)).sum().backward()
    opt.step()  # the optimizer state now holds string-keyed dicts of tensors per parameter
    torch.save(
        {"epoch": 5, "model_state_dict": src.state_dict(), "optimizer_state_dict": opt.state_dict(), "loss": 0.25},
        tmp_path / "model.pth.tar",
    )
    model = Small(2)
    report = load_into(model, tmp_path / "model.pth.tar")
    assert report.ok and report.key == "model_state_dict" and same(model, src)


def test_torchkeep_tree_with_model_key_and_lazy_tensors(tmp_path: Path) -> None:
    src = Small(1)
    p = tk.save({"model": src, "optimizer": torch.optim.SGD(src.parameters(), lr=0.1), "epoch": 2}, tmp_path / "c")
    with open_source(p) as s:
        assert isinstance(s.tree["model"]["layer.weight"], LazyTensor)
        assert s.tree["epoch"] == 2 and sorted(candidates(s.tree)) == ["model"]
    model = Small(2)
    assert load_into(model, p).key == "model" and same(model, src)


def test_bare_state_dict_files_torch_and_safetensors(tmp_path: Path) -> None:
    src = Small(1)
    torch.save(src.state_dict(), tmp_path / "w.bin")
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    os.replace(tmp_path / "w.bin", tmp_path / "misnamed.safetensors")  # detected by content
    for name in ("misnamed.safetensors", "w.safetensors"):
        model = Small(2)
        report = load_into(model, tmp_path / name)
        assert report.ok and report.key == "" and same(model, src), name


def test_legacy_non_zip_fixture(tmp_path: Path) -> None:
    lin = nn.Linear(4, 3)
    report = load_into(lin, FIXTURES / "nonzip.pt", strict=False)
    assert report.key == "model" and report.unexpected == ["tied"]
    assert torch.equal(lin.weight, torch.arange(12, dtype=torch.float32).reshape(3, 4) / 8)


def test_ambiguous_candidates_listed_and_key_picks_one(tmp_path: Path) -> None:
    a, b = Small(1), Small(3)
    p = tk.save({"model": a, "ema": b, "epoch": 1}, tmp_path / "c.safetensors")
    model = Small(2)
    before = model.layer.weight.clone()
    with pytest.raises(AmbiguousCheckpointError) as e:
        load_into(model, p)
    assert isinstance(e.value, KeyError) and isinstance(e.value, TorchkeepError)
    assert e.value.candidates == ["ema", "model"] and "key=" in str(e.value)
    assert torch.equal(model.layer.weight, before)
    assert load_into(model, p, key="ema").key == "ema" and same(model, b)
    assert load_into(model, p, key="model").key == "model" and same(model, a)


def test_unique_best_match_is_not_ambiguous() -> None:
    src = Small(1)
    tree = {"model": src.state_dict(), "discriminator": nn.Linear(2, 2).state_dict()}
    model = Small(2)
    assert load_into(model, tree).key == "model" and same(model, src)
    # the best fit wins even under an unusual name
    tree = {"generator": src.state_dict(), "discriminator": nn.Linear(2, 2).state_dict()}
    assert load_into(Small(2), tree).key == "generator"


def test_nested_key_and_bad_key() -> None:
    src = Small(1)
    tree = {"ckpt": {"weights": {"student": src.state_dict(), "teacher": Small(5).state_dict()}}}
    assert lookup(tree, "ckpt.weights.student") is tree["ckpt"]["weights"]["student"]
    model = Small(2)
    assert load_into(model, tree, key="ckpt.weights.student").key == "ckpt.weights.student"
    assert same(model, src)
    with pytest.raises(KeyMismatchError) as e:
        load_into(model, tree, key="ckpt.nope")
    assert "ckpt.weights.student" in str(e.value)


def test_no_state_dict_found() -> None:
    with pytest.raises(KeyMismatchError) as e:
        load_into(Small(), {"epoch": 1, "names": ["a"]})
    assert "found no state dict" in str(e.value) and "epoch" in str(e.value)


def test_module_and_stateful_tree_in_memory() -> None:
    src = Small(1)
    model = Small(2)
    assert load_into(model, src).ok and same(model, src)
    model = Small(2)
    assert load_into(model, {"model": src, "step": 3}).key == "model" and same(model, src)


def write_shards(tmp_path: Path, sd: dict[str, torch.Tensor], names: str = "model") -> Path:
    keys = list(sd)
    half = len(keys) // 2
    shards = {f"{names}-00001-of-00002.safetensors": keys[:half], f"{names}-00002-of-00002.safetensors": keys[half:]}
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: sd[k].contiguous() for k in ks}, str(tmp_path / fname))
        weight_map.update(dict.fromkeys(ks, fname))
    index = tmp_path / f"{names}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def test_sharded_hf_directory_and_index_path(tmp_path: Path) -> None:
    src = Small(1)
    index = write_shards(tmp_path, src.state_dict())
    for source in (tmp_path, index):
        model = Small(2)
        report = load_into(model, source)
        assert report.ok and report.source == str(index) and same(model, src)


def test_sharded_missing_shard_named(tmp_path: Path) -> None:
    index = write_shards(tmp_path, Small(1).state_dict())
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    model = Small(2)
    before = model.layer.weight.clone()
    with pytest.raises(MissingShardError) as e:
        load_into(model, tmp_path)
    assert isinstance(e.value, FileNotFoundError)
    assert e.value.missing == ["model-00002-of-00002.safetensors"] and "model-00002-of-00002" in str(e.value)
    assert e.value.index == str(index) and torch.equal(model.layer.weight, before)


def test_sharded_index_inconsistent_with_shard(tmp_path: Path) -> None:
    index = write_shards(tmp_path, Small(1).state_dict())
    data = json.loads(index.read_text())
    data["weight_map"]["extra.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(KeyMismatchError) as e:
        load_into(Small(2), index)
    assert "extra.weight" in str(e.value)
    data["weight_map"]["extra.weight"] = "../outside.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CorruptCheckpointError):
        load_into(Small(2), index)


def test_directory_without_index(tmp_path: Path) -> None:
    # an empty directory is not a damaged checkpoint: a typed "nothing to load here" (still a ValueError)
    with pytest.raises(tk.errors.UnsupportedSourceError, match="holds no checkpoint") as err:
        load_into(Small(), tmp_path)
    assert isinstance(err.value, ValueError)
    src = Small(1)
    save_file(src.state_dict(), str(tmp_path / "model.safetensors"))
    model = Small(2)
    assert load_into(model, tmp_path).ok and same(model, src)


def test_corrupt_file_detected_before_any_copy(tmp_path: Path) -> None:
    src = Small(1)
    p = tk.save({"model": src}, tmp_path / "c.safetensors")
    raw = bytearray(p.read_bytes())
    raw[-3] ^= 0x01  # a bit in the last tensor's data
    p.write_bytes(bytes(raw))
    model = Small(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ChecksumMismatchError):
        load_into(model, p)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert load_into(model, p, verify=False).matched  # at the user's own risk


def test_missing_path() -> None:
    with pytest.raises(FileNotFoundError):
        load_into(Small(), "/nonexistent/ckpt.pt")
    with pytest.raises(TypeError):
        load_into(Small(), 42)


def test_only_the_needed_tensors_are_read_and_verified(tmp_path: Path) -> None:
    src = Small(1)
    p = tk.save({"model": src, "other": {"big": torch.ones(1000)}}, tmp_path / "c.safetensors")
    with tk.open(p) as ck:
        spec, base = ck.spec("other/big"), ck.header.size
    raw = bytearray(p.read_bytes())
    raw[base + spec.start + 5] ^= 0x10  # damage a tensor the model does not need
    p.write_bytes(bytes(raw))
    with pytest.raises(ChecksumMismatchError):
        tk.load(p)
    model = Small(2)
    assert load_into(model, p).ok and same(model, src)

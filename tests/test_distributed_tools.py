"""convert / inspect / verify on torchkeep distributed checkpoint directories, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import torchkeep as tk
import torchkeep.distributed as tkd
from torchkeep.cli import app
from torchkeep.convert import convert

pytestmark = pytest.mark.timeout(60)


def _saved(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = {"model": model, "optimizer": opt, "epoch": 3, "rng": tk.RNGState()}
    return tkd.save(state, tmp_path / "ck", metadata={"run": "a"}), model


def test_convert_gathers_into_one_torchkeep_file_and_back(tmp_path: Path) -> None:
    path, model = _saved(tmp_path)
    out = convert(path, tmp_path / "model.safetensors")
    tree = tk.load(out)
    assert tree["epoch"] == 3 and tk.open(out).metadata == {"run": "a"}
    assert set(tree["rng"]) >= {"python", "numpy", "torch"}  # rank 0's entry
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    assert tk.load_into(fresh, tree["model"]).ok
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    adam = tree["optimizer"]["state"]["0.weight"]
    assert adam["exp_avg"].shape == (8, 4) and adam["exp_avg"].any() and float(adam["step"]) == 1.0
    plain = convert(path, tmp_path / "weights.safetensors", to="safetensors")
    assert sorted(tk.load(plain)) == sorted(model.state_dict())
    back = convert(out, tmp_path / "again", to="distributed")
    again = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    assert tkd.restore(back, {"model": again}, strict=False)["epoch"] == 3
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


def test_inspect_and_verify(tmp_path: Path) -> None:
    path, model = _saved(tmp_path)
    info = tk.inspect(path)
    assert info["format"] == "torchkeep-dcp/1" and info["world_size"] == 1
    nodes = {n["name"]: n for n in info["tree"]}
    assert nodes["model"]["kind"] == "sharded" and nodes["model"]["elements"] == sum(
        p.numel() for p in model.parameters()
    )
    assert nodes["epoch"]["value"] == 3 and info["metadata"] == {"run": "a"}
    # parameters are the model's tensors only, not the optimizer state beside them
    assert info["parameters"] == sum(p.numel() for p in model.parameters()) < info["elements"]
    assert nodes["rng"]["kind"] == "per rank" and "1 rank file" in nodes["rng"]["value"]
    ok = tk.verify(path)
    assert ok["ok"] and ok["checksums"] and ok["bytes_checked"] > 0
    data = path / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0x10
    data.write_bytes(bytes(raw))
    bad = tk.verify(path)
    assert not bad["ok"] and bad["key"] == "__0_0.distcp"


def test_cli_inspect_and_verify(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    runner = CliRunner()
    shown = runner.invoke(app, ["inspect", str(path)])
    assert shown.exit_code == 0, shown.output
    assert "torchkeep-dcp/1" in shown.output and "saved on 1 rank(s)" in shown.output
    assert "rng  one per rank" in shown.output
    result = runner.invoke(app, ["verify", str(path), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["ok"] is True
    (path / "tree.safetensors").write_bytes(b"x")
    result = runner.invoke(app, ["verify", str(path), "--json"])
    assert result.exit_code == 2 and "the manifest says" in json.loads(result.output)["error"]

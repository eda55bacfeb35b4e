"""inspect of a torch.save file shows keys, dtypes and shapes without unpickling anything."""

from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import torchkeep as tk
from torchkeep.cli import app
from torchkeep.pickle_view import view


def _leaves(nodes: list[dict], prefix: str = "") -> dict[str, tuple[str, list[int]]]:
    out = {}
    for n in nodes:
        name = f"{prefix}{n['name']}"
        if n["kind"] == "tensor":
            out[name] = (n["dtype"], n["shape"])
        out.update(_leaves(n.get("children", []), f"{name}/"))
    return out


def test_a_training_checkpoint_shows_every_key_dtype_and_shape(tmp_path: Path, monkeypatch) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    p = tmp_path / "old.pth"
    torch.save(
        {
            "epoch": 7,
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": opt.state_dict(),
            "half": torch.zeros(2, 5, dtype=torch.bfloat16),
            "args": argparse.Namespace(lr=0.1),
        },
        p,
    )

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("inspect unpickled a legacy file")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    info = tk.inspect(p)
    leaves = _leaves(info["tree"])
    assert leaves["model_state_dict/0/weight"] == ("float32", [4, 3])
    assert leaves["model_state_dict/1/num_batches_tracked"] == ("int64", [])
    assert leaves["half"] == ("bfloat16", [2, 5])
    assert info["tensors"] == 7 + 12 + 1 and info["parameters"] == 33
    assert info["dtypes"]["bfloat16"] == {"tensors": 1, "elements": 10, "bytes": 20}
    top = {n["name"]: n for n in info["tree"]}
    assert top["epoch"]["value"] == 7 and top["model_state_dict"]["kind"] == "module"
    assert top["args"]["class"] == "argparse.Namespace"


def test_a_pickled_whole_model_shows_its_weights_and_a_working_conversion(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    p = tmp_path / "full.pth"
    torch.save(model, p)
    info = tk.inspect(p)
    assert _leaves(info["tree"])["(root)/2/weight"] == ("float32", [2, 4])
    assert "--trust-pickle" in info["hint"] and "Sequential" in info["hint"]
    # the line the hint suggests works as printed
    line = info["hint"][info["hint"].index("torchkeep convert ") :].split()
    result = CliRunner().invoke(app, line[1:])
    assert result.exit_code == 0, result.output
    assert torch.equal(tk.load(p.with_suffix(".safetensors"))["2.weight"], model[2].weight)


def test_a_pickle_that_would_run_code_is_only_read(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    p = tmp_path / "evil.pth"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"w": 1, "payload": Evil()}, protocol=2))
    skeleton, specs = view(p)
    assert not marker.exists() and specs == {}
    assert skeleton["d"]["w"] == 1 and skeleton["d"]["payload"]["S"] in ("posix.system", "os.system")
    r = CliRunner().invoke(app, ["inspect", str(p)])
    assert r.exit_code == 0 and "payload" in r.stdout and not marker.exists()


@pytest.mark.parametrize("data", [b"\x80\x02}q\x00(X", b"not a pickle", pickle.dumps([[]] * 3)[:-1]])
def test_damaged_or_foreign_pickles_fall_back_to_counting_storages(tmp_path: Path, data: bytes) -> None:
    p = tmp_path / "bad.pth"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("bad/data.pkl", data)
        z.writestr("bad/data/0", b"\0" * 8)
    assert view(p) is None
    info = tk.inspect(p)
    assert info["storages"] == 1 and "tree" not in info


def test_a_memo_bomb_is_bounded(tmp_path: Path) -> None:
    # each level lists the previous one twice: 2**40 leaves if expanded naively
    body = b"\x80\x02]q\x00"  # PROTO 2, EMPTY_LIST, BINPUT 0
    for i in range(40):
        body += b"(h" + bytes([i]) + b"h" + bytes([i]) + b"lq" + bytes([i + 1])  # MARK GET GET LIST PUT
    body += b"."
    assert len(pickle.loads(body)) == 2  # a valid pickle (plain lists: safe to load here)
    p = tmp_path / "bomb.pth"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("bomb/data.pkl", body)
    assert view(p) is None

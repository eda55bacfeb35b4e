"""diff: keys, shapes, dtypes, values and scalars between two checkpoints; streaming; the CLI."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import torchkeep as tk
import torchkeep.api
import torchkeep.reader
from torchkeep.cli import app
from torchkeep.convert import convert
from torchkeep.diff import DiffReport, diff
from torchkeep.errors import CheckpointNotFoundError, ChecksumMismatchError

runner = CliRunner()


def _tree(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    return {"model": model.state_dict(), "epoch": 3, "config": {"lr": 0.1, "name": "run"}, "step": torch.tensor(7)}


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, dict]:
    tree = _tree()
    a = tk.save(tree, tmp_path / "a.safetensors")
    b = tk.save(tree, tmp_path / "b.safetensors")
    return a, b, tree


def test_identical_files(pair) -> None:
    a, b, _ = pair
    r = diff(a, b)
    assert r.identical
    assert r.equal == 5 and r.close == 0 and r.equal_leaves == 3
    assert not (r.only_a or r.only_b or r.value_changed or r.shape_changed or r.dtype_changed or r.leaf_changed)
    assert "identical" in str(r)
    assert r.to_dict()["identical"] is True


def test_one_changed_tensor_is_named_with_its_max_abs(tmp_path: Path, pair) -> None:
    a, _, tree = pair
    changed = _tree()
    w = changed["model"]["0.weight"].clone()
    w[1, 2] += 0.25
    w[0, 0] -= 0.125
    changed["model"]["0.weight"] = w
    b = tk.save(changed, tmp_path / "b2.safetensors")
    r = diff(a, b)
    assert not r.identical
    assert [v.name for v in r.value_changed] == ["model/0.weight"]
    v = r.value_changed[0]
    orig = tree["model"]["0.weight"].double()
    assert v.max_abs == pytest.approx(0.25, rel=1e-6)
    expected_rel = (w.double() - orig).norm().item() / orig.norm().item()
    assert v.rel_l2 == pytest.approx(expected_rel, rel=1e-6)
    assert r.equal == 4
    assert "model/0.weight" in str(r)
    # a tolerance above the change makes it "close", and the report identical
    loose = diff(a, b, atol=0.3)
    assert loose.identical and loose.close == 1 and loose.equal == 4


def test_added_removed_keys_and_changed_values(tmp_path: Path, pair) -> None:
    a, _, _ = pair
    other = _tree()
    del other["model"]["1.bias"]
    other["model"]["2.weight"] = torch.zeros(2)
    other["epoch"] = 4
    other["config"]["lr"] = 0.01
    del other["config"]["name"]
    other["best"] = 0.9
    b = tk.save(other, tmp_path / "o.safetensors")
    r = diff(a, b)
    assert r.only_a == ["config/name", "model/1.bias"]
    assert r.only_b == ["best", "model/2.weight"]
    assert sorted((c.name, c.value_a, c.value_b) for c in r.leaf_changed) == [("config/lr", 0.1, 0.01), ("epoch", 3, 4)]
    d = r.to_dict()
    assert d["only_a"] == ["config/name", "model/1.bias"] and d["leaf_changed"][0]["name"] == "config/lr"
    json.dumps(d)  # JSON-ready


def test_shape_and_dtype_changes(tmp_path: Path, pair) -> None:
    a, _, _ = pair
    other = _tree()
    other["model"]["1.weight"] = torch.zeros(5, 3)  # a new head
    other["model"]["0.bias"] = other["model"]["0.bias"].half()
    b = tk.save(other, tmp_path / "o.safetensors")
    r = diff(a, b)
    assert [(s.name, s.shape_a, s.shape_b) for s in r.shape_changed] == [("model/1.weight", (2, 3), (5, 3))]
    assert [tuple(x) for x in r.dtype_changed] == [("model/0.bias", "float32", "float16")]
    assert r.value_changed == [] and not r.identical


def test_nan_inf_and_negative_zero(tmp_path: Path) -> None:
    x = torch.tensor([1.0, math.nan, math.inf, 0.0])
    a = tk.save({"x": x}, tmp_path / "a.safetensors")
    b = tk.save({"x": torch.tensor([1.0, math.nan, math.inf, -0.0])}, tmp_path / "b.safetensors")
    r = diff(a, b)
    assert r.identical and r.close == 1  # -0.0 == 0.0, NaN where NaN, inf where inf
    c = tk.save({"x": torch.tensor([1.0, 2.0, math.inf, 0.0])}, tmp_path / "c.safetensors")
    r = diff(a, c)
    assert [v.name for v in r.value_changed] == ["x"] and math.isnan(r.value_changed[0].max_abs)
    assert r.to_dict()["value_changed"][0]["max_abs"] == "nan"


def test_torchkeep_vs_legacy_and_plain_safetensors(tmp_path: Path) -> None:
    tree = _tree()
    torch.save(tree, tmp_path / "old.pt")
    new = convert(tmp_path / "old.pt", tmp_path / "new.safetensors")
    assert diff(tmp_path / "old.pt", new).identical
    plain = tmp_path / "plain.safetensors"
    save_file(tree["model"], str(plain))
    weights = convert(new, tmp_path / "w.safetensors", to="safetensors")
    r = diff(plain, weights)
    assert r.identical and r.equal == 4
    sharded = convert(new, tmp_path / "sh" / "m.safetensors", max_shard_size=64)
    assert diff(new, sharded).identical


def test_tied_weights_show_under_both_names(tmp_path: Path) -> None:
    w = torch.randn(4, 3)
    a = tk.save({"emb": w, "head": w}, tmp_path / "a.safetensors")
    b = tk.save({"emb": w.clone(), "head": w.clone()}, tmp_path / "b.safetensors")
    r = diff(a, b)
    assert r.identical and r.equal == 2


def test_torchkeep_inputs_are_streamed_not_loaded(pair, monkeypatch) -> None:
    a, b, _ = pair

    def no_load(*args, **kwargs):
        raise AssertionError("diff must not load a whole torchkeep file")

    monkeypatch.setattr(torchkeep.api, "load", no_load)
    monkeypatch.setattr(tk, "load", no_load)
    monkeypatch.setattr(torchkeep.reader.Checkpoint, "tree", no_load)
    assert diff(a, b).identical


def test_memory_stays_bounded_on_two_48mb_files(tmp_path: Path, monkeypatch) -> None:
    """Tensors are read in batches and dropped: at any read, at most one batch per side is alive.

    (tracemalloc cannot see torch's allocator, so live tensor bytes are tracked with weakrefs.)"""
    import weakref

    diff_mod = importlib.import_module("torchkeep.diff")  # tk.diff, the function, shadows the module
    from torchkeep.reader import Checkpoint

    batch = 4 << 20
    monkeypatch.setattr(diff_mod, "_BATCH", batch)
    tensors = {f"layer{i}.weight": torch.full((1 << 20,), float(i)) for i in range(12)}  # 12 x 4 MiB = 48 MiB
    a = tk.save(tensors, tmp_path / "a.safetensors", durable=False)
    tensors["layer5.weight"][3] = -1.0
    b = tk.save(tensors, tmp_path / "b.safetensors", durable=False)
    del tensors
    live = [0]
    peaks: list[int] = []
    real_read = Checkpoint.read

    def tracked_read(self, keys=None):
        peaks.append(live[0])  # bytes still alive from earlier reads when a new read starts
        out = real_read(self, keys)
        for t in out.values():
            n = t.numel() * t.element_size()
            live[0] += n
            weakref.finalize(t, lambda n=n: live.__setitem__(0, live[0] - n))
        return out

    monkeypatch.setattr(Checkpoint, "read", tracked_read)
    r = diff(a, b)
    assert [v.name for v in r.value_changed] == ["layer5.weight"] and r.value_changed[0].max_abs == 6.0
    assert r.equal == 11
    assert len(peaks) == 24  # one read per batch per side
    assert max(peaks) <= batch  # at most A's current batch while B's is read; never the 96 MiB total


def test_missing_and_damaged_files(pair, tmp_path: Path) -> None:
    a, b, _ = pair
    with pytest.raises(CheckpointNotFoundError):
        diff(a, tmp_path / "nope.safetensors")
    with tk.open(b) as ck:
        spec = ck.header.tensors["model/0.weight"]
        off = ck.header.size + spec.start
    data = bytearray(b.read_bytes())
    data[off] ^= 1
    b.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError):
        diff(a, b)


def test_report_str_is_a_compact_table() -> None:
    r = DiffReport("a", "b", only_a=["x"], value_changed=[])
    text = str(r)
    assert text.splitlines()[:3] == ["A: a", "B: b", "different: 1 only in A; 0 tensors equal"]
    assert "only A" in text and "x" in text


# -- CLI ----------------------------------------------------------------------------------------------


def test_cli_exit_codes_and_json(pair, tmp_path: Path) -> None:
    a, b, _ = pair
    r = runner.invoke(app, ["diff", str(a), str(b)])
    assert r.exit_code == 0, r.output
    assert "identical" in r.output
    other = _tree()
    other["epoch"] = 9
    other["model"]["0.bias"] = other["model"]["0.bias"] + 1
    c = tk.save(other, tmp_path / "c.safetensors")
    r = runner.invoke(app, ["diff", str(a), str(c)])
    assert r.exit_code == 1
    assert "model/0.bias" in r.output and "epoch" in r.output
    r = runner.invoke(app, ["diff", str(a), str(c), "--json"])
    assert r.exit_code == 1
    d = json.loads(r.output)
    assert d["identical"] is False and d["value_changed"][0]["name"] == "model/0.bias"
    assert d["value_changed"][0]["max_abs"] == pytest.approx(1.0)
    assert d["leaf_changed"] == [{"name": "epoch", "a": 3, "b": 9}]
    r = runner.invoke(app, ["diff", str(a), str(c), "--atol", "2", "--json"])
    assert json.loads(r.output)["leaf_changed"] and r.exit_code == 1  # values still differ


def test_cli_tolerance_makes_it_identical(pair, tmp_path: Path) -> None:
    a, _, tree = pair
    tree["model"]["0.bias"] = tree["model"]["0.bias"] + 1e-7
    c = tk.save(tree, tmp_path / "c.safetensors")
    assert runner.invoke(app, ["diff", str(a), str(c)]).exit_code == 1
    assert runner.invoke(app, ["diff", str(a), str(c), "--atol", "1e-6"]).exit_code == 0


def test_cli_unreadable_is_exit_2(pair, tmp_path: Path) -> None:
    a, _, _ = pair
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    r = runner.invoke(app, ["diff", str(a), str(junk)])
    assert r.exit_code == 2 and "error" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["diff", str(a), str(tmp_path / "missing.safetensors")])
    assert r.exit_code == 2


# -- typed argument errors ---------------------------------------------------------------------


def test_bad_tolerances_are_typed_errors(tmp_path: Path) -> None:
    a = tk.save({"w": torch.zeros(2)}, tmp_path / "a.safetensors")
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"atol=-1\.0: pass a number >= 0") as info:
        diff(a, a, atol=-1.0)
    assert isinstance(info.value, ValueError)
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"rtol=nan"):
        diff(a, a, rtol=math.nan)
    with pytest.raises(tk.errors.ArgumentTypeError, match="rtol must be a number") as info:
        diff(a, a, rtol="1e-3")  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError)
    assert diff(a, a, rtol=1, atol=torch.tensor(0.5)).identical  # ints and 0-d tensors are numbers

"""Every verb on every kind of checkpoint: the right answer, or the typed error for that pair.

The kinds (detected by content, :mod:`torchkeep.kinds`): a torchkeep file, a plain safetensors
file, a sharded directory (Hugging Face layout, plain shards), a torchkeep shard index given by
its ``*.index.json``, a ``torch.save`` zip, a pre-1.6 ``torch.save`` pickle, a shard set of
``torch.save`` shards (``pytorch_model.bin.index.json``), a plain DCP directory and a
``torchkeep.distributed`` directory; every file is named ``.bin`` or without a suffix where the
kind allows, so nothing is decided by its name.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from typer.testing import CliRunner

import torchkeep as tk
import torchkeep.distributed as tkd
from torchkeep import kinds
from torchkeep.cli import app
from torchkeep.errors import TorchkeepError, UnsupportedSourceError

SEED = 0
N_TENSORS = 4  # two Linear layers: weight and bias each


def _model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))


def _plain_index(directory: Path, sd: dict[str, torch.Tensor], writer: Callable[[dict, Path], None], ext: str) -> None:
    """A Hugging Face style shard set: two shards and ``model.<ext>.index.json`` with a weight_map."""
    names = list(sd)
    groups = [names[:2], names[2:]]
    weight_map = {}
    for i, group in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-00002.{ext}"
        writer({n: sd[n].contiguous() for n in group}, directory / fname)
        weight_map.update(dict.fromkeys(group, fname))
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
        "weight_map": weight_map,
    }
    stem = "model.safetensors" if ext == "safetensors" else "pytorch_model.bin"
    (directory / f"{stem}.index.json").write_text(json.dumps(index))


def _build(kind: str, root: Path) -> tuple[Path, str]:
    """``(path, detected kind)`` of a checkpoint of ``kind`` holding the model's weights."""
    model = _model()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    root.mkdir(parents=True, exist_ok=True)
    if kind == "torchkeep":
        return tk.save({"model": model, "epoch": 3}, root / "ckpt.bin"), kinds.TORCHKEEP
    if kind == "safetensors":
        save_file(sd, str(root / "weights"))
        return root / "weights", kinds.SAFETENSORS
    if kind == "hf-dir":
        _plain_index(root, sd, lambda t, p: save_file(t, str(p)), "safetensors")
        return root, kinds.SHARDED
    if kind == "tk-index":
        src = tk.save({"model": model, "epoch": 3}, root / "src.safetensors")
        return tk.convert(src, root / "out" / "model.safetensors", max_shard_size=40), kinds.SHARDED
    if kind == "torch-zip":
        torch.save({"model": sd, "epoch": 3}, root / "ckpt.safetensors")  # a misleading suffix on purpose
        return root / "ckpt.safetensors", kinds.LEGACY_ZIP
    if kind == "torch-pickle":
        torch.save({"model": sd, "epoch": 3}, root / "old.pt", _use_new_zipfile_serialization=False)
        return root / "old.pt", kinds.LEGACY_PICKLE
    if kind == "bin-shards":
        _plain_index(root, sd, lambda t, p: torch.save(t, p), "bin")
        return root, kinds.SHARDED
    if kind == "dcp":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(sd, checkpoint_id=str(root / "dcp"), no_dist=True)
        return root / "dcp", kinds.DCP
    if kind == "tk-dcp":
        return tkd.save({"model": model, "epoch": 3}, root / "tkdcp"), kinds.TORCHKEEP_DCP
    raise AssertionError(kind)


KINDS = ["torchkeep", "safetensors", "hf-dir", "tk-index", "torch-zip", "torch-pickle", "bin-shards", "dcp", "tk-dcp"]
#: kinds whose files record a tree with the weights under "model" (restore targets mirror the tree)
TREE_KINDS = {"torchkeep", "tk-index", "torch-zip", "torch-pickle", "tk-dcp"}
#: kinds with checksums to verify
CHECKSUMMED = {"torchkeep", "safetensors", "hf-dir", "tk-index", "tk-dcp"}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    root = tmp_path_factory.mktemp("kinds")
    return {k: _build(k, root / k) for k in KINDS}


def _weights(tree: Any) -> dict[str, torch.Tensor]:
    """The model's four tensors wherever the kind keeps them (flat, under "model", or "model/..." / "model.").

    Plain safetensors files carry no checksums (``checksums: False``) but load; a state tree's keys may
    be prefixed by the path of the model in the tree.
    """
    if isinstance(tree, dict) and isinstance(tree.get("model"), dict):
        tree = tree["model"]
    out = {}
    for k, v in tree.items():
        if isinstance(v, torch.Tensor):
            out[str(k).removeprefix("model/").removeprefix("model.")] = v
    return out


def _expected() -> dict[str, torch.Tensor]:
    return dict(_model().state_dict())


@pytest.mark.parametrize("kind", KINDS)
def test_detect(made: dict, kind: str) -> None:
    path, want = made[kind]
    assert kinds.detect(path).kind == want


@pytest.mark.parametrize("kind", KINDS)
def test_load(made: dict, kind: str) -> None:
    path, _ = made[kind]
    got = _weights(tk.load(path))
    want = _expected()
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("kind", KINDS)
def test_restore(made: dict, kind: str) -> None:
    path, _ = made[kind]
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    if kind not in TREE_KINDS:  # a flat state dict: no "model" entry to restore into; the error lists the keys
        with pytest.raises(tk.errors.KeyMismatchError, match="top-level keys"):
            tk.restore(path, {"model": model})
        return
    state = tk.restore(path, {"model": model})
    assert state["epoch"] == 3
    for k, v in _expected().items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("kind", KINDS)
def test_load_into(made: dict, kind: str) -> None:
    path, _ = made[kind]
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    report = tk.load_into(model, path)
    assert report.ok and len(report.matched) == N_TENSORS
    for k, v in _expected().items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("kind", KINDS)
def test_convert(made: dict, kind: str, tmp_path: Path) -> None:
    path, _ = made[kind]
    out = tk.convert(path, tmp_path / "out.safetensors")
    got = _weights(tk.load(out))
    for k, v in _expected().items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("kind", KINDS)
def test_diff_against_itself_is_identical(made: dict, kind: str) -> None:
    path, _ = made[kind]
    report = tk.diff(path, path)
    assert report.identical and report.equal >= N_TENSORS


@pytest.mark.parametrize("kind", KINDS)
def test_inspect_covers_every_shard(made: dict, kind: str) -> None:
    path, detected = made[kind]
    info = tk.inspect(path)
    if kind in ("torch-zip", "torch-pickle"):
        assert info["legacy"] is True and info["format"] == detected
        return
    assert info["tensors"] >= N_TENSORS
    if detected == kinds.SHARDED:
        assert info["shards"] == len(info["files"]) >= 2
        if kind != "bin-shards":
            assert info["tensors"] == N_TENSORS and info["elements"] == sum(t.numel() for t in _expected().values())


@pytest.mark.parametrize("kind", KINDS)
def test_verify(made: dict, kind: str) -> None:
    path, detected = made[kind]
    result = tk.verify(path)
    if kind in CHECKSUMMED:
        assert result["ok"], result["error"]
        assert result["checksums"] is (kind != "safetensors" and kind != "hf-dir")
        if detected == kinds.SHARDED:
            assert result["shards"] >= 2 and result["tensors"] == N_TENSORS
    else:  # torch.save files and plain DCP directories carry no checksums: not ok, and it says why
        assert result["ok"] is False and "no checksums" in result["error"]


@pytest.mark.parametrize("kind", KINDS)
def test_scan(made: dict, kind: str) -> None:
    path, _ = made[kind]
    if kind in ("dcp", "tk-dcp"):
        with pytest.raises(UnsupportedSourceError, match=r"scan .*\.metadata"):
            tk.scan(path)
        return
    report = tk.scan(path)
    assert report.ok, report.unsafe


@pytest.mark.parametrize("kind", KINDS)
def test_load_model_names_the_kind_and_the_fix(made: dict, kind: str) -> None:
    """No file here was written by save_model: each gets the typed error for its kind, never "corrupt"."""
    path, detected = made[kind]
    with pytest.raises(UnsupportedSourceError) as err:
        tk.load_model(path)
    assert err.value.kind == detected
    assert "load_into" in str(err.value) and "corrupt" not in str(err.value)


@pytest.mark.parametrize("kind", KINDS)
def test_cli_verbs_give_an_answer_or_one_line(made: dict, kind: str, tmp_path: Path) -> None:
    path, _ = made[kind]
    runner = CliRunner()
    for args, ok_codes in (
        (["inspect", str(path)], {0}),
        (["verify", str(path)], {0} if kind in CHECKSUMMED else {2}),  # 2: nothing to verify
        (["convert", str(path), str(tmp_path / "c.safetensors")], {0}),
        (["diff", str(path), str(path)], {0}),
        (["export", str(path), "-s", "1x4", "-o", str(tmp_path / "m.pt")], {2}),
        (["quantize", str(path)], {2}),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code in ok_codes, (args, result.output)
        assert "Traceback" not in result.output
        if result.exit_code == 2 and args[0] in ("export", "quantize"):
            assert "load_model" in result.output or "save_model" in result.output, result.output
        if result.exit_code == 2 and args[0] == "verify":
            assert "no checksums" in " ".join(result.output.split()), result.output


def test_save_model_files_are_what_load_model_reads(tmp_path: Path) -> None:
    """The one kind load_model serves, in all three layouts: file, directory, sharded directory."""

    @tk.register_model("matrix-mlp")
    class MLP(torch.nn.Module):
        def __init__(self, width: int = 8) -> None:
            super().__init__()
            self.a = torch.nn.Linear(4, width)
            self.b = torch.nn.Linear(width, 2)

    net = MLP(8)
    for target in (tmp_path / "m.bin", tmp_path / "dir/", tmp_path / "sharded/"):
        size = 64 if target.name == "sharded" else None
        out = tk.save_model(net, str(target) + ("/" if target.name != "m.bin" else ""), max_shard_size=size)
        back = tk.load_model(out)
        assert torch.equal(back.b.weight, net.b.weight)


def test_a_directory_without_a_checkpoint_is_a_typed_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for call in (tk.load, tk.inspect, tk.verify, lambda p: tk.convert(p, tmp_path / "x.safetensors")):
        with pytest.raises(UnsupportedSourceError, match="holds no checkpoint") as err:
            call(tmp_path)
        assert isinstance(err.value, ValueError) and isinstance(err.value, TorchkeepError)


def test_save_to_a_directory_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(tk.errors.TargetIsDirectoryError) as err:
        tk.save({"w": torch.ones(1)}, tmp_path)
    assert isinstance(err.value, IsADirectoryError)


@pytest.mark.parametrize(
    "call",
    [tk.load, tk.inspect, tk.verify, tk.scan, tk.open, lambda p: tk.save({}, p), lambda p: tk.restore(p, {})],
    ids=["load", "inspect", "verify", "scan", "open", "save", "restore"],
)
def test_a_path_of_the_wrong_type_is_a_typed_error(call: Callable[[Any], Any]) -> None:
    with pytest.raises(tk.errors.ArgumentTypeError, match="path must be a path") as err:
        call(42)
    assert isinstance(err.value, TypeError)


def test_map_location_of_the_wrong_kind_is_a_typed_error(made: dict) -> None:
    path, _ = made["torchkeep"]
    with pytest.raises(tk.errors.ArgumentTypeError, match="map_location") as err:
        tk.load(path, map_location=3.5)
    assert isinstance(err.value, TypeError)
    with pytest.raises(tk.errors.InvalidArgumentError, match="map_location") as bad:
        tk.load(path, map_location="no-such-device")
    assert isinstance(bad.value, ValueError)


def test_detecting_a_torchkeep_file_does_not_parse_its_header(made: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The verb that opens the file parses its header (0.2 s for 20,000 tensors); detection reads a prefix."""
    import torchkeep.format.header as header
    import torchkeep.headers as headers

    def no_parse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("detect parsed the header")

    path, _ = made["torchkeep"]
    monkeypatch.setattr(header, "parse_header", no_parse)
    monkeypatch.setattr(headers, "parse_header", no_parse)
    assert kinds.detect(path).kind == kinds.TORCHKEEP

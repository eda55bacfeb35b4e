"""Single-process checks of the commit protocol: the manifest is verified before DCP reads anything,
plain DCP directories are refused unless trusted, and a failed restore names the file."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import torchkeep as tk
import torchkeep.distributed as tkd
from torchkeep.errors import (
    CorruptCheckpointError,
    FileChecksumError,
    KeyMismatchError,
    MissingShardError,
    UnsupportedObjectError,
    UnverifiedCheckpointError,
)

pytestmark = pytest.mark.timeout(60)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))


def _saved(tmp_path: Path) -> tuple[Path, torch.nn.Module, torch.optim.Optimizer]:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    state = {"model": model, "optimizer": opt, "epoch": 2, "cfg": {"name": "x"}, "ema": torch.arange(4.0)}
    return tkd.save(state, tmp_path / "ck", metadata={"run": "r1"}), model, opt


def test_layout_and_round_trip(tmp_path: Path) -> None:
    path, model, opt = _saved(tmp_path)
    names = sorted(p.name for p in path.iterdir())
    assert names == [".metadata", "__0_0.distcp", "torchkeep-manifest.json", "tree.safetensors"]
    manifest = json.loads((path / "torchkeep-manifest.json").read_text())
    assert manifest["world_size"] == 1 and set(manifest["files"]) == {".metadata", "__0_0.distcp", "tree.safetensors"}
    assert not list(tmp_path.glob(".ck.tmp-*"))
    fresh = _model()
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.5, momentum=0.9)
    got = tkd.restore(path, {"model": fresh, "optimizer": fresh_opt})
    assert got["epoch"] == 2 and got["cfg"] == {"name": "x"} and torch.equal(got["ema"], torch.arange(4.0))
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    assert fresh_opt.param_groups[0]["lr"] == 0.1
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(opt.state[p]["momentum_buffer"], fresh_opt.state[q]["momentum_buffer"])
    assert tk.open(path / "tree.safetensors").metadata == {"run": "r1"}


def test_saving_again_replaces_the_checkpoint(tmp_path: Path) -> None:
    path = tkd.save({"step": 1, "w": torch.zeros(3)}, tmp_path / "ck")
    tkd.save({"step": 2, "w": torch.ones(3)}, path)
    got = tkd.restore(path, {})
    assert got["step"] == 2 and torch.equal(got["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_flipped_bit_in_a_data_file_is_found_before_loading(tmp_path: Path) -> None:
    path, _, _ = _saved(tmp_path)
    data = path / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1
    data.write_bytes(bytes(raw))
    target = _model()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(FileChecksumError, match=r"__0_0\.distcp") as info:
        tkd.restore(path, {"model": target})
    assert info.value.key == "__0_0.distcp"
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())  # nothing was loaded
    tkd.restore(path, {"model": target}, verify=False)  # sizes still match: the caller's risk


def test_damaged_manifest_metadata_and_missing_file(tmp_path: Path) -> None:
    path, _, _ = _saved(tmp_path)
    manifest = path / "torchkeep-manifest.json"
    text = manifest.read_text()
    manifest.write_text(text.replace('"world_size": 1', '"world_size": 3'))
    with pytest.raises(CorruptCheckpointError, match="does not match its own digest"):
        tkd.restore(path, {"model": _model()})
    manifest.write_text(text)
    (path / ".metadata").write_bytes((path / ".metadata").read_bytes() + b"x")
    with pytest.raises(CorruptCheckpointError, match="the manifest says"):
        tkd.restore(path, {"model": _model()})
    (path / ".metadata").unlink()
    with pytest.raises(MissingShardError, match=r"\.metadata"):
        tkd.restore(path, {"model": _model()})


def test_plain_dcp_directory_is_refused_unless_trusted(tmp_path: Path) -> None:
    src = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": src.state_dict()}, checkpoint_id=str(tmp_path / "plain"), no_dist=True)
    target = _model()
    with torch.no_grad():
        target[0].weight.zero_()
    with pytest.raises(UnverifiedCheckpointError, match=r"pickle.*overwrites data files in place.*trust_pickle=True"):
        tkd.restore(tmp_path / "plain", {"model": target})
    assert not target[0].weight.any()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tkd.restore(tmp_path / "plain", {"model": target}, trust_pickle=True)
    assert torch.equal(target[0].weight, src[0].weight)


def test_keys_are_checked_before_anything_loads(tmp_path: Path) -> None:
    path, _, _ = _saved(tmp_path)
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    with pytest.raises(KeyMismatchError, match=r"1\.weight \(2, 8\) vs \(3, 8\)"):
        tkd.restore(path, {"model": other})
    with pytest.raises(KeyMismatchError, match="missing"):
        tkd.restore(path, {"nope": _model()})


def test_optimizer_without_its_model_is_refused(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UnsupportedObjectError, match=r"optimizer.*model it optimises must be"):
        tkd.save({"optimizer": opt}, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_unsavable_leaf_is_named(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedObjectError, match=r"cfg\.fn"):
        tkd.save({"cfg": {"fn": lambda x: x}, "w": torch.ones(1)}, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
    assert not list(tmp_path.glob(".ck.tmp-*"))


def test_tk_load_reads_the_weights_of_a_verified_directory(tmp_path: Path) -> None:
    path, model, _ = _saved(tmp_path)
    flat = tk.load(path)
    assert torch.equal(flat["model.0.weight"], model[0].weight.detach())
    report = tk.load_into(_model(), path, strict=False)  # the optimizer state and "ema" are not weights
    assert len(report.matched) == 4 and not report.missing


def test_an_async_save_error_is_reported_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``job.result()`` raises the background error; ``wait()`` and the next save do not raise it again."""
    import torchkeep.distributed.checkpoint as tkdc

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP's single-process notice
        monkeypatch.setattr(tkdc, "write_manifest", broken)
        job = tkd.save({"model": model}, tmp_path / "a", async_save=True)
        with pytest.raises(OSError, match="No space left"):  # as itself, on the rank it happened
            job.result()
        monkeypatch.undo()
        assert tkd.wait() is None
        assert not (tmp_path / "a").exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
        ok = tkd.save({"model": model}, tmp_path / "b", async_save=True)
        assert ok.result() == tmp_path / "b" and tkd.wait() is None
    fresh = _model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    tkd.restore(tmp_path / "b", {"model": fresh})
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))

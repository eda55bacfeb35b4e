"""convert: legacy -> torchkeep, torchkeep -> plain safetensors / torch, sharding, atomicity, the CLI."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import torchkeep as tk
import torchkeep.api
import torchkeep.writer
from torchkeep.cli import app
from torchkeep.convert import convert, parse_size, select_weights
from torchkeep.errors import CheckpointNotFoundError, ConversionError, UnsafeCheckpointError

# the package exports the function tk.convert, which shadows the module's attribute name
convert_mod = importlib.import_module("torchkeep.convert")
runner = CliRunner()


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


@pytest.fixture
def guide_pt(tmp_path: Path) -> tuple[Path, dict]:
    """A guide-style torch.save checkpoint with a real Adam state after two steps."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 8)).pow(2).mean().backward()
        opt.step()
    state = {
        "epoch": 5,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": opt.state_dict(),
        "loss": 0.4321,
    }
    path = tmp_path / "guide.pt"
    torch.save(state, path)
    return path, state


@pytest.fixture
def tk_ckpt(tmp_path: Path) -> Path:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    tree = {"model": model, "optimizer": opt, "epoch": 3, "config": {"lr": 0.1, "layers": [8, 16, 4]}}
    return tk.save(tree, tmp_path / "ckpt.safetensors", metadata={"run": "t1"})


def _assert_equal_tree(got, want, path="<root>") -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), path
        assert got.dtype == want.dtype and got.shape == want.shape, path
        assert _bits(got) == _bits(want), f"{path}: bytes differ"
    elif isinstance(want, dict):
        assert isinstance(got, dict), path
        assert list(got) == list(want), f"{path}: keys {list(got)} != {list(want)}"
        for k in want:
            _assert_equal_tree(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_equal_tree(g, w, f"{path}[{i}]")
    else:
        assert type(got) is type(want) and got == want, f"{path}: {got!r} != {want!r}"


# -- legacy -> torchkeep --------------------------------------------------------------------------


def test_legacy_to_torchkeep_keeps_the_whole_tree_bitwise(guide_pt, tmp_path: Path) -> None:
    src, state = guide_pt
    out = convert(src, tmp_path / "new.safetensors")
    assert out == tmp_path / "new.safetensors"
    with tk.open(out) as ck:
        assert ck.is_torchkeep and ck.has_tree
    back = tk.load(out)
    _assert_equal_tree(back, state)
    assert back["epoch"] == 5 and back["loss"] == 0.4321
    assert set(back["optimizer_state_dict"]["state"]) == {0, 1, 2, 3}  # int keys survive
    assert back["optimizer_state_dict"]["state"][0]["step"].item() == 2.0
    assert back["optimizer_state_dict"]["param_groups"][0]["betas"] == (0.9, 0.999)


def test_source_is_never_modified_and_no_temp_files_remain(guide_pt, tmp_path: Path) -> None:
    src, _ = guide_pt
    before = _sha(src)
    convert(src, tmp_path / "a.safetensors")
    convert(tmp_path / "a.safetensors", tmp_path / "b.pt")
    assert _sha(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.pt", "guide.pt"]


def test_refuses_to_overwrite_the_source(tk_ckpt: Path, tmp_path: Path) -> None:
    before = _sha(tk_ckpt)
    with pytest.raises(ConversionError, match="overwrite the input"):
        convert(tk_ckpt, tk_ckpt)
    with pytest.raises(ConversionError, match="overwrite the input"):
        convert(tk_ckpt, tmp_path / "." / tk_ckpt.name, to="safetensors")
    os.link(tk_ckpt, tmp_path / "hard.safetensors")
    with pytest.raises(ConversionError, match="overwrite the input"):
        convert(tk_ckpt, tmp_path / "hard.safetensors")
    assert _sha(tk_ckpt) == before


def test_unsafe_legacy_pickle_is_refused_without_trust(tmp_path: Path) -> None:
    src = tmp_path / "model.pt"
    torch.save(_model(), src)  # a whole-model pickle
    with pytest.raises(UnsafeCheckpointError):
        convert(src, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    out = convert(src, tmp_path / "x.safetensors", trust_pickle=True)  # Stateful: saved via state_dict()
    assert set(tk.load(out)) == set(_model().state_dict())


# -- torchkeep -> plain safetensors / torch --------------------------------------------------------


def test_torchkeep_to_plain_safetensors_holds_the_model_weights(tk_ckpt: Path, tmp_path: Path) -> None:
    out = convert(tk_ckpt, tmp_path / "weights.safetensors", to="safetensors")
    want = _model().state_dict()
    with safe_open(str(out), framework="pt") as f:
        assert sorted(f.keys()) == sorted(want)
        meta = f.metadata()
        for k in want:
            assert _bits(f.get_tensor(k)) == _bits(tk.load(tk_ckpt)["model"][k])
    assert meta["format"] == "pt" and meta["run"] == "t1"
    assert not any(k.startswith("torchkeep.") for k in meta)  # plain: no torchkeep keys
    with tk.open(out) as ck:
        assert not ck.is_torchkeep


def test_plain_safetensors_from_a_guide_checkpoint_and_key_option(guide_pt, tmp_path: Path) -> None:
    src, state = guide_pt
    out = convert(src, tmp_path / "w.safetensors", to="st")
    with safe_open(str(out), framework="pt") as f:
        assert sorted(f.keys()) == sorted(state["model_state_dict"])
    out = convert(src, tmp_path / "opt.safetensors", to="safetensors", key="optimizer_state_dict/state")
    with safe_open(str(out), framework="pt") as f:
        assert "0.exp_avg" in f.keys() and _bits(f.get_tensor("3.exp_avg_sq")) == _bits(
            state["optimizer_state_dict"]["state"][3]["exp_avg_sq"]
        )


def test_select_weights_rule() -> None:
    w = torch.ones(2)
    assert select_weights({"a": w, "b": w}).keys() == {"a", "b"}
    assert list(select_weights({"epoch": 1, "state_dict": {"enc": {"w": w}}})) == ["enc.w"]
    assert list(select_weights({"model": {"x": w}, "state_dict": {"y": w}})) == ["x"]  # model first
    with pytest.raises(ConversionError, match="key="):
        select_weights({"epoch": 1, "weights_of_mine": {"x": w}})
    with pytest.raises(ConversionError, match="no 'nope'"):
        select_weights({"m": {"x": w}}, key="m/nope")


def test_torchkeep_to_torch_loads_with_weights_only(tk_ckpt: Path, tmp_path: Path) -> None:
    out = convert(tk_ckpt, tmp_path / "old.pth")
    got = torch.load(out, weights_only=True)
    _assert_equal_tree(got, tk.load(tk_ckpt))
    assert got["epoch"] == 3 and got["config"]["layers"] == [8, 16, 4]


def test_plain_safetensors_source_round_trips(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src = tmp_path / "plain.safetensors"
    save_file({"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int8)}, str(src))
    out = convert(src, tmp_path / "tk.safetensors")
    _assert_equal_tree(tk.load(out), tk.load(src))


# -- sharding ------------------------------------------------------------------------------------------


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500mb") == 500 * 10**6
    assert parse_size("4GiB") == 4 * 2**30
    assert parse_size("2k") == 2000
    assert parse_size(123) == 123
    for bad in ("lots", "-5MB", "0", 0):
        with pytest.raises(ConversionError):
            parse_size(bad)


def _read_index(index: Path) -> dict[str, torch.Tensor]:
    meta = json.loads(index.read_text())
    out = {}
    for name, shard in meta["weight_map"].items():
        with safe_open(str(index.parent / shard), framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


@pytest.mark.parametrize("fmt", ["safetensors", "torchkeep"])
def test_sharded_output_has_shards_and_an_hf_index(tk_ckpt: Path, tmp_path: Path, fmt: str) -> None:
    out_dir = tmp_path / "out"
    index = convert(tk_ckpt, out_dir / "model.safetensors", to=fmt, max_shard_size=300)
    assert index == out_dir / "model.safetensors.index.json"
    meta = json.loads(index.read_text())
    shards = sorted(set(meta["weight_map"].values()))
    n = len(shards)
    assert n >= 3
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([*shards, index.name])  # no temp files
    got = _read_index(index)
    assert meta["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    tree = tk.load(tk_ckpt)
    if fmt == "safetensors":
        want = tree["model"]
    else:
        want = {"/".join(map(str, k)): v for k, v in _flat(tree)}
        assert meta["metadata"]["torchkeep.tree"]["d"]["epoch"] == 3  # the skeleton travels in the index
        for shard in shards:
            assert tk.verify(out_dir / shard)["ok"]  # each shard is checksummed
    assert sorted(got) == sorted(want)
    for k, t in want.items():
        assert _bits(got[k]) == _bits(t), k
    for shard in shards:  # each shard respects the limit unless one tensor alone is larger
        with safe_open(str(out_dir / shard), framework="pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
        assert len(sizes) == 1 or sum(4 * torch.Size(s).numel() for s in sizes) <= 300


def _flat(tree, prefix=()):
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat(v, (*prefix, k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _flat(v, (*prefix, i))


def test_sharded_torchkeep_index_converts_back_to_the_same_tree(tk_ckpt: Path, tmp_path: Path) -> None:
    index = convert(tk_ckpt, tmp_path / "s" / "m.safetensors", max_shard_size="200B")
    back = convert(index, tmp_path / "whole.safetensors")
    _assert_equal_tree(tk.load(back), tk.load(tk_ckpt))
    assert tk.open(back).metadata == {"run": "t1"}


def test_one_shard_is_a_single_file(tk_ckpt: Path, tmp_path: Path) -> None:
    out = convert(tk_ckpt, tmp_path / "one.safetensors", max_shard_size="10GB")
    assert out == tmp_path / "one.safetensors"
    assert not list(tmp_path.glob("*.index.json"))


def test_sharding_torch_format_is_refused(tk_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="max_shard_size"):
        convert(tk_ckpt, tmp_path / "x.pt", max_shard_size="1MB")


# -- atomicity ----------------------------------------------------------------------------------------


def test_failed_single_file_write_leaves_the_old_dst_intact(tk_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    dst = tmp_path / "dst.safetensors"
    dst.write_bytes(b"old contents")

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torchkeep.writer, "write_buffers", boom)  # the one writer
    for to in ("torchkeep", "safetensors"):
        with pytest.raises(OSError, match="No space"):
            convert(tk_ckpt, dst, to=to)
        assert dst.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors", "dst.safetensors"]


def test_failed_torch_write_leaves_the_old_dst_intact(tk_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    dst = tmp_path / "dst.pt"
    dst.write_bytes(b"old")

    def boom(*args, **kwargs):
        raise RuntimeError("disk died")

    monkeypatch.setattr(convert_mod.torch, "save", boom)
    with pytest.raises(RuntimeError, match="disk died"):
        convert(tk_ckpt, dst)
    assert dst.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors", "dst.pt"]


def test_failed_shard_leaves_no_shards_and_the_old_index(tk_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors.index.json").write_text("old index")
    real = torchkeep.writer._write_tensors
    calls = []

    def fail_on_second(fd, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(5, "I/O error")
        return real(fd, *args, **kwargs)

    monkeypatch.setattr(torchkeep.writer, "_write_tensors", fail_on_second)
    with pytest.raises(OSError, match="I/O error"):
        convert(tk_ckpt, out / "model.safetensors", max_shard_size=300)
    assert [p.name for p in out.iterdir()] == ["model.safetensors.index.json"]
    assert (out / "model.safetensors.index.json").read_text() == "old index"


def test_progress_reports_every_input_byte(tk_ckpt: Path, tmp_path: Path) -> None:
    seen: list[int] = []
    convert(tk_ckpt, tmp_path / "p.pt", progress=seen.append)
    with tk.open(tk_ckpt) as ck:
        assert sum(seen) == sum(s.nbytes for s in ck.header.tensors.values())


def test_errors(tmp_path: Path, tk_ckpt: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        convert(tmp_path / "missing.pt", tmp_path / "x.safetensors")
    with pytest.raises(ConversionError, match="output format"):
        convert(tk_ckpt, tmp_path / "x.weird")
    with pytest.raises(ConversionError, match="unknown output format"):
        convert(tk_ckpt, tmp_path / "x.safetensors", to="onnx")


# -- CLI ----------------------------------------------------------------------------------------------


def test_cli_convert(guide_pt, tmp_path: Path) -> None:
    src, state = guide_pt
    r = runner.invoke(app, ["convert", str(src), str(tmp_path / "c.safetensors")])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output
    _assert_equal_tree(tk.load(tmp_path / "c.safetensors"), state)
    r = runner.invoke(
        app, ["convert", str(tmp_path / "c.safetensors"), str(tmp_path / "sh.safetensors"), "--to", "safetensors",
              "--key", "model_state_dict", "--max-shard-size", "300B", "--json"]
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["dst"].endswith("sh.safetensors.index.json") and info["files"] >= 3
    assert sorted(_read_index(Path(info["dst"]))) == sorted(state["model_state_dict"])


def test_cli_convert_errors_are_one_red_line_exit_2(tk_ckpt: Path, tmp_path: Path) -> None:
    r = runner.invoke(app, ["convert", str(tk_ckpt), str(tk_ckpt)])
    assert r.exit_code == 2
    assert "overwrite the input" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["convert", str(tmp_path / "nope.pt"), str(tmp_path / "x.safetensors")])
    assert r.exit_code == 2
    r = runner.invoke(app, ["convert", str(tk_ckpt), str(tmp_path / "y.safetensors"), "--max-shard-size", "big"])
    assert r.exit_code == 2 and "5GB" in r.output


def test_symlinked_dst_to_the_source_is_refused(tk_ckpt: Path, tmp_path: Path) -> None:
    (tmp_path / "link.safetensors").symlink_to(tk_ckpt)
    with pytest.raises(ConversionError, match="overwrite the input"):
        convert(tk_ckpt, tmp_path / "link.safetensors")


def test_tied_weights_become_two_plain_tensors(tmp_path: Path) -> None:
    w = torch.randn(5, 3)
    src = tk.save({"model": {"emb.weight": w, "head.weight": w}}, tmp_path / "tied.safetensors")
    out = convert(src, tmp_path / "plain.safetensors", to="safetensors")
    with safe_open(str(out), framework="pt") as f:
        assert _bits(f.get_tensor("emb.weight")) == _bits(w) == _bits(f.get_tensor("head.weight"))


def test_cli_shows_a_progress_bar_on_a_terminal_for_big_inputs(tk_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    import sys

    import torchkeep.cli.convert as cli_convert

    library = sys.modules["torchkeep.convert"]  # the command imports the library call when it runs
    seen: list[object] = []
    real = library.convert

    def spy(*args, **kwargs):
        seen.append(kwargs["progress"])
        return real(*args, **kwargs)

    monkeypatch.setattr(library, "convert", spy)
    assert runner.invoke(app, ["convert", str(tk_ckpt), str(tmp_path / "a.pt")]).exit_code == 0
    assert seen == [None]  # small input, not a terminal: no bar
    monkeypatch.setattr(cli_convert, "PROGRESS_MIN_BYTES", 0)
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich treats the output as a terminal
    assert runner.invoke(app, ["convert", str(tk_ckpt), str(tmp_path / "b.pt")]).exit_code == 0
    assert callable(seen[1])


def test_a_non_string_output_format_is_a_typed_type_error(tmp_path: Path) -> None:
    src = tk.save({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    with pytest.raises(tk.errors.ArgumentTypeError, match="to must be a format name") as info:
        convert(src, tmp_path / "b.safetensors", to=1)  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError) and not (tmp_path / "b.safetensors").exists()

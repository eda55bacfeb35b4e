"""The CLI (run in-process with typer's CliRunner) and the read-only library calls behind it."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import torchkeep as tk
from torchkeep.cli import app
from torchkeep.errors import CheckpointNotFoundError, CorruptCheckpointError

runner = CliRunner()

# model: Linear(4, 3) + Linear(3, 2) = 12 + 3 + 6 + 2 = 23 parameters in 4 tensors
N_PARAMS = 23


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A training checkpoint: model, Adam after one step, scalars, a float16 tensor, user metadata."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    tree = {
        "model": model,
        "optimizer": opt,
        "ema": torch.zeros(5, dtype=torch.float16),
        "epoch": 7,
        "best_acc": 0.91,
        "config": {"layers": [4, 3, 2], "betas": (0.9, 0.999)},
    }
    return tk.save(tree, tmp_path / "ckpt.safetensors", metadata={"run": "unit-test", "lr": 0.001})


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


def _flip_in_tensor(path: Path, key: str) -> None:
    with tk.open(path) as ck:
        spec = ck.header.tensors[key]
        offset = ck.header.size + spec.start + spec.nbytes // 2
    _flip(path, offset)


# -- inspection.inspect ----------------------------------------------------------------------


def test_inspect_reports_counts_dtypes_metadata_and_tree(ckpt: Path) -> None:
    info = tk.inspect(ckpt)
    assert info["format"] == "torchkeep/1"
    assert info["checksums"] is True
    assert info["torchkeep_version"] == tk.__version__
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert info["created"] and info["created"][:2] == "20"
    assert info["metadata"] == {"run": "unit-test", "lr": 0.001}
    # 4 model tensors, Adam: step/exp_avg/exp_avg_sq for each of 4 params, 1 ema tensor
    assert info["tensors"] == 4 + 12 + 1
    assert info["parameters"] == N_PARAMS
    assert info["elements"] == N_PARAMS + (4 + 2 * N_PARAMS) + 5
    assert info["dtypes"] == {
        "float32": {"tensors": 16, "elements": 4 + 3 * N_PARAMS, "bytes": 4 * (4 + 3 * N_PARAMS)},
        "float16": {"tensors": 1, "elements": 5, "bytes": 10},
    }
    assert info["bytes"] == 4 * (4 + 3 * N_PARAMS) + 10
    assert info["file_size"] == ckpt.stat().st_size == info["header_size"] + info["bytes"]

    top = {n["name"]: n for n in info["tree"]}
    assert list(top) == ["model", "optimizer", "ema", "epoch", "best_acc", "config"]
    assert top["model"]["kind"] == "module"
    assert top["model"]["class"] == "torch.nn.modules.container.Sequential"
    assert (top["model"]["tensors"], top["model"]["elements"], top["model"]["bytes"]) == (4, N_PARAMS, 4 * N_PARAMS)
    assert [c["name"] for c in top["model"]["children"]] == ["0", "1"]
    weight = top["model"]["children"][0]["children"][0]
    assert weight == {
        "name": "weight",
        "kind": "tensor",
        "key": "model/0.weight",
        "dtype": "float32",
        "shape": [3, 4],
        "tensors": 1,
        "elements": 12,
        "bytes": 48,
    }
    assert top["optimizer"]["kind"] == "optimizer" and top["optimizer"]["class"] == "torch.optim.adam.Adam"
    assert top["optimizer"]["tensors"] == 12
    assert top["ema"]["dtype"] == "float16" and top["ema"]["bytes"] == 10
    assert top["epoch"] == {"name": "epoch", "kind": "int", "value": 7, "tensors": 0, "elements": 0, "bytes": 0}
    assert top["best_acc"]["value"] == 0.91
    betas = top["config"]["children"][1]
    assert betas["kind"] == "tuple" and [c["value"] for c in betas["children"]] == [0.9, 0.999]
    json.dumps(info, allow_nan=False)  # strictly JSON-able


def test_inspect_reads_only_the_header(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    header_size = tk.inspect(ckpt)["header_size"]
    reads: list[tuple[int, int]] = []
    real_pread = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        reads.append((offset, n))
        return real_pread(fd, n, offset)

    def no_data(*args: object, **kwargs: object) -> None:
        raise AssertionError("inspect read tensor data")

    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr("torchkeep.reader.read_into", no_data)
    assert tk.inspect(ckpt)["tensors"] == 17
    assert reads and all(off + n <= header_size for off, n in reads)


def test_inspect_depth_limits_the_tree_but_keeps_counts(ckpt: Path) -> None:
    top = {n["name"]: n for n in tk.inspect(ckpt, depth=1)["tree"]}
    assert "children" not in top["model"]
    assert top["model"]["children_omitted"] == 2
    assert top["model"]["elements"] == N_PARAMS
    deeper = {n["name"]: n for n in tk.inspect(ckpt, depth=2)["tree"]}
    assert [c["children_omitted"] for c in deeper["model"]["children"]] == [2, 2]


def test_inspect_counts_tied_weights_once(tmp_path: Path) -> None:
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.decoder = torch.nn.Linear(4, 10, bias=False)
            self.decoder.weight = self.embed.weight

    p = tk.save({"model": Tied()}, tmp_path / "tied.safetensors")
    info = tk.inspect(p)
    assert info["tensors"] == 1
    assert info["parameters"] == 40
    model = info["tree"][0]
    assert model["tensors"] == 1 and model["elements"] == 40
    decoder_weight = model["children"][1]["children"][0]
    assert decoder_weight["key"] == "model/embed.weight" and decoder_weight["tied"] is True


def test_inspect_plain_safetensors_groups_names_by_dots(tmp_path: Path) -> None:
    p = tmp_path / "plain.safetensors"
    save_file(
        {
            "model.layers.0.w": torch.ones(3),
            "model.layers.1.w": torch.ones(3),
            "lm_head": torch.zeros(2, dtype=torch.bfloat16),
        },
        p,
    )
    info = tk.inspect(p)
    assert info["format"] == "safetensors"
    assert info["checksums"] is False and info["created"] is None and info["metadata"] == {}
    assert (info["tensors"], info["elements"], info["parameters"]) == (3, 8, 8)
    assert info["dtypes"]["bfloat16"] == {"tensors": 1, "elements": 2, "bytes": 4}
    top = {n["name"]: n for n in info["tree"]}
    assert top["model"]["kind"] == "group" and top["model"]["tensors"] == 2
    assert [c["name"] for c in top["model"]["children"][0]["children"]] == ["0", "1"]


def test_inspect_legacy_torch_save_without_unpickling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "old.pt"
    torch.save({"a": torch.ones(3), "b": torch.zeros(2, 2)}, p)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("inspect unpickled a legacy file")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    info = tk.inspect(p)
    assert info["format"] == "torch.save (zip)" and info["legacy"] is True
    assert info["storages"] == 2 and info["storage_bytes"] == 12 + 16
    assert "torchkeep convert " in info["hint"] and "old.safetensors" in info["hint"]

    raw = tmp_path / "ancient.pt"
    raw.write_bytes(pickle.dumps({"x": 1}, protocol=2))
    assert tk.inspect(raw)["format"].startswith("torch.save (raw pickle")


def test_inspect_errors_are_typed(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        tk.inspect(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello, this is not a checkpoint at all")
    with pytest.raises(CorruptCheckpointError):
        tk.inspect(junk)
    with pytest.raises(CorruptCheckpointError):
        tk.inspect(tmp_path)  # a directory: its only .safetensors file is the junk one
    (tmp_path / "empty").mkdir()
    # an empty directory is not a damaged checkpoint: a typed "nothing here" (a ValueError, as before)
    with pytest.raises(tk.errors.UnsupportedSourceError, match="directory"):
        tk.inspect(tmp_path / "empty")


# -- inspection.verify -----------------------------------------------------------------------


def test_verify_ok_counts_every_byte_and_reports_progress(ckpt: Path) -> None:
    seen: list[int] = []
    result = tk.verify(ckpt, progress=seen.append)
    info = tk.inspect(ckpt)
    assert result["ok"] is True and result["error"] is None and result["key"] is None
    assert result["tensors"] == 17 and result["checksums"] is True
    assert result["bytes_checked"] == info["bytes"] == sum(seen)


def test_verify_names_the_damaged_tensor(ckpt: Path) -> None:
    _flip_in_tensor(ckpt, "optimizer/state/2/exp_avg_sq")
    result = tk.verify(ckpt)
    assert result["ok"] is False
    assert result["key"] == "optimizer/state/2/exp_avg_sq"
    assert "checksum mismatch" in result["error"] and str(ckpt) in result["error"]


def test_verify_detects_a_damaged_header(ckpt: Path) -> None:
    _flip(ckpt, tk.inspect(ckpt)["header_size"] // 2)
    result = tk.verify(ckpt)
    assert (result["ok"], result["key"]) == (False, "<header>")


def test_verify_plain_safetensors_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(4)}, p)
    result = tk.verify(p)
    assert (result["ok"], result["checksums"], result["format"], result["bytes_checked"]) == (
        True,
        False,
        "safetensors",
        0,
    )
    with pytest.raises(CheckpointNotFoundError):
        tk.verify(tmp_path / "missing.safetensors")


# -- torchkeep inspect -----------------------------------------------------------------------


def test_cli_inspect_human_output(ckpt: Path) -> None:
    result = runner.invoke(app, ["inspect", str(ckpt)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "torchkeep/1 (checksummed)" in out
    assert f"torchkeep {tk.__version__}" in out
    assert "17 · 78 elements" in out  # tensors and elements
    assert "parameters  23" in out
    assert "float16" in out and "10 B" in out
    assert "run = 'unit-test'" in out and "lr = 0.001" in out
    assert "Sequential module" in out and "Adam optimizer" in out
    assert "weight  float32 [3, 4]" in out
    assert "epoch = 7" in out


def test_cli_inspect_json_is_the_library_summary(ckpt: Path) -> None:
    result = runner.invoke(app, ["inspect", "--json", str(ckpt)])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data == tk.inspect(ckpt)
    assert data["parameters"] == N_PARAMS and data["metadata"]["run"] == "unit-test"
    limited = json.loads(runner.invoke(app, ["inspect", "--json", "--depth", "1", str(ckpt)]).stdout)
    assert limited == tk.inspect(ckpt, depth=1)


def test_cli_inspect_collapses_wide_and_deep_trees(tmp_path: Path) -> None:
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(30)])
    p = tk.save({"model": model}, tmp_path / "wide.safetensors")
    out = runner.invoke(app, ["inspect", str(p)]).stdout
    assert "├── 19  2 tensors" in out
    assert "├── 20 " not in out
    assert "... 10 more  (20 tensors · 60 elements · 240 B)" in out
    shallow = runner.invoke(app, ["inspect", "--depth", "1", str(p)]).stdout
    assert "+30 hidden" in shallow and "weight" not in shallow


def test_cli_inspect_legacy_file_suggests_conversion(tmp_path: Path) -> None:
    p = tmp_path / "old.pth"
    torch.save({"w": torch.ones(2)}, p)
    result = runner.invoke(app, ["inspect", str(p)])
    assert result.exit_code == 0
    assert "torch.save (zip)" in result.stdout and "torchkeep convert " in result.stdout


# -- torchkeep verify ------------------------------------------------------------------------


def test_cli_verify_ok(ckpt: Path) -> None:
    result = runner.invoke(app, ["verify", str(ckpt)])
    assert result.exit_code == 0
    assert result.stdout.startswith("ok ") and "all 17 tensor checksums and the header match" in result.stdout
    data = json.loads(runner.invoke(app, ["verify", "--json", str(ckpt)]).stdout)
    assert data["ok"] is True and data["bytes_checked"] == tk.inspect(ckpt)["bytes"]


def test_cli_verify_flipped_data_byte_exits_1_naming_the_tensor(ckpt: Path) -> None:
    _flip_in_tensor(ckpt, "model/1.weight")
    result = runner.invoke(app, ["verify", str(ckpt)])
    assert result.exit_code == 1
    assert "DAMAGED" in result.stdout and "tensor 'model/1.weight'" in result.stdout
    as_json = runner.invoke(app, ["verify", "--json", str(ckpt)])
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout)["key"] == "model/1.weight"


def test_cli_verify_damaged_header_exits_1(ckpt: Path) -> None:
    _flip(ckpt, 40)
    result = runner.invoke(app, ["verify", str(ckpt)])
    assert result.exit_code == 1
    assert "the header does not match its checksum" in result.stdout


def test_cli_verify_shows_progress_only_on_a_terminal_without_json(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    real = tk.verify

    def spy(path: object, *, progress: object = None) -> dict:
        calls.append(progress)
        return real(path, progress=progress)

    monkeypatch.setattr("torchkeep.cli.verify.verify", spy)
    monkeypatch.setattr("torchkeep.cli.verify.PROGRESS_MIN_BYTES", 0)
    assert runner.invoke(app, ["verify", str(ckpt)], env={"FORCE_COLOR": "1"}).exit_code == 0
    assert runner.invoke(app, ["verify", "--json", str(ckpt)], env={"FORCE_COLOR": "1"}).exit_code == 0
    assert runner.invoke(app, ["verify", str(ckpt)]).exit_code == 0  # not a terminal
    assert callable(calls[0]) and calls[1] is None and calls[2] is None
    monkeypatch.setattr("torchkeep.cli.verify.PROGRESS_MIN_BYTES", 64 << 20)
    runner.invoke(app, ["verify", str(ckpt)], env={"FORCE_COLOR": "1"})
    assert calls[3] is None  # small file: no bar


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("verb", ["inspect", "verify"])
def test_cli_missing_file_exits_2_with_one_clean_line(tmp_path: Path, verb: str) -> None:
    missing = tmp_path / "nope.safetensors"
    result = runner.invoke(app, [verb, str(missing)])
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ") and str(missing) in lines[0] and "no such checkpoint file" in lines[0]
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, CheckpointNotFoundError)  # handled, not raised


@pytest.mark.parametrize("verb", ["inspect", "verify"])
def test_cli_not_a_checkpoint_exits_2(tmp_path: Path, verb: str) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("just some text, clearly not a checkpoint\n")
    result = runner.invoke(app, [verb, str(junk)])
    assert result.exit_code == 2
    assert str(junk) in result.stderr and "not a checkpoint" in result.stderr
    assert "Traceback" not in result.output


def test_cli_verify_legacy_file_exits_2(tmp_path: Path) -> None:
    p = tmp_path / "old.pt"
    torch.save({"w": torch.ones(2)}, p)
    result = runner.invoke(app, ["verify", str(p)])
    assert result.exit_code == 2
    assert "no checksums to verify" in result.stderr and "torchkeep convert " in result.stderr


# -- help ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], ["inspect", "verify", "demo", "torchkeep demo"]),
        (["inspect"], ["reading only its header", "Example: torchkeep inspect ckpt.safetensors", "--depth", "--json"]),
        (["verify"], ["Check every checksum", "Example: torchkeep verify ckpt.safetensors", "--json"]),
        (["demo"], ["crash it halfway", "Example: torchkeep demo --dir", "--epochs"]),
    ],
)
def test_help_teaches_purpose_and_example(args: list[str], expected: list[str]) -> None:
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    for phrase in expected:
        assert phrase in text, phrase


def test_version_flag() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"torchkeep {tk.__version__}"


# -- torchkeep demo --------------------------------------------------------------------------


def test_demo_resumes_bitwise_equal(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["demo", "--dir", str(run_dir), "--epochs", "4"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    assert "bitwise equal" in out and "resumed at epoch 3" in out
    if all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")):
        # the demo ships the model: an ONNX export verified by torchkeep, then run with onnxruntime
        assert "shipped:" in out and "onnxruntime predicted 100 rows" in out
        assert "torch.onnx.export(dynamo=True)" in out
        assert (run_dir / "model.onnx").is_file() and str(run_dir / "model.onnx") in out
    else:  # without the onnx extra the demo says how to get that step, and still succeeds
        assert 'ONNX export skipped: pip install "torchkeep[onnx]"' in out and not (run_dir / "model.onnx").exists()
    names = sorted(p.name for p in run_dir.glob("*.safetensors") if not p.is_symlink())
    assert names == [f"epoch-{i:03d}.safetensors" for i in range(1, 5)]
    assert (run_dir / "last.safetensors").resolve() == run_dir / "epoch-004.safetensors"
    for name in names:
        assert tk.verify(run_dir / name)["ok"]
        assert name in out
    with tk.CheckpointManager(run_dir) as mgr:  # the demo's run is an ordinary manager run
        assert [i.step for i in mgr.checkpoints()] == [1, 2, 3, 4]
    last = tk.load(run_dir / "epoch-004.safetensors")
    assert last["epoch"] == 4 and isinstance(last["loader_generator"], torch.Generator)
    assert set(last) >= {"model", "optimizer", "scheduler", "rng", "metrics"}
    assert last["scheduler"]["last_epoch"] == 4


def test_demo_fails_when_the_resume_is_not_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchkeep.cli.demo as demo

    real_restore = demo.tk.CheckpointManager.restore

    def lossy_restore(self: object, targets: dict, **kwargs: object) -> object:
        info = real_restore(self, targets, **kwargs)
        torch.manual_seed(1234)  # as if the RNG state had not been saved: dropout masks change
        return info

    monkeypatch.setattr(demo.tk.CheckpointManager, "restore", lossy_restore)
    result = runner.invoke(app, ["demo", "--dir", str(tmp_path / "run"), "--epochs", "2"])
    assert result.exit_code == 1
    assert "NOT exact" in result.stdout and "model.0.weight" in result.stdout


def test_cli_errors_name_the_flag_not_the_python_keyword(tmp_path: Path) -> None:
    import argparse

    old = tmp_path / "ns.pt"
    torch.save({"hp": argparse.Namespace(lr=0.1), "w": torch.ones(2)}, old)
    out = tmp_path / "out.safetensors"
    refused = runner.invoke(app, ["convert", str(old), str(out)])
    assert refused.exit_code == 2
    text = " ".join(refused.output.split())
    assert "pass --trust-pickle" in text and "pass trust_pickle=True" not in text
    # and the advice works: the Namespace is an everyday value, saved without pickle
    assert runner.invoke(app, ["convert", str(old), str(out), "--trust-pickle"]).exit_code == 0
    assert tk.load(out)["hp"] == argparse.Namespace(lr=0.1)
    bad_name = runner.invoke(app, ["convert", str(out), str(tmp_path / "x.xyz")])
    assert bad_name.exit_code == 2 and "pass --to one of" in " ".join(bad_name.output.split())


def test_as_flags_rewrites_only_the_commands_own_options() -> None:
    from typer.main import get_command

    from torchkeep.cli import as_flags

    convert = get_command(app).commands["convert"]  # type: ignore[attr-defined]
    assert as_flags("pass trust_pickle=True now", convert) == "pass --trust-pickle now"
    assert as_flags("or pass to='torch'", convert) == "or pass --to torch"
    assert as_flags("pass strict=False", convert) == "pass strict=False"  # convert has no --strict
    assert as_flags("pass trust_pickle=True", None) == "pass trust_pickle=True"


def test_python_dash_m_and_short_version() -> None:
    import subprocess
    import sys

    from torchkeep._version import __version__

    assert runner.invoke(app, ["-V"]).output.strip() == f"torchkeep {__version__}"
    proc = subprocess.run([sys.executable, "-m", "torchkeep", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"torchkeep {__version__}"


def test_get_shows_one_tensor_or_value_and_writes_it_on_request(tmp_path: Path) -> None:
    import json

    import numpy as np
    from safetensors.torch import load_file

    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    path = tk.save({"model": {"fc.weight": w}, "epoch": 7, "cfg": {"lr": 0.5}}, tmp_path / "c.safetensors")
    before = sorted(p.name for p in tmp_path.iterdir())
    out = runner.invoke(app, ["get", str(path), "model/fc.weight", "--json"])
    assert out.exit_code == 0, out.output
    info = json.loads(out.output)
    assert info["shape"] == [3, 4] and info["dtype"] == "float32" and info["min"] == 0 and info["max"] == 11
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # read-only without --out
    assert json.loads(runner.invoke(app, ["get", str(path), "cfg/lr", "--json"]).output)["value"] == 0.5
    assert "epoch (int): 7" in runner.invoke(app, ["get", str(path), "epoch"]).output
    for suffix in (".npy", ".pt", ".safetensors"):
        dst = tmp_path / f"w{suffix}"
        assert runner.invoke(app, ["get", str(path), "model/fc.weight", "-o", str(dst)]).exit_code == 0
        back = (
            torch.from_numpy(np.load(dst))
            if suffix == ".npy"
            else torch.load(dst, weights_only=True)
            if suffix == ".pt"
            else load_file(str(dst))["fc.weight"]
        )
        assert torch.equal(back, w)
    missing = runner.invoke(app, ["get", str(path), "model/fc.wieght"])
    assert missing.exit_code == 2 and "did you mean: model/fc.weight" in " ".join(missing.output.split())
    bad = runner.invoke(app, ["get", str(path), "epoch", "-o", str(tmp_path / "e.txt")])
    assert bad.exit_code == 2 and "--out" in bad.output


def test_shell_completion_is_offered() -> None:
    out = runner.invoke(app, ["--show-completion", "bash"])
    assert out.exit_code == 0 and "_torchkeep_completion" in out.output

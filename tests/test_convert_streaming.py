"""Gathering a torchkeep distributed checkpoint into one file in bounded memory (``convert`` streaming).

The reference for every output is the whole-tree path: ``read_tree`` (every tensor at full size,
through ``load_tree``) and the same writers, with the creation time pinned.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from typer.testing import CliRunner

import torchkeep as tk
import torchkeep.distributed as tkd
from torchkeep import kinds
from torchkeep.cli import app
from torchkeep.convert import convert, input_size, parse_size, read_tree
from torchkeep.errors import FileChecksumError, MissingShardError

convert_mod = sys.modules["torchkeep.convert"]  # torchkeep.convert is also the function's name
runner = CliRunner()
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _pinned_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")


def _saved(path: Path) -> Path:
    """Model + optimizer + epoch, with per-rank RNG state, NumPy, tuples and odd dtypes and shapes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    emb = torch.nn.Embedding(10, 3).to(torch.bfloat16)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = {
        "model": model,
        "optimizer": opt,
        "emb": emb,
        "epoch": 3,
        "rng": tk.RNGState(),
        "arr": np.arange(5),
        "cfg": {"lr": 0.1, "betas": (0.9, 0.99)},
        "extra": [torch.arange(3), torch.zeros(0, 4), torch.tensor(True)],
    }
    return tkd.save(state, path, metadata={"run": "a"}, durable=False)


def _whole(src: Path, dst: Path, *, to: str | None = None, max_shard_size: int | None = None) -> Path:
    """What convert wrote before streaming: the whole tree loaded, then written."""
    tree, user = read_tree(src)
    fmt = convert_mod._format_for(dst, to)
    found = kinds.detect(src)
    return convert_mod._convert_tree(found, dst, fmt, parse_size(max_shard_size), None, tree, user, None)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


class _LoadSpy:
    """Records the keys and bytes of every ``dcp.load`` call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[dict[str, int]] = []
        real = dcp.load

        def spy(state_dict, *args, **kwargs):
            self.calls.append({k: t.numel() * t.element_size() for k, t in state_dict.items()})
            return real(state_dict, *args, **kwargs)

        monkeypatch.setattr(dcp, "load", spy)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"to": "safetensors"}, {"max_shard_size": 600}, {"to": "safetensors", "max_shard_size": 64}],
    ids=["torchkeep", "safetensors", "torchkeep-sharded", "safetensors-sharded"],
)
@pytest.mark.parametrize("max_memory", [None, 64], ids=["default", "64B"])
def test_output_is_byte_for_byte_the_whole_tree_output(tmp_path: Path, kwargs: dict, max_memory: int | None) -> None:
    src = _saved(tmp_path / "ck")
    (tmp_path / "whole").mkdir()
    (tmp_path / "stream").mkdir()
    ref = _whole(src, tmp_path / "whole" / "model.safetensors", **kwargs)
    out = convert(src, tmp_path / "stream" / "model.safetensors", max_memory=max_memory, **kwargs)
    assert out.name == ref.name
    assert _files(tmp_path / "stream") == _files(tmp_path / "whole")
    if "max_shard_size" in kwargs:
        assert len(list((tmp_path / "stream").iterdir())) > 2  # really sharded
    if not kwargs:
        tree = tk.load(out)
        assert tree["epoch"] == 3 and tree["cfg"]["betas"] == (0.9, 0.99) and tk.open(out).metadata == {"run": "a"}
        assert tree["emb"]["weight"].dtype == torch.bfloat16 and tree["extra"][1].shape == (0, 4)
        assert set(tree["rng"]) >= {"python", "numpy", "torch"}


def test_tensors_larger_than_the_budget_are_read_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    state = {"model": {"big": torch.randn(64, 64), "mid": torch.randn(32, 32), "small": torch.randn(8)}, "epoch": 1}
    src = tkd.save(state, tmp_path / "ck", durable=False)
    ref = _whole(src, tmp_path / "whole.safetensors")
    spy = _LoadSpy(monkeypatch)
    out = convert(src, tmp_path / "stream.safetensors", max_memory="8KiB")  # batches of 4 KiB
    assert out.read_bytes() == ref.read_bytes()
    assert sorted(k for call in spy.calls for k in call) == ["model/big", "model/mid", "model/small"]
    for call in spy.calls:
        assert sum(call.values()) <= 4096 or len(call) == 1
    assert {"model/big": 16384} in spy.calls  # 16 KiB, alone


def test_many_small_tensors_are_read_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = {"model": {f"p{i}": torch.full((16,), float(i)) for i in range(300)}, "step": 7}
    src = tkd.save(state, tmp_path / "ck", durable=False)
    ref = _whole(src, tmp_path / "whole.safetensors", to="safetensors")
    spy = _LoadSpy(monkeypatch)
    out = convert(src, tmp_path / "stream.safetensors", to="safetensors", max_memory="4KiB")  # 32 tensors a batch
    assert out.read_bytes() == ref.read_bytes()
    assert len(spy.calls) == 10  # 300 tensors of 64 bytes in batches of 2 KiB
    assert all(sum(call.values()) <= 2048 for call in spy.calls)
    assert sorted(k for call in spy.calls for k in call) == sorted(f"model/p{i}" for i in range(300))


def test_weights_only_reads_only_the_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _saved(tmp_path / "ck")
    spy = _LoadSpy(monkeypatch)
    out = convert(src, tmp_path / "weights.safetensors", to="safetensors")
    assert sorted(tk.load(out)) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    assert all(k.startswith("model/") for call in spy.calls for k in call)  # the optimizer state is never read


@pytest.mark.parametrize("to", [None, "safetensors"])
def test_progress_adds_up_to_the_input_size(tmp_path: Path, to: str | None) -> None:
    src = _saved(tmp_path / "ck")
    seen: list[int] = []
    convert(src, tmp_path / "out.safetensors", to=to, max_memory=256, progress=seen.append)
    assert len(seen) > 3 and all(n > 0 for n in seen)
    assert sum(seen) == input_size(src)
    manifest = json.loads((src / "torchkeep-manifest.json").read_text())
    assert input_size(src) > sum(e["bytes"] for e in manifest["files"].values())  # verified, then gathered


@pytest.mark.parametrize("existing", [False, True])
def test_a_corrupt_shard_is_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    src = _saved(tmp_path / "ck")
    shard = src / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    if existing:
        (out / "model.safetensors").write_bytes(b"old")
    spy = _LoadSpy(monkeypatch)
    with pytest.raises(FileChecksumError, match=r"__0_0\.distcp"):
        convert(src, out / "model.safetensors")
    assert spy.calls == []  # refused by the manifest check, before DCP read anything
    assert _files(out) == ({"model.safetensors": b"old"} if existing else {})  # no output, no temp file
    (src / "tree.safetensors").unlink()
    with pytest.raises(MissingShardError, match=r"tree\.safetensors"):
        convert(src, out / "model.safetensors", to="safetensors")
    assert _files(out) == ({"model.safetensors": b"old"} if existing else {})


def test_a_failure_while_gathering_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _saved(tmp_path / "ck")
    out = tmp_path / "out"
    out.mkdir()

    def boom(*args, **kwargs):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(dcp, "load", boom)
    with pytest.raises(OSError, match="I/O error"):
        convert(src, out / "model.safetensors")
    assert _files(out) == {}


def test_other_outputs_still_load_the_whole_tree(tmp_path: Path) -> None:
    src = _saved(tmp_path / "ck")
    pt = convert(src, tmp_path / "legacy.pt")
    tree = torch.load(pt, weights_only=False)  # our own file; it holds a NumPy array
    assert tree["epoch"] == 3 and torch.equal(
        tree["model"]["1.bias"], tk.load(convert(src, tmp_path / "a.safetensors"))["model"]["1.bias"]
    )


def test_cli_max_memory(tmp_path: Path) -> None:
    src = _saved(tmp_path / "ck")
    api = convert(src, tmp_path / "api.safetensors")
    result = runner.invoke(
        app, ["convert", str(src), str(tmp_path / "cli.safetensors"), "--max-memory", "1KiB", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["bytes"] == api.stat().st_size
    assert (tmp_path / "cli.safetensors").read_bytes() == api.read_bytes()
    bad = runner.invoke(app, ["convert", str(src), str(tmp_path / "x.safetensors"), "--max-memory", "lots"])
    assert bad.exit_code == 2 and "--max-memory" in bad.output  # the flag, not the keyword
    assert not (tmp_path / "x.safetensors").exists()


_MEASURE = textwrap.dedent(
    """
    import json, sys
    import torch
    import torchkeep as tk
    import torchkeep.distributed  # noqa: F401 - imported before the baseline, as DCP's own modules
    from torchkeep.convert import convert, read_tree
    from torchkeep.dcp import read_metadata

    def peak_rss():  # VmHWM: this process image's peak; ru_maxrss keeps the forking parent's across exec
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

    mode, src, dst = sys.argv[1:4]
    read_metadata(src)  # the modules unpickling DCP metadata imports, before the baseline
    base = peak_rss()
    if mode == "stream":
        convert(src, dst, max_memory="64MiB")
    else:  # the whole-tree path
        tree, user = read_tree(src)
        tk.save(tree, dst, metadata=user or None)
    peak = peak_rss()
    print(json.dumps({"grew": (peak - base) * 1024}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads peak RSS from /proc (Linux)")
def test_peak_memory_is_bounded_by_max_memory_not_the_model(tmp_path: Path) -> None:
    mib = 1 << 20
    state = {"model": {f"layer{i}.weight": torch.full((1024, 4096), float(i)) for i in range(25)}, "epoch": 1}
    model_bytes = 25 * 16 * mib  # 400 MiB
    src = tkd.save(state, tmp_path / "ck", durable=False)
    del state

    def grew(mode: str) -> int:
        # the package where this process found it (an install, or a source tree on PYTHONPATH)
        package_root = str(Path(tk.__file__).resolve().parent.parent)
        env = {"SOURCE_DATE_EPOCH": "1700000000", "PATH": "/usr/bin:/bin", "PYTHONPATH": package_root}
        done = subprocess.run(
            [sys.executable, "-c", _MEASURE, mode, str(src), str(tmp_path / f"{mode}.safetensors")],
            capture_output=True,
            text=True,
            timeout=100,
            env=env,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])["grew"]

    whole, stream = grew("whole"), grew("stream")
    assert whole >= model_bytes, whole / mib
    assert stream < 128 * mib, stream / mib  # 64 MiB asked; measured ~67 MiB
    assert (tmp_path / "stream.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()

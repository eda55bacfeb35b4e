"""``tk.load(path, mmap=True)``: tensors that are views of a private map of the file, checked first.

What is pinned here: every checksum is compared over the mapped bytes before any tensor is made;
the tensors live in a copy-on-write map of the file (not in fresh memory); writes never reach the
file; a file replaced by rename leaves them as loaded, one rewritten in place shows through (the
documented limit); a file shorter than its header is a typed error, never SIGBUS; and a load
takes almost no anonymous memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from damage import flip
from safetensors.torch import save_file

import torchkeep as tk
from torchkeep import hashing, zerocopy
from torchkeep.errors import ChecksumMismatchError, CorruptCheckpointError, InvalidArgumentError
from torchkeep.headers import HeaderFile

linux_only = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")


def _maps_of(path: Path) -> list[tuple[int, int, str]]:
    """``(start, end, perms)`` of this process's mappings of ``path``'s file."""
    out = []
    want = os.stat(path).st_ino
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and int(parts[4]) == want and parts[5] == str(path.resolve()):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi, parts[1]))
    return out


def _in_private_map(t: torch.Tensor, maps: list[tuple[int, int, str]]) -> bool:
    ptr = t.data_ptr()
    return any(lo <= ptr and ptr + t.nbytes <= hi and perms.endswith("p") for lo, hi, perms in maps)


def _data_offset(path: Path, key: str) -> int:
    with HeaderFile(path) as hf:
        return hf.header.size + hf.spec(key).start


def _tree() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    tree: dict[str, Any] = {
        "f32": torch.randn(64, 33, generator=g),
        "f64": torch.randn(17, generator=g, dtype=torch.float64),
        "f16": torch.randn(5, 7, generator=g).half(),
        "bf16": torch.randn(300, generator=g).bfloat16(),
        "i64": torch.arange(-50, 50),
        "i8": torch.arange(-128, 127, dtype=torch.int8),
        "u8": torch.arange(0, 255, dtype=torch.uint8).reshape(5, 51),
        "bool": torch.rand(99, generator=g) > 0.5,
        "c64": torch.randn(9, generator=g, dtype=torch.complex64),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0),
        "empty2d": torch.empty(3, 0, dtype=torch.int32),
        "epoch": 7,
    }
    for name in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"):
        dt = getattr(torch, name, None)
        if dt is not None:
            tree[name] = torch.randn(40, generator=g).clamp(-8, 8).abs().mul(3).to(dt)
    return tree


@linux_only
def test_tensors_are_views_of_a_private_map_of_the_file(tmp_path: Path, same_tree: Callable) -> None:
    want = _tree()
    p = tk.save(want, tmp_path / "c.safetensors")
    got = tk.load(p, mmap=True)
    same_tree(got, want)
    maps = _maps_of(p)
    assert maps, "the file is not mapped"
    for k, t in got.items():
        if isinstance(t, torch.Tensor) and t.numel():
            assert _in_private_map(t, maps), k
            # a storage of its own bytes, not one storage for the whole file
            assert t.untyped_storage().nbytes() == t.nbytes, k


@linux_only
def test_the_default_load_copies(tmp_path: Path) -> None:
    p = tk.save({"w": torch.ones(1000)}, tmp_path / "c.safetensors")
    got = tk.load(p)
    assert not _in_private_map(got["w"], _maps_of(p))


def test_tied_weights_stay_tied(tmp_path: Path) -> None:
    w = torch.randn(8, 4)
    got = tk.load(tk.save({"a": w, "b": w, "row": w[2]}, tmp_path / "c.safetensors"), mmap=True)
    assert got["a"].data_ptr() == got["b"].data_ptr() == got["row"].data_ptr() - 2 * 4 * 4
    assert torch.equal(got["row"], w[2])


def test_no_tensors_and_only_empty_tensors(tmp_path: Path) -> None:
    assert tk.load(tk.save({"epoch": 3}, tmp_path / "a.safetensors"), mmap=True) == {"epoch": 3}
    got = tk.load(tk.save({"e": torch.empty(0, 4)}, tmp_path / "b.safetensors"), mmap=True)
    assert got["e"].shape == (0, 4)
    p = tmp_path / "plain.safetensors"
    save_file({"e": torch.empty(0)}, str(p))
    assert tk.load(p, mmap=True)["e"].shape == (0,)


_ODD = {
    "u8": ("U8", torch.tensor([7], dtype=torch.uint8)),
    "f32": ("F32", torch.tensor([1.5, -2.0, 3.25, 1e30])),
    "f64": ("F64", torch.tensor([2.0**-30, -7.0, 1e300], dtype=torch.float64)),
    "bf16": ("BF16", torch.tensor([1.0, -0.5, 3.0]).bfloat16()),
}


def _odd_file(path: Path, make_safetensors: Any) -> Path:
    """A hand-made safetensors file whose F32/F64/BF16 tensors start at odd byte offsets, then an aligned F32."""
    head: dict[str, Any] = {}
    data = b""
    for name, (st, t) in _ODD.items():
        raw = t.view(torch.uint8).numpy().tobytes()
        head[name] = {"dtype": st, "shape": list(t.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    pad = -len(data) % 4
    head["pad"] = {"dtype": "U8", "shape": [pad], "data_offsets": [len(data), len(data) + pad]}
    data += b"\0" * pad
    raw = torch.tensor([42.0, 43.0]).numpy().tobytes()
    head["aligned"] = {"dtype": "F32", "shape": [2], "data_offsets": [len(data), len(data) + len(raw)]}
    data += raw
    body = json.dumps(head).encode()
    body += b" " * (-(8 + len(body)) % 8)  # the data section starts on a multiple of 8
    path.write_bytes(make_safetensors(body, data))
    return path


@linux_only
def test_misaligned_tensors_of_a_foreign_file_are_copied_correctly(tmp_path: Path, make_safetensors: Any) -> None:
    p = _odd_file(tmp_path / "odd.safetensors", make_safetensors)
    got = tk.load(p, mmap=True)
    for name, (_, t) in _ODD.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert got["aligned"].tolist() == [42.0, 43.0]
    maps = _maps_of(p)
    assert _in_private_map(got["aligned"], maps) and _in_private_map(got["u8"], maps)
    for name in ("f32", "f64", "bf16"):
        assert got[name].data_ptr() % got[name].element_size() == 0, name  # its own memory
        assert not _in_private_map(got[name], maps), name


def test_misaligned_tensors_are_checked_in_their_copies(tmp_path: Path, make_safetensors: Any) -> None:
    """With checksums (set on the parsed header here: torchkeep never writes misaligned tensors)."""
    from torchkeep.format.header import digest

    p = _odd_file(tmp_path / "odd.safetensors", make_safetensors)
    with HeaderFile(p) as hf:
        data = p.read_bytes()
        hf.header.checksums = {
            s.name: digest(data[hf.header.size + s.start : hf.header.size + s.end]) for s in hf.header.tensors.values()
        }
        assert torch.equal(zerocopy.map_tensors(hf)["f64"], _ODD["f64"][1])
        hf.header.checksums["f64"] = "0" * 32
        with pytest.raises(ChecksumMismatchError) as e:
            zerocopy.map_tensors(hf)
        assert e.value.key == "f64"


@pytest.mark.parametrize("key", ["f32", "bf16", "bool", "scalar", "i64"])
def test_a_flipped_bit_in_any_tensor_is_refused_and_nothing_is_returned(tmp_path: Path, key: str) -> None:
    p = tk.save(_tree(), tmp_path / "c.safetensors")
    flip(p, _data_offset(p, key))
    with pytest.raises(ChecksumMismatchError) as e:
        tk.load(p, mmap=True)
    assert e.value.key == key and e.value.path == str(p)
    assert str(p) in str(e.value) and key in str(e.value)
    if Path("/proc/self/maps").exists():
        assert _maps_of(p) == []  # the map is released, not left to the traceback


def test_checksums_are_checked_before_any_tensor_is_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tk.save({"a": torch.randn(300_000), "b": torch.randn(10)}, tmp_path / "c.safetensors")
    events: list[str] = []
    real_result, real_frombuffer = hashing.Digests.result, torch.frombuffer

    def result(self: Any) -> list[str]:
        events.append("hashed")
        return real_result(self)

    def frombuffer(*a: Any, **k: Any) -> torch.Tensor:
        events.append("tensor")
        return real_frombuffer(*a, **k)

    monkeypatch.setattr(hashing.Digests, "result", result)
    monkeypatch.setattr(zerocopy.torch, "frombuffer", frombuffer)
    tk.load(p, mmap=True)
    assert events == ["hashed", "tensor", "tensor"]
    events.clear()
    flip(p, _data_offset(p, "b"))
    with pytest.raises(ChecksumMismatchError):
        tk.load(p, mmap=True)
    assert events == ["hashed"]


def test_verify_false_does_not_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    want = torch.randn(1000)
    p = tk.save({"w": want}, tmp_path / "c.safetensors")

    class NoHashing:
        def __init__(self, *a: Any, **k: Any) -> None:
            raise AssertionError("hashed")

    monkeypatch.setattr(hashing, "Digests", NoHashing)
    assert torch.equal(tk.load(p, mmap=True, verify=False)["w"], want)
    with pytest.raises(AssertionError, match="hashed"):  # the same load verifies by default
        tk.load(p, mmap=True)


def test_verify_false_hands_out_damaged_bytes(tmp_path: Path) -> None:
    p = tk.save({"w": torch.zeros(100, dtype=torch.uint8)}, tmp_path / "c.safetensors")
    flip(p, _data_offset(p, "w") + 3)
    assert tk.load(p, mmap=True, verify=False)["w"][3].item() == 0x10


def test_writes_to_the_tensors_never_reach_the_file(tmp_path: Path) -> None:
    want = torch.randn(50_000)
    p = tk.save({"w": want}, tmp_path / "c.safetensors")
    before = p.read_bytes()
    got = tk.load(p, mmap=True)
    got["w"].fill_(0.0)
    got["w"].add_(1.0)
    assert torch.equal(got["w"], torch.ones(50_000))
    assert p.read_bytes() == before
    assert tk.verify(p)["ok"]
    assert torch.equal(tk.load(p, mmap=True)["w"], want)


def test_a_file_replaced_by_rename_leaves_loaded_tensors_as_they_were(tmp_path: Path) -> None:
    old, new = torch.randn(20_000), torch.randn(20_000)
    p = tk.save({"w": old}, tmp_path / "c.safetensors")
    got = tk.load(p, mmap=True)
    tk.save({"w": new}, p)  # torchkeep replaces files by rename: the map keeps the old inode
    assert torch.equal(got["w"], old)
    assert torch.equal(tk.load(p, mmap=True)["w"], new)


def test_an_in_place_rewrite_shows_through_a_map_and_not_through_the_default_load(tmp_path: Path) -> None:
    """The documented limit of mmap=True: another tool rewriting the same inode is seen."""
    p = tk.save({"w": torch.zeros(4096, dtype=torch.uint8)}, tmp_path / "c.safetensors")
    mapped, copied = tk.load(p, mmap=True), tk.load(p)
    with open(p, "r+b") as f:  # what cp or rsync --inplace do
        f.seek(_data_offset(p, "w"))
        f.write(b"\xff" * 16)
    assert mapped["w"][:16].tolist() == [255] * 16
    assert copied["w"].sum().item() == 0


def test_a_truncated_file_is_a_typed_error(tmp_path: Path) -> None:
    p = tk.save({"w": torch.randn(100_000)}, tmp_path / "c.safetensors")
    os.truncate(p, p.stat().st_size - 4096)
    with pytest.raises(CorruptCheckpointError):
        tk.load(p, mmap=True)


def test_a_file_truncated_after_it_was_opened_is_refused_before_mapping(tmp_path: Path) -> None:
    """Checked just before mapping: touching a page past the end would raise SIGBUS."""
    p = tk.save({"w": torch.randn(100_000)}, tmp_path / "c.safetensors")
    with HeaderFile(p) as hf:
        os.truncate(p, p.stat().st_size - 4096)
        with pytest.raises(CorruptCheckpointError, match="shorter than"):
            zerocopy.map_tensors(hf)


@linux_only
def test_plain_safetensors_file_maps_unverified_as_the_copying_load_reads_it(tmp_path: Path) -> None:
    want = {"a": torch.randn(300, 4), "b": torch.arange(10)}
    p = tmp_path / "plain.safetensors"
    save_file(want, str(p))
    got = tk.load(p, mmap=True)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert all(_in_private_map(t, _maps_of(p)) for t in got.values())
    flip(p, _data_offset(p, "b"))  # no checksums to catch it: both loads return the same bytes
    assert torch.equal(tk.load(p, mmap=True)["b"], tk.load(p)["b"])


@linux_only
def test_shard_sets_map_every_shard(tmp_path: Path, same_tree: Callable) -> None:
    want = {"model": {f"l{i}.weight": torch.randn(64, 64) for i in range(6)}, "step": 10}
    src = tk.save(want, tmp_path / "c.safetensors")
    index = tk.convert(src, tmp_path / "sharded" / "model.safetensors", max_shard_size=40_000)
    shards = sorted((tmp_path / "sharded").glob("*-of-*.safetensors"))
    assert len(shards) > 1
    got = tk.load(index, mmap=True)
    same_tree(got, want)
    maps = [m for s in shards for m in _maps_of(s)]
    assert all(_in_private_map(t, maps) for t in got["model"].values())
    with tk.open(shards[-1]) as ck:
        first = ck.keys()[0]
    flip(shards[-1], _data_offset(shards[-1], first))
    with pytest.raises(ChecksumMismatchError) as e:
        tk.load(index, mmap=True)
    assert e.value.path == str(shards[-1])


def test_other_kinds_and_file_objects_are_refused(tmp_path: Path) -> None:
    legacy = tmp_path / "old.pt"
    torch.save({"w": torch.ones(2)}, legacy)
    with pytest.raises(InvalidArgumentError, match=r"torch\.save \(zip\).*mmap=True applies to"):
        tk.load(legacy, mmap=True)
    p = tk.save({"w": torch.ones(2)}, tmp_path / "c.safetensors")
    with open(p, "rb") as f, pytest.raises(InvalidArgumentError, match="file object"):
        tk.load(f, mmap=True)
    shards = tmp_path / "bin"
    shards.mkdir()
    torch.save({"w": torch.ones(2)}, shards / "pytorch_model-00001-of-00001.bin")
    (shards / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"w": "pytorch_model-00001-of-00001.bin"}})
    )
    with pytest.raises(InvalidArgumentError, match=r"torch\.save \(zip\) checkpoint \(its shards\)"):
        tk.load(shards, mmap=True)


def test_mmap_takes_a_bool_or_none(tmp_path: Path) -> None:
    p = tk.save({"w": torch.ones(2)}, tmp_path / "c.safetensors")
    with pytest.raises(tk.errors.ArgumentTypeError, match="mmap must be True or False, not str"):
        tk.load(p, mmap="yes")
    assert torch.equal(tk.load(p, mmap=None)["w"], torch.ones(2))  # torch.load's default: a copying load
    assert torch.equal(tk.load(p, mmap=np.True_)["w"], torch.ones(2)) and torch.equal(
        tk.load(p, mmap=0)["w"], torch.ones(2)
    )


def test_map_location_off_the_cpu_copies_the_verified_map(tmp_path: Path) -> None:
    p = tk.save({"w": torch.randn(10)}, tmp_path / "c.safetensors")
    got = tk.load(p, mmap=True, map_location="meta")
    assert got["w"].device.type == "meta" and got["w"].shape == (10,)
    moved = tk.load(p, mmap=True, map_location=lambda t, dev: t.double())
    assert moved["w"].dtype == torch.float64


@linux_only
def test_a_zero_copy_load_takes_almost_no_anonymous_memory(tmp_path: Path) -> None:
    """In a fresh process: a 64 MiB file loaded and every byte touched; RssAnon, not file-backed pages."""
    p = tk.save({f"w{i}": torch.randn(1 << 20) for i in range(16)}, tmp_path / "c.safetensors")
    probe = textwrap.dedent(
        """
        import sys, torch, torchkeep as tk
        def anon():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        torch.set_num_threads(1)
        tk.load(sys.argv[1], mmap=True)  # warm up the code paths
        out = []
        for mmap in (True, False):
            before = anon()
            sd = tk.load(sys.argv[1], mmap=mmap)
            total = sum(float(t.sum()) for t in sd.values())
            out.append(anon() - before)
            del sd
        print(out[0], out[1])
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(tk.__file__).parent.parent)}
    proc = subprocess.run([sys.executable, "-c", probe, str(p)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    mapped, copied = map(int, proc.stdout.split())
    size = p.stat().st_size
    assert copied > 0.9 * size  # the probe sees a copying load
    assert mapped < 0.2 * size


@pytest.mark.parametrize(
    ("sizes_mib", "want"),
    [([3, 7], [[7], [3]]), ([4, 1, 1, 1, 1], [[4], [1, 1, 1, 1]]), ([2] * 6, [[2, 2, 2], [2, 2, 2]])],
)
def test_the_hash_pass_shares_large_tensors_evenly_between_threads(sizes_mib: list[int], want: list[list[int]]) -> None:
    """A buffer is one digest stream (never split), so the split is by whole buffers: largest first."""
    from concurrent.futures import Future

    from torchkeep.format.header import digest
    from torchkeep.hashing import Digests

    tasks: list[list[int]] = []

    class Recorder:
        def submit(self, fn: Callable[[list[int]], list[str]], indices: list[int]) -> Future[list[str]]:
            tasks.append([bufs[i].nbytes >> 20 for i in indices])
            f: Future[list[str]] = Future()
            f.set_result(fn(indices))
            return f

    bufs = [memoryview(bytes([i]) * (n << 20)) for i, n in enumerate(sizes_mib)]
    got = Digests(bufs, Recorder(), threads=2).result()  # type: ignore[arg-type]
    assert got == [digest(b) for b in bufs]
    assert sorted(tasks, key=sum, reverse=True) == want

"""Damaged files: every flipped bit is caught, truncations and malformed headers are refused fast."""

from __future__ import annotations

import gc
import json
import mmap
import os
import struct
import sys
import time
import tracemalloc
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

import torchkeep as tk
from torchkeep.errors import ChecksumMismatchError, CorruptCheckpointError, UnsupportedDtypeError


def _small_tree() -> dict[str, Any]:
    return {
        "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor([1, -2], dtype=torch.int16),
        "m": torch.tensor([True, False, True]),
        "e": torch.zeros(0),
        "epoch": 3,
        "cfg": {"lr": 0.1, "betas": (0.9, 0.999)},
    }


@pytest.fixture
def small(tmp_path: Path) -> Path:
    """A small torchkeep file (about 1 KB: a ~900-byte header and 34 bytes of data)."""
    tree = _small_tree()
    p = tk.save(tree, tmp_path / "small.safetensors")
    # a length whose low byte is 0x80 hits a detection bug that has its own test (test_format)
    while p.read_bytes()[0] == 0x80:
        tree["pad"] = tree.get("pad", "") + "x" * 8
        p = tk.save(tree, tmp_path / "small.safetensors")
    return p


def _layout(path: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    head = json.loads(data[8 : 8 + n])
    head.pop("__metadata__")
    return 8 + n, {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in head.items()}


def _flip(path: Path, bit: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        byte = os.pread(fd, 1, bit // 8)[0]
        os.pwrite(fd, bytes([byte ^ (1 << (bit % 8))]), bit // 8)
    finally:
        os.close(fd)


def _outcome(path: Path, **kw: Any) -> tuple[str, str | None]:
    try:
        tk.load(path, **kw)
    except ChecksumMismatchError as e:
        return "ChecksumMismatchError", e.key
    except Exception as e:
        return type(e).__name__, None
    return "loaded", None


def test_every_single_bit_flip_is_detected(small: Path) -> None:
    # Every bit of the whole file, not a sample: the file is ~1 KB, so this is ~8,000 loads
    # (a few seconds), and it covers the length field, the digest itself, the JSON, the
    # padding and every data byte.
    original = small.read_bytes()
    header_size, spans = _layout(small)
    assert sum(e - s for s, e in spans.values()) == len(original) - header_size
    wrong: dict[tuple[str, str | None, str], list[int]] = defaultdict(list)
    for bit in range(len(original) * 8):
        _flip(small, bit)
        kind, key = _outcome(small)
        _flip(small, bit)
        pos = bit // 8
        want = "<header>" if pos < header_size else next(k for k, (s, e) in spans.items() if s <= pos < e)
        if (kind, key) != ("ChecksumMismatchError", want):
            region = "length field" if pos < 8 else "header" if pos < header_size else f"data of {want!r}"
            wrong[(kind, key, region)].append(bit)
    assert small.read_bytes() == original
    report = {f"{kind} (key={key}) in {region}": bits for (kind, key, region), bits in wrong.items()}
    assert not report, f"bit flips not reported as ChecksumMismatchError naming the right place: {report}"


def test_length_flip_that_looks_like_a_pickle_is_detected(tmp_path: Path) -> None:
    # When the header length is a multiple of 256, flipping the top bit of its first byte
    # gives 0x80, the pickle PROTO opcode: still a damaged torchkeep file, not a legacy pickle.
    tree = {**_small_tree(), "pad": ""}
    n0 = struct.unpack("<Q", tk.save(tree, tmp_path / "p.safetensors").read_bytes()[:8])[0]
    tree["pad"] = "x" * (-n0 % 256)  # each "x" is one more header byte
    p = tk.save(tree, tmp_path / "p.safetensors")
    assert p.read_bytes()[0] == 0
    _flip(p, 7)
    assert _outcome(p) == ("ChecksumMismatchError", "<header>")


def test_data_flip_names_the_tensor(small: Path) -> None:
    _, spans = _layout(small)
    start, _ = spans["w"]
    _flip(small, start * 8 + 3)
    with pytest.raises(ChecksumMismatchError) as ei:
        tk.load(small)
    assert ei.value.key == "w" and "'w'" in str(ei.value) and str(small) in str(ei.value)
    assert ei.value.expected != ei.value.actual


def test_header_flip_names_the_header(small: Path) -> None:
    _flip(small, 8 * 60 + 1)
    with pytest.raises(ChecksumMismatchError) as ei:
        tk.load(small)
    assert ei.value.key == "<header>" and str(small) in str(ei.value)


def test_verify_false_skips_data_checksums(small: Path) -> None:
    _, spans = _layout(small)
    start, _ = spans["w"]
    _flip(small, start * 8)  # lowest bit of w[0, 0] == 0.0: becomes the smallest subnormal
    got = tk.load(small, verify=False)
    want = _small_tree()["w"]
    assert got["w"].view(torch.int32)[0, 0] == 1
    assert torch.equal(got["w"].reshape(-1)[1:], want.reshape(-1)[1:])
    assert got["epoch"] == 3
    with tk.open(small, verify=False) as ck:
        ck.get("w")
    with pytest.raises(ChecksumMismatchError):
        tk.load(small, verify=True)


def test_restore_of_a_damaged_tensor_is_refused_and_says_targets_were_partly_overwritten(tmp_path: Path) -> None:
    # restore reads straight into the targets' tensors, verifying as it reads: the damage is
    # refused before restore returns, and the message says the targets hold part of the file
    model = torch.nn.Linear(3, 2)
    p = tk.save({"model": model}, tmp_path / "m.safetensors")
    while p.read_bytes()[0] == 0x80:
        p = tk.save({"model": model, "pad": "x" * 8}, tmp_path / "m.safetensors")
    _, spans = _layout(p)
    _flip(p, spans["model/weight"][0] * 8 + 30)
    fresh = torch.nn.Linear(3, 2)
    with pytest.raises(ChecksumMismatchError, match="partly overwritten; restore another checkpoint") as err:
        tk.restore(p, {"model": fresh})
    assert err.value.key == "model/weight"


# -- truncated, empty, garbage ---------------------------------------------------------------------


def _assert_corrupt(path: Path, **kw: Any) -> CorruptCheckpointError:
    with pytest.raises(CorruptCheckpointError) as ei:
        tk.load(path, **kw)
    assert ei.value.path == str(path)
    assert str(path) in str(ei.value)
    return ei.value


def test_truncated_files(small: Path) -> None:
    data = small.read_bytes()
    header_size, _ = _layout(small)
    cuts = sorted({1, 4, 7, 8, 9, 30, header_size // 2, header_size - 1, header_size, header_size + 1, len(data) - 1})
    kinds = {}
    for cut in cuts:
        small.write_bytes(data[:cut])
        kinds[cut] = type(_assert_corrupt(small)).__name__
        with pytest.raises(CorruptCheckpointError):
            tk.load(small, verify=False)
    # a file cut inside its data section says so (not a checksum error on an intact header)
    assert kinds[len(data) - 1] == "CorruptCheckpointError"


def test_appended_bytes_are_refused(small: Path) -> None:
    small.write_bytes(small.read_bytes() + b"\0" * 8)
    err = _assert_corrupt(small)
    assert "data section" in str(err)


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    assert "empty" in str(_assert_corrupt(p))


@pytest.mark.parametrize(
    "content",
    [b"hello, this is not a checkpoint at all\n" * 5, b"\x01\x02\x03", b"{}", os.urandom(0) + bytes(range(1, 64))],
    ids=["text", "3 bytes", "json", "bytes"],
)
def test_garbage_file(content: bytes, tmp_path: Path) -> None:
    p = tmp_path / "garbage.safetensors"
    p.write_bytes(content)
    _assert_corrupt(p)


def test_refused_file_is_closed_exactly_once(tmp_path: Path) -> None:
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    seen: list[Any] = []
    old, sys.unraisablehook = sys.unraisablehook, seen.append
    try:
        for _ in range(5):
            with pytest.raises(CorruptCheckpointError):
                tk.open(p)
            with pytest.raises(CorruptCheckpointError):
                tk.load(p)
        gc.collect()
    finally:
        sys.unraisablehook = old
    # a second close() from __del__ would fail (EBADF) or, worse, close another file's descriptor
    assert not seen, [str(u.exc_value) for u in seen]
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) == fds


def test_directory_is_not_a_checkpoint(tmp_path: Path) -> None:
    d = tmp_path / "dir.safetensors"
    d.mkdir()
    with pytest.raises(tk.errors.UnsupportedSourceError, match="holds no checkpoint") as err:
        tk.load(d)
    assert isinstance(err.value, ValueError)  # never a bare IsADirectoryError


@pytest.mark.parametrize("length", [2**63, 10**12, 2**64 - 1, 100_000_001])
def test_header_length_bomb_fails_fast_without_allocating(length: int, tmp_path: Path) -> None:
    p = tmp_path / "bomb.safetensors"
    p.write_bytes(struct.pack("<Q", length) + b'{"a":1}' + b" ")
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        err = _assert_corrupt(p)
    finally:
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert elapsed < 1.0
    assert peak < 5_000_000, f"{peak} bytes allocated to refuse a {p.stat().st_size}-byte file"
    assert str(length) in str(err)


# -- malformed headers (plain safetensors layout) ----------------------------------------------------------


def _f32(name: str, shape: list[int], start: int, end: int) -> dict[str, Any]:
    return {name: {"dtype": "F32", "shape": shape, "data_offsets": [start, end]}}


MALFORMED = {
    "overlapping offsets": ({**_f32("a", [2], 0, 8), **_f32("b", [2], 4, 12)}, 12, "overlap"),
    "a hole": ({**_f32("a", [2], 0, 8), **_f32("b", [2], 12, 20)}, 20, "hole"),
    "wrong size for shape": (_f32("a", [3], 0, 8), 8, "shape"),
    "offsets past the end": (_f32("a", [4], 0, 16), 8, "outside"),
    "reversed offsets": (_f32("a", [0], 8, 0), 8, "outside"),
    "negative offset": (_f32("a", [2], -8, 0), 8, "outside"),
    "float offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}, 8, "data_offsets"),
    "one offset": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, 8, "data_offsets"),
    "negative dim": (_f32("a", [-2], 0, 8), 8, "shape"),
    "bool dim": ({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, 8, "shape"),
    "no dtype": ({"a": {"shape": [2], "data_offsets": [0, 8]}}, 8, "dtype"),
    "entry not an object": ({"a": [1, 2]}, 8, "not an object"),
    "trailing data": (_f32("a", [2], 0, 8), 16, "data section"),
    "metadata int value": ({"__metadata__": {"a": 1}, **_f32("a", [2], 0, 8)}, 8, "__metadata__"),
    "metadata null value": ({"__metadata__": {"a": None}, **_f32("a", [2], 0, 8)}, 8, "__metadata__"),
    "metadata nested": ({"__metadata__": {"a": {"b": "c"}}, **_f32("a", [2], 0, 8)}, 8, "__metadata__"),
    "metadata a list": ({"__metadata__": ["a"], **_f32("a", [2], 0, 8)}, 8, "__metadata__"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_header_is_corrupt(case: str, tmp_path: Path, make_safetensors) -> None:
    head, data_size, words = MALFORMED[case]
    p = tmp_path / "bad.safetensors"
    p.write_bytes(make_safetensors(head, bytes(data_size)))
    err = _assert_corrupt(p)
    assert words in str(err), str(err)


@pytest.mark.parametrize(
    "body",
    [b"{not json}      ", b"[1, 2, 3]       ", b'"just a string" ', b"\xff\xfe{}    ", b"{" * 5000 + b"}" * 5000],
    ids=["not json", "array", "string", "bad utf-8", "deep nesting"],
)
def test_non_json_header_is_corrupt(body: bytes, tmp_path: Path, make_safetensors) -> None:
    p = tmp_path / "bad.safetensors"
    p.write_bytes(make_safetensors(body))
    _assert_corrupt(p)


def test_unknown_dtype_is_unsupported_naming_the_tensor(tmp_path: Path, make_safetensors) -> None:
    p = tmp_path / "dtype.safetensors"
    p.write_bytes(make_safetensors({"layer.w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16)))
    with pytest.raises(UnsupportedDtypeError) as ei:
        tk.load(p)
    assert "layer.w" in str(ei.value) and str(p) in str(ei.value)


def test_malformed_tree_metadata_is_corrupt(tmp_path: Path, make_safetensors) -> None:
    # a file that claims nothing about being torchkeep's but carries a broken skeleton
    head = {"__metadata__": {"torchkeep.tree": '{"T": "missing"}'}, **_f32("a", [2], 0, 8)}
    p = tmp_path / "tree.safetensors"
    p.write_bytes(make_safetensors(head, bytes(8)))
    _assert_corrupt(p)


# -- plain safetensors files ------------------------------------------------------------------------------


def test_plain_safetensors_loads_as_flat_dict(tmp_path: Path, bits) -> None:
    tensors = {
        "model.embed.weight": torch.randn(5, 3),
        "model.head.bias": torch.arange(4, dtype=torch.int64),
        "half": torch.randn(2, 2).to(torch.bfloat16),
        "mask": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(1.5),
    }
    p = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(tensors, str(p), metadata={"format": "pt", "note": "hi"})
    got = tk.load(p)
    assert type(got) is dict and set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and bits(got[k]) == bits(v), k
    with tk.open(p) as ck:
        assert not ck.is_torchkeep and ck.skeleton is None and ck.header.checksums is None
        assert sorted(ck.keys()) == sorted(tensors)
        assert torch.equal(ck.get("model.head.bias"), tensors["model.head.bias"])


def test_plain_safetensors_restore_into_module(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    p = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(p))
    flat = tk.load(p)
    fresh = torch.nn.Linear(3, 2)
    fresh.load_state_dict(flat)
    assert torch.equal(fresh.weight, model.weight)


def test_verify_hashes_across_map_windows_and_finds_a_flip_in_any(tmp_path: Path, monkeypatch) -> None:
    """verify hashes through a sliding memory map: tensors spanning several windows, and several
    tensors in one window, are each checked; a flip anywhere is named."""
    import torchkeep.headers as headers

    monkeypatch.setattr(headers, "_WINDOW", 3 * mmap.ALLOCATIONGRANULARITY)
    tree = {"big": torch.arange(40_000, dtype=torch.float32), **{f"s{i}": torch.full((7,), float(i)) for i in range(5)}}
    p = tk.save(tree, tmp_path / "c.safetensors")
    assert tk.verify(p)["ok"] and tk.verify(p)["bytes_checked"] == sum(t.numel() * 4 for t in tree.values())
    with tk.open(p) as ck:
        base, spans = ck.header.size, {k: (s.start, s.end) for k, s in ck.header.tensors.items()}
    for name in ("big", "s3"):
        start, end = spans[name]
        raw = bytearray(p.read_bytes())
        at = base + (start + end) // 2
        raw[at] ^= 0x10
        bad = tmp_path / f"bad-{name}.safetensors"
        bad.write_bytes(bytes(raw))
        result = tk.verify(bad)
        assert result["ok"] is False and result["key"] == name

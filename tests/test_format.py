"""The file format: golden file, exact header bytes, safetensors compatibility, header decoding."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loadfile import load_file

import torchkeep as tk
from torchkeep.dtypes import DTYPE_TO_ST, ST_TO_DTYPE, dtype_from_name, dtype_name
from torchkeep.errors import ChecksumMismatchError, CorruptCheckpointError, UnsupportedDtypeError
from torchkeep.format.dtypes import ITEMSIZE
from torchkeep.format.header import HeaderBuilder, digest, parse_header

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "golden-v1.safetensors"
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ALLOWED = (CorruptCheckpointError, UnsupportedDtypeError)  # ChecksumMismatchError is a CorruptCheckpointError
#: the dtype strings the safetensors specification defines
SAFETENSORS_DTYPES = {"BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16"}
SAFETENSORS_DTYPES |= {"BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"}


def _load_make_golden() -> Any:
    return load_file("tk_make_golden", FIXTURES / "make_golden.py")


golden = _load_make_golden()


def _split(data: bytes) -> tuple[int, dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n]), data[8 + n :]


def _reader(data: bytes):
    return lambda off, n: data[off : off + n]


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Today's save of the golden tree, with the golden file's creation time."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(golden.CREATED_EPOCH))
    return tk.save(golden.build_tree(), tmp_path / "fresh.safetensors")


# -- golden file ------------------------------------------------------------------------------


def test_golden_file_is_committed_and_small() -> None:
    assert GOLDEN.is_file(), "run python tests/fixtures/make_golden.py once, then commit the file"
    assert GOLDEN.stat().st_size < 20_000


def test_golden_loads_bit_exact(same_tree) -> None:
    tree = tk.load(GOLDEN)
    same_tree(tree, golden.expected_tree())
    # tied tensors come back as one tensor, the view as a view of its base
    assert tree["tied"]["a"] is tree["tied"]["b"]
    assert tree["view"].untyped_storage().data_ptr() == tree["base"].untyped_storage().data_ptr()
    assert tree["view"].stride() == golden.build_tree()["view"].stride()
    assert torch.equal(tree["view"], tree["base"][1:, ::2])


def test_golden_metadata() -> None:
    with tk.open(GOLDEN) as ck:
        meta = ck.header.metadata
        assert ck.is_torchkeep
        assert meta["torchkeep.format"] == "torchkeep/1"
        assert meta["torchkeep.hash"] == "xxh3-128"
        assert meta["torchkeep.created"] == golden.CREATED
        assert meta["format"] == "pt"
        # every tensor of the tree is stored once, by its path in the tree
        assert "model/weight" in ck.keys() and "dtypes/bfloat16" in ck.keys()
        assert ("tied/a" in ck.keys()) != ("tied/b" in ck.keys())
        assert "view" not in ck.keys()


def test_golden_resave_is_byte_identical(fresh: Path) -> None:
    want = GOLDEN.read_bytes()
    _, want_head, _ = _split(want)
    got_raw = fresh.read_bytes()
    _, got_head, _ = _split(got_raw)
    # provenance is not format: versions, and the creation time should SOURCE_DATE_EPOCH be ignored
    prov = {
        k: want_head["__metadata__"][k]
        for k in ("torchkeep.created", "torchkeep.library", "torchkeep.torch")
        if got_head["__metadata__"].get(k) != want_head["__metadata__"][k]
    }
    got = golden.reseal(got_raw, prov)
    if got != want:  # say what moved before failing on the bytes
        _, gh, gd = _split(got)
        _, wh, wd = _split(want)
        gm, wm = gh.pop("__metadata__"), wh.pop("__metadata__")
        assert sorted(gm) == sorted(wm), "metadata keys changed"
        for k in wm:
            assert gm[k] == wm[k], f"metadata {k!r} changed"
        assert gh == wh, "tensor entries changed"
        assert gd == wd, "data section changed"
    assert got == want


def test_source_date_epoch_pins_creation_time(fresh: Path, raw_header) -> None:
    # reproducible files: the golden comparison above then needs no normalising of the time
    _, head = raw_header(fresh)
    assert head["__metadata__"]["torchkeep.created"] == golden.CREATED


def test_golden_maker_is_deterministic(tmp_path: Path) -> None:
    a = golden.reseal(tk.save(golden.build_tree(), tmp_path / "a").read_bytes(), {"torchkeep.created": "x"})
    b = golden.reseal(tk.save(golden.build_tree(), tmp_path / "b").read_bytes(), {"torchkeep.created": "x"})
    assert a == b


@pytest.mark.parametrize("which", ["golden", "fresh"])
def test_safetensors_opens_our_files(which: str, fresh: Path, bits) -> None:
    path = GOLDEN if which == "golden" else fresh
    _, head, _ = _split(path.read_bytes())
    meta = head.pop("__metadata__")
    with tk.open(path) as ck, safetensors.safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(head) == set(ck.keys())
        assert f.metadata() == meta
        for k in f.keys():
            theirs, ours = f.get_tensor(k), ck.get(k)
            assert theirs.dtype == ours.dtype == ST_TO_DTYPE[head[k]["dtype"]], k
            assert list(theirs.shape) == list(ours.shape) == head[k]["shape"], k
            assert bits(theirs) == bits(ours), k
    flat = safetensors.torch.load_file(str(path))
    assert set(flat) == set(head)


@pytest.mark.parametrize("which", ["golden", "fresh"])
def test_header_follows_safetensors_rules(which: str, fresh: Path) -> None:
    path = GOLDEN if which == "golden" else fresh
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert (8 + n) % 8 == 0, "data section must start 8-byte aligned"
    body = data[8 : 8 + n]
    assert body.startswith(b"{")
    text = body.decode("utf-8")
    assert text.rstrip(" ").endswith("}") and set(text[len(text.rstrip(" ")) :]) <= {" "}

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        assert len(keys) == len(set(keys)), f"duplicate keys {keys}"
        return dict(pairs)

    head = json.loads(text, object_pairs_hook=no_duplicates)
    meta = head.pop("__metadata__")
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    entries = sorted(head.items(), key=lambda kv: kv[1]["data_offsets"])
    pos = 0
    for name, e in entries:
        assert set(e) == {"dtype", "shape", "data_offsets"}, name
        assert e["dtype"] in SAFETENSORS_DTYPES, name
        start, end = e["data_offsets"]
        assert start == pos, f"{name}: offsets must be contiguous"
        assert end - start == math.prod(e["shape"]) * ITEMSIZE[e["dtype"]], name
        assert start % ITEMSIZE[e["dtype"]] == 0, f"{name}: misaligned for its dtype"
        pos = end
    assert pos == len(data) - 8 - n, "tensors must cover the data section exactly"


# -- exact bytes of the header layout ----------------------------------------------------------


def test_header_builder_exact_bytes() -> None:
    b = HeaderBuilder([("b", "U8", (3,)), ("w", "F32", (2,))], {"format": "pt", "torchkeep.format": "torchkeep/1"})
    assert [(s.name, s.start, s.end) for s in b.specs] == [("w", 0, 8), ("b", 8, 11)]
    assert b.data_size == 11
    sealed = b.seal(["1" * 32, "2" * 32])
    assert len(sealed) == b.header_size
    assert sealed == EXPECTED_HEADER


#: format v1, byte for byte: length prefix, digest first, metadata in order, checksums last
#: (fixed-width hex in data order), tensors largest element first, space padding to 8.
EXPECTED_HEADER = (
    struct.pack("<Q", 328)
    + b'{"__metadata__":{"torchkeep.header_digest":"fb64dd314ce6cfe53aa0f8cf06bbba82",'
    + b'"format":"pt","torchkeep.format":"torchkeep/1",'
    + b'"torchkeep.checksums":"'
    + b"1" * 32
    + b"2" * 32
    + b'"},'
    + b'"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
    + b'"b":{"dtype":"U8","shape":[3],"data_offsets":[8,11]}}'
    + b" " * 7
)


def test_builder_aligns_every_tensor_to_its_element_size() -> None:
    entries = [(f"t{i}", st, (i % 3 + 1,)) for i, st in enumerate(["BOOL", "F64", "I16", "F32", "U8", "C64", "BF16"])]
    b = HeaderBuilder(entries, {})
    assert [ITEMSIZE[s.dtype] for s in b.specs] == sorted((ITEMSIZE[s.dtype] for s in b.specs), reverse=True)
    for s in b.specs:
        assert s.start % ITEMSIZE[s.dtype] == 0
    assert b.header_size % 8 == 0


def test_parse_sealed_header() -> None:
    b = HeaderBuilder([("a/b", "F16", (2, 2)), ("é", "I64", ())], {"k": "v", "torchkeep.format": "torchkeep/1"})
    hexes = [digest(bytes([i]) * 8) for i in range(2)]
    data = b.seal(hexes) + bytes(b.data_size)
    h = parse_header(_reader(data), len(data), "mem")
    assert h.size == b.header_size and h.is_torchkeep
    assert list(h.tensors) == [s.name for s in b.specs]
    assert h.tensors["a/b"].shape == (2, 2) and h.tensors["é"].shape == ()
    assert h.checksums == {s.name: x for s, x in zip(b.specs, hexes, strict=True)}
    assert h.metadata["k"] == "v"


def test_every_bit_of_a_sealed_header_is_covered_by_its_digest() -> None:
    b = HeaderBuilder([("w", "F32", (2,)), ("i", "I8", (1,))], {"torchkeep.format": "torchkeep/1", "x": "y"})
    good = b.seal([digest(b"a"), digest(b"b")]) + bytes(b.data_size)
    parse_header(_reader(good), len(good), "mem")
    for bit in range(b.header_size * 8):
        bad = bytearray(good)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(ChecksumMismatchError) as ei:
            parse_header(_reader(bytes(bad)), len(bad), "mem")
        assert ei.value.key == "<header>", bit


def test_seal_rejects_wrong_checksums() -> None:
    b = HeaderBuilder([("w", "F32", (2,))], {})
    with pytest.raises((ValueError, RuntimeError)):
        b.seal(["abc"])
    with pytest.raises((ValueError, RuntimeError)):
        b.seal([])


# -- dtype tables ------------------------------------------------------------------------------


def test_dtype_table_matches_safetensors() -> None:
    theirs = safetensors.torch._TYPES  # name -> torch dtype, what safetensors itself reads
    for dt, name in DTYPE_TO_ST.items():
        assert theirs.get(name) == dt, name
    for name, dt in theirs.items():
        if dt is not None:
            assert DTYPE_TO_ST.get(dt) == name, name
    assert all(ITEMSIZE[st] == dt.itemsize for dt, st in DTYPE_TO_ST.items())


def test_dtype_names_roundtrip() -> None:
    for dt in {v for v in vars(torch).values() if isinstance(v, torch.dtype)}:
        assert dtype_from_name(dtype_name(dt)) is dt
    with pytest.raises(ValueError):
        dtype_from_name("float99")


# -- detection by content ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ckpt.pt", "model.bin", "weights.ckpt", "noext", "x.pth"])
def test_torchkeep_file_detected_by_content(name: str, tmp_path: Path) -> None:
    p = tk.save({"w": torch.arange(3), "n": 1}, tmp_path / name)
    got = tk.load(p)
    assert got["n"] == 1 and torch.equal(got["w"], torch.arange(3))


def test_plain_safetensors_with_other_extension(tmp_path: Path) -> None:
    p = tmp_path / "weights.pt"
    safetensors.torch.save_file({"a": torch.ones(2)}, str(p))
    assert set(tk.load(p)) == {"a"}


@pytest.mark.parametrize("second", [2, 3])
@pytest.mark.parametrize("with_tensor", [True, False])
def test_header_length_starting_with_pickle_opcode_loads(second: int, with_tensor: bool, tmp_path: Path, same_tree):
    # A header length whose low byte is 0x80 (1 file in 32) starts like a pickle (PROTO opcode):
    # detection by content must not hand such a torchkeep file to torch.load.
    def tree(k: int) -> dict[str, Any]:
        return {"w": torch.ones(2), "pad": "x" * k} if with_tensor else {"pad": "x" * k, "n": 1}

    # each "x" adds one header byte; the length is then padded to a multiple of 8
    n0 = struct.unpack("<Q", tk.save(tree(0), tmp_path / "p.safetensors").read_bytes()[:8])[0]
    k = 0x100 * second + 0x80 - n0
    p = tk.save(tree(k), tmp_path / "p.safetensors")
    assert p.read_bytes()[:2] == bytes([0x80, second])
    same_tree(tk.load(p), tree(k))


def test_plain_safetensors_header_length_starting_with_0x80_loads(tmp_path: Path) -> None:
    p = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"a": torch.ones(2)}, str(p), metadata={"pad": ""})
    n0 = struct.unpack("<Q", p.read_bytes()[:8])[0]
    safetensors.torch.save_file({"a": torch.ones(2)}, str(p), metadata={"pad": "x" * (0x180 - n0)})
    assert p.read_bytes()[:2] == b"\x80\x01"
    got = tk.load(p)
    assert list(got) == ["a"] and torch.equal(got["a"], torch.ones(2))


# -- header decoding never raises anything but torchkeep errors ---------------------------------------


@SETTINGS
@given(data=st.binary(max_size=300))
def test_parse_header_arbitrary_bytes(data: bytes) -> None:
    try:
        h = parse_header(_reader(data), len(data), "mem")
    except ALLOWED:
        return
    assert h.size <= len(data)


@SETTINGS
@given(length=st.integers(0, 2**64 - 1), tail=st.binary(max_size=40))
def test_parse_header_arbitrary_length_field(length: int, tail: bytes) -> None:
    data = struct.pack("<Q", length) + tail
    with pytest.raises(ALLOWED):
        parse_header(_reader(data), len(data), "mem")


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8))
json_values = st.recursive(
    json_scalars,
    lambda ch: st.one_of(st.lists(ch, max_size=3), st.dictionaries(st.text(max_size=5), ch, max_size=3)),
    max_leaves=10,
)
dtype_names = st.one_of(st.sampled_from(sorted(ITEMSIZE)), st.sampled_from(["F128", "f32", "", "I4"]), json_values)
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": dtype_names,
        "shape": st.one_of(st.lists(st.integers(-2, 4), max_size=3), json_values),
        "data_offsets": st.one_of(st.lists(st.integers(-4, 64), min_size=2, max_size=2), json_values),
    },
)
metadata = st.one_of(
    st.dictionaries(st.text(max_size=20), st.text(max_size=10), max_size=3),
    st.dictionaries(st.sampled_from(["torchkeep.format", "torchkeep.checksums", "x"]), json_values, max_size=3),
    json_values,
)


@SETTINGS
@given(
    head=st.dictionaries(st.text(max_size=6), st.one_of(entries, json_values), max_size=4),
    meta=st.one_of(st.none(), metadata),
    data=st.binary(max_size=64),
)
def test_parse_header_arbitrary_json(head: dict[str, Any], meta: Any, data: bytes) -> None:
    if meta is not None:
        head = {"__metadata__": meta, **head}
    body = json.dumps(head).encode()
    file = struct.pack("<Q", len(body)) + body + data
    try:
        h = parse_header(_reader(file), len(file), "mem")
    except ALLOWED:
        return
    # anything accepted is a consistent layout: contiguous, covering the data exactly
    pos = 0
    for s in sorted(h.tensors.values(), key=lambda s: s.start):
        assert s.start == pos and s.end - s.start == math.prod(s.shape) * ITEMSIZE[s.dtype]
        pos = s.end
    assert pos == len(data)
    assert all(isinstance(v, str) for v in h.metadata.values())


def _small_sealed() -> tuple[HeaderBuilder, bytes]:
    b = HeaderBuilder([("w", "F32", (2,)), ("b", "U8", (3,))], {"torchkeep.format": "torchkeep/1"})
    return b, b.seal([digest(b"w"), digest(b"b")]) + bytes(b.data_size)


@SETTINGS
@given(pos=st.integers(0, 10**6), value=st.integers(0, 255))
def test_parse_header_one_damaged_byte_is_checksum_error(pos: int, value: int) -> None:
    b, good = _small_sealed()
    bad = bytearray(good)
    bad[pos % b.header_size] = value
    if bytes(bad) == good:
        return
    with pytest.raises(ChecksumMismatchError) as ei:
        parse_header(_reader(bytes(bad)), len(bad), "mem")
    assert ei.value.key == "<header>"


@SETTINGS
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=2, max_size=6))
def test_parse_header_badly_damaged_header_is_refused(edits: list[tuple[int, int]]) -> None:
    # Several edits can erase the signs that a header is torchkeep's (the digest key that opens
    # it and the format key); only then may it pass, as a plain, unverified safetensors header.
    b, good = _small_sealed()
    bad = bytearray(good)
    for pos, value in edits:
        bad[pos % b.header_size] = value
    if bytes(bad) == good:
        return
    try:
        h = parse_header(_reader(bytes(bad)), len(bad), "mem")
    except CorruptCheckpointError:
        return
    assert not h.is_torchkeep
    assert b'"torchkeep.header_digest"' not in bad and b'"torchkeep.format"' not in bad

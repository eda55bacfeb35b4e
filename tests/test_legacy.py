"""Legacy torch.save files: detected by content, loaded only through weights_only=True, CUDA-tagged fixtures."""

from __future__ import annotations

import pathlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from loadfile import load_file

import torchkeep as tk
from torchkeep.errors import CorruptCheckpointError, DeviceUnavailableError, TorchkeepError, UnsafeCheckpointError

FIXTURES = Path(__file__).parent / "fixtures" / "legacy"


def _fixture_module() -> Any:
    return load_file("torchkeep_legacy_fixtures", FIXTURES / "make_fixtures.py")


EXPECTED = _fixture_module().expected()


def assert_same(a: Any, b: Any, where: str = "") -> None:
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.device == b.device and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


class Config:
    """A custom class: a weights-only load must refuse it."""

    def __init__(self, lr: float, layers: list[int]) -> None:
        self.lr = lr
        self.layers = layers


class Planted:
    """Unpickling this runs ``Path(marker).touch()``: a harmless stand-in for ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture
def load_spy(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record every torch.load call's keyword arguments."""
    calls: list[dict[str, Any]] = []
    real = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(dict(kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


# ------------------------------------------------------------------------------------------ detection by content


def test_torch_save_file_named_safetensors_loads(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    torch.save(EXPECTED, path)
    assert_same(tk.load(path), EXPECTED)


def test_torchkeep_file_named_pt_loads(tmp_path: Path, load_spy: list[dict[str, Any]]) -> None:
    for name in ("x.pt", "x.pth", "x.ckpt", "x.bin", "noext"):
        path = tk.save({"w": torch.arange(5.0), "epoch": 3}, tmp_path / name)
        loaded = tk.load(path)
        assert loaded["epoch"] == 3 and torch.equal(loaded["w"], torch.arange(5.0))
    assert load_spy == []  # our own format never goes near torch.load / pickle


def test_old_non_zip_torch_save_loads(tmp_path: Path) -> None:
    path = tmp_path / "old.safetensors"
    torch.save(EXPECTED, path, _use_new_zipfile_serialization=False)
    assert_same(tk.load(path), EXPECTED)


def test_plain_safetensors_file_named_pt_loads(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "weights.pt"
    save_file({"a": torch.ones(2, 3), "b": torch.arange(4)}, str(path))
    loaded = tk.load(path)
    assert sorted(loaded) == ["a", "b"] and torch.equal(loaded["b"], torch.arange(4))


def test_a_module_state_dict_restores_from_a_legacy_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    path = tmp_path / "model.pth"
    torch.save({"model": model.state_dict(), "epoch": 5}, path)
    fresh = torch.nn.Linear(4, 2)
    assert tk.restore(path, {"model": fresh})["epoch"] == 5
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)


# ------------------------------------------------------------------------------------------ safety


def test_planted_code_is_refused_even_with_force_no_weights_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, load_spy: list[dict[str, Any]]
) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "payload": Planted(marker)}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UnsafeCheckpointError) as info:
        tk.load(path)
    assert not marker.exists()
    assert isinstance(info.value, TorchkeepError) and isinstance(info.value, RuntimeError)
    assert "trust_pickle=True" in str(info.value)
    assert str(path) in str(info.value)
    # refused by the scan before torch.load is reached (a dangerous global), or by torch.load with
    # weights_only=True passed explicitly: at most one attempt, never retried unsafely
    assert len(load_spy) <= 1 and all(call.get("weights_only") is True for call in load_spy)
    with pytest.raises(UnsafeCheckpointError):
        tk.restore(path, {"model": torch.nn.Linear(1, 1)})
    assert not marker.exists()
    assert all(call.get("weights_only") is True for call in load_spy)


def test_planted_code_really_runs_when_trusted(tmp_path: Path) -> None:
    """The control for the test above: the payload is live (plain torch.load runs it), so 'marker
    not created' means something; torchkeep refuses it even with trust_pickle=True, because the
    scan finds a dangerous global (a method reached through builtins.getattr)."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "payload": Planted(marker)}, path)
    with pytest.raises(UnsafeCheckpointError):
        tk.load(path, trust_pickle=True)
    assert not marker.exists()
    tree = torch.load(path, weights_only=False)  # the test itself, not the library, runs it
    assert marker.exists()
    assert torch.equal(tree["w"], torch.ones(2))


def test_custom_class_needs_trust_pickle(tmp_path: Path, load_spy: list[dict[str, Any]]) -> None:
    path = tmp_path / "cfg.pt"
    torch.save({"w": torch.zeros(3), "config": Config(0.1, [4, 4])}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        tk.load(path)
    assert "Config" in str(info.value)
    assert [c.get("weights_only") for c in load_spy] == [True]

    tree = tk.load(path, trust_pickle=True)
    assert isinstance(tree["config"], Config)
    assert (tree["config"].lr, tree["config"].layers) == (0.1, [4, 4])
    assert [c.get("weights_only") for c in load_spy] == [True, False]


def test_full_model_pickle_needs_trust_pickle(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    path = tmp_path / "model.pt"
    torch.save(model, path)
    with pytest.raises(UnsafeCheckpointError):
        tk.load(path)
    loaded = tk.load(path, trust_pickle=True)
    assert isinstance(loaded, torch.nn.Sequential)
    assert torch.equal(loaded[0].weight, model[0].weight)


def test_torch_load_never_called_unsafely(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, load_spy: list[dict[str, Any]]
) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    safe, custom = tmp_path / "safe.pt", tmp_path / "custom.pt"
    torch.save(EXPECTED, safe)
    torch.save(Config(1.0, []), custom)
    tk.load(safe)
    tk.load(safe, map_location="cpu", verify=False)
    tk.restore(safe, {}, strict=False)
    for _ in range(2):
        with pytest.raises(UnsafeCheckpointError):
            tk.load(custom)
    assert len(load_spy) == 5
    assert all("weights_only" in c and c["weights_only"] is True for c in load_spy), load_spy


def test_legacy_zip_is_not_unpickled_by_anything_else(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchkeep's own code never unpickles: only torch.load's weights-only unpickler reads legacy files."""
    path = tmp_path / "w.pt"
    torch.save(EXPECTED, path)

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickle.load/loads called")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    assert_same(tk.load(path), EXPECTED)


def test_truncated_legacy_file_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "cut.pt"
    torch.save(EXPECTED, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError) as info:
        tk.load(path)
    assert str(path) in str(info.value)


# ------------------------------------------------------------------------------------------ committed fixtures


def test_fixture_cpu_loads() -> None:
    assert_same(tk.load(FIXTURES / "cpu.pt"), EXPECTED)


def test_fixture_nonzip_loads() -> None:
    assert (FIXTURES / "nonzip.pt").read_bytes()[:1] == b"\x80"  # a raw pickle, not a zip
    assert_same(tk.load(FIXTURES / "nonzip.pt"), EXPECTED)


def test_fixture_cuda_tagged_really_is_tagged() -> None:
    with zipfile.ZipFile(FIXTURES / "cuda0.pt") as z:
        (name,) = [n for n in z.namelist() if n.endswith("/data.pkl")]
        pkl = z.read(name)
    assert b"cuda:0" in pkl and b"cpu" not in pkl


def test_fixture_cuda_tagged_loads_on_cpu_by_default() -> None:
    tree = tk.load(FIXTURES / "cuda0.pt")  # default map_location="cpu"
    assert_same(tree, EXPECTED)
    assert all(t.device.type == "cpu" for t in (tree["model"]["weight"], tree["half"], tree["index"]))


def test_fixture_cuda_tagged_with_map_location_dict_and_device() -> None:
    assert_same(tk.load(FIXTURES / "cuda0.pt", map_location={"cuda:0": "cpu"}), EXPECTED)
    assert_same(tk.load(FIXTURES / "cuda0.pt", map_location=torch.device("cpu")), EXPECTED)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_fixture_cuda_tagged_needs_a_mapping_without_cuda() -> None:
    with pytest.raises(RuntimeError):  # what plain torch.load does here: the fixture is a real CUDA file
        torch.load(FIXTURES / "cuda0.pt", weights_only=True)
    with pytest.raises(DeviceUnavailableError) as info:
        tk.load(FIXTURES / "cuda0.pt", map_location=None)  # "where it was saved": there is no cuda:0 here
    assert "map_location" in str(info.value)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fixture_cuda_tagged_loads_onto_cuda() -> None:
    tree = tk.load(FIXTURES / "cuda0.pt", map_location=None)
    assert tree["model"]["weight"].device == torch.device("cuda:0")
    assert torch.equal(tree["model"]["weight"].cpu(), EXPECTED["model"]["weight"])


def test_fixtures_are_what_the_script_makes(tmp_path: Path) -> None:
    """The script is kept with the files: rerunning it gives files that load to the same tree."""
    _fixture_module().main(tmp_path)
    for name in ("cpu.pt", "cuda0.pt", "nonzip.pt"):
        assert_same(tk.load(tmp_path / name), tk.load(FIXTURES / name), name)


def test_callable_map_location_gets_tensor_and_saved_device(tmp_path: Path) -> None:
    """tk.load's callable is fn(tensor, saved_device) for every format, legacy included."""
    seen: list[tuple[tuple[int, ...], str]] = []

    def to_double(t: torch.Tensor, device: str) -> torch.Tensor:
        seen.append((tuple(t.shape), device))
        return t.to(torch.float64)

    tree = tk.load(FIXTURES / "cuda0.pt", map_location=to_double)
    assert tree["model"]["bias"].dtype == torch.float64
    assert torch.equal(tree["model"]["bias"], EXPECTED["model"]["bias"].double())
    assert {d for _, d in seen} == {"cuda:0"}
    assert tree["step"] == 7 and tree["names"] == ["a", "b"]

    sd = torch.nn.Linear(2, 2).state_dict()
    torch.save(sd, tmp_path / "sd.pt")
    loaded = tk.load(tmp_path / "sd.pt", map_location=lambda t, d: t)
    assert type(loaded) is type(sd) and getattr(loaded, "_metadata", None) == sd._metadata


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_non_zip_files_of_every_pickle_protocol_are_detected(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "old.bin"
    torch.save(EXPECTED, path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    if protocol <= 3:
        assert_same(tk.load(path), EXPECTED)
    else:
        # detected as legacy and handed to torch, whose weights-only unpickler has no FRAME opcode
        # (protocol 4+): refused as unsafe, never misread as a corrupt safetensors file
        with pytest.raises(UnsafeCheckpointError, match="operand"):
            tk.load(path)
    assert_same(tk.load(path, trust_pickle=True), EXPECTED)


def test_safetensors_whose_header_length_starts_like_a_pickle_is_not_legacy(tmp_path: Path) -> None:
    """A header length of 0x280 begins with b"\\x80\\x02", the bytes that open a protocol-2 pickle."""
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    for pad in range(0, 800):
        save_file({"w": torch.arange(3.0)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[:2] == b"\x80\x02":
            break
    else:
        pytest.skip("could not make a header of that length")
    loaded = tk.load(path)
    assert list(loaded) == ["w"] and torch.equal(loaded["w"], torch.arange(3.0))


def test_is_legacy_by_first_bytes() -> None:
    from torchkeep.container import is_legacy

    assert is_legacy(b"PK\x03\x04\x00\x00\x08\x08")  # a torch.save zip
    assert is_legacy(pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[:8])  # a pre-1.6 torch.save
    assert is_legacy(pickle.dumps({"x": 1}, protocol=2)[:8])  # any raw pickle: refused safely later
    for n in (0x80, 0x280, 0x8002_80, 99_999_872):  # safetensors header lengths whose low byte is 0x80
        assert not is_legacy(n.to_bytes(8, "little")), hex(n)
    assert not is_legacy(b"\x80\x02")  # too short to tell: the reader reports it


# -- the saved device in a placement error -----------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
@pytest.mark.parametrize("map_location", ["cuda", "cuda:1", torch.device("cuda"), {"cpu": "cuda:0"}])
def test_a_cpu_file_sent_to_a_missing_device_is_reported_as_saved_on_cpu(tmp_path: Path, map_location: Any) -> None:
    """torch's error names the device it was placing the storage on; the message must name where it was saved."""
    from torchkeep.legacy import load_legacy

    torch.save({"w": torch.ones(2)}, tmp_path / "x.pth")
    with pytest.raises(DeviceUnavailableError) as info:
        load_legacy(tmp_path / "x.pth", map_location=map_location)
    err = info.value
    assert err.saved_device == "cpu" and "saved on cpu with map_location=" in str(err)
    assert "saved on cuda" not in str(err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
@pytest.mark.parametrize("map_location", [None, "cuda:1", {"cuda:0": "cuda:1"}])
def test_a_cuda_file_on_a_machine_without_cuda_names_its_saved_device(map_location: Any) -> None:
    from torchkeep.legacy import load_legacy

    with pytest.raises(DeviceUnavailableError) as info:
        load_legacy(FIXTURES / "cuda0.pt", map_location=map_location)
    assert info.value.saved_device == "cuda:0" and "saved on cuda:0 with" in str(info.value)


def test_a_map_location_of_another_type_is_a_typed_type_error() -> None:
    from torchkeep.legacy import load_legacy

    with pytest.raises(tk.errors.ArgumentTypeError, match="map_location must be a device") as info:
        load_legacy(FIXTURES / "cpu.pt", map_location=3)
    assert isinstance(info.value, TypeError)


# ------------------------------------------------------------------------------------------ NumPy arrays (issue 14)


def _numpy_files(tmp_path: Path, name: str, obj: Any) -> list[Path]:
    """``obj`` saved as a torch zip and as a pre-1.6 (non-zip) torch file."""
    paths = []
    for zipped in (True, False):
        path = tmp_path / f"{name}-{'zip' if zipped else 'legacy'}.pth"
        torch.save(obj, path, _use_new_zipfile_serialization=zipped)
        paths.append(path)
    return paths


def _wou_state() -> tuple[Any, list[Any]]:
    from torch import _weights_only_unpickler as wou

    return wou._get_user_allowed_globals, list(torch.serialization.get_safe_globals())


def _hf_rng_state() -> dict[str, Any]:
    """What Hugging Face Trainer saves as rng_state.pth (CPU only)."""
    import random

    import numpy as np

    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    return {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}


def _accelerate_random_states() -> dict[str, Any]:
    """What Accelerate saves as random_states_0.pkl, plus NumPy scalars and other plain arrays."""
    import random

    import numpy as np

    random.seed(6)
    np.random.seed(7)
    return {
        "step": 12,
        "random_state": random.getstate(),
        "numpy_random_seed": np.random.get_state(),
        "torch_manual_seed": torch.get_rng_state(),
        "extras": [np.float64(1.5), np.int32(-7), np.bool_(True), np.complex64(1 - 2j)],
        "arrays": {
            "fortran_big_endian": np.asfortranarray(np.arange(6, dtype=">f4").reshape(2, 3)),
            "zero_d": np.array(3, dtype=np.int16),
            "empty": np.zeros((0, 4), dtype=np.uint8),
            "bools": np.array([True, False]),
            "half": np.ones(3, dtype=np.float16),
        },
        "dtype": np.dtype("<u2"),
    }


def _assert_numpy_equal(a: Any, b: Any) -> None:
    import numpy as np

    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
        assert a.flags.f_contiguous == b.flags.f_contiguous and a.flags.writeable
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_numpy_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_numpy_equal(x, y)
    else:
        assert a == b and getattr(a, "dtype", None) == getattr(b, "dtype", None)


@pytest.mark.parametrize("make", [_hf_rng_state, _accelerate_random_states])
def test_plain_numpy_arrays_load_without_trust_pickle(tmp_path: Path, make: Any) -> None:
    import random

    import numpy as np

    state = make()
    before = _wou_state()
    for path in _numpy_files(tmp_path, make.__name__, state):
        report = tk.scan(path)
        assert report.ok and not report.reasons, report
        loaded = tk.load(path)
        _assert_numpy_equal(loaded, state)
        assert _wou_state() == before  # nothing registered, torch's function put back
        # the RNG states are restorable
        np_state = loaded["numpy"] if "numpy" in loaded else loaded["numpy_random_seed"]
        np.random.set_state(np_state)
        first = np.random.rand(3)
        np.random.set_state(state["numpy"] if "numpy" in state else state["numpy_random_seed"])
        assert np.array_equal(first, np.random.rand(3))
        random.setstate(loaded["python"] if "python" in loaded else loaded["random_state"])
        torch.random.set_rng_state(loaded["cpu"] if "cpu" in loaded else loaded["torch_manual_seed"])


def test_numpy_scope_is_this_context_only(tmp_path: Path) -> None:
    """Inside a torchkeep load only that thread sees the NumPy stand-ins; torch's own tables never change."""
    import threading

    from torch import _weights_only_unpickler as wou

    from torchkeep import legacy

    original, registered = _wou_state()
    seen: dict[str, bool] = {}
    with legacy._numpy_arrays():
        assert "numpy.dtype" in wou._get_user_allowed_globals()
        assert torch.serialization.get_safe_globals() == registered
        other = threading.Thread(target=lambda: seen.update(other="numpy.dtype" in wou._get_user_allowed_globals()))
        other.start()
        other.join()
    assert seen == {"other": False}
    assert wou._get_user_allowed_globals is original and "numpy.dtype" not in wou._get_user_allowed_globals()
    # and a plain torch.load still refuses NumPy arrays, as before
    path = tmp_path / "rng.pth"
    torch.save(_hf_rng_state(), path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_user_registered_numpy_globals_survive_a_load(tmp_path: Path) -> None:
    import numpy as np

    path = tmp_path / "rng.pth"
    torch.save(_hf_rng_state(), path)
    torch.serialization.add_safe_globals([np.dtype])
    try:
        tk.load(path)
        assert np.dtype in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()


def test_rng_state_converts_to_safetensors(tmp_path: Path) -> None:
    import numpy as np

    state = _hf_rng_state()
    for path in _numpy_files(tmp_path, "rng_state", state):
        out = tk.convert(path, tmp_path / f"{path.stem}.safetensors")
        back = tk.load(out)
        assert isinstance(back["numpy"], tuple) and isinstance(back["numpy"][1], np.ndarray)
        assert np.array_equal(back["numpy"][1], state["numpy"][1]) and back["numpy"][1].dtype == np.uint32
        assert back["python"] == state["python"] and isinstance(back["python"], tuple)
        assert torch.equal(back["cpu"], state["cpu"])
        np.random.set_state(back["numpy"])


def _object_dtype_files(tmp_path: Path) -> list[Path]:
    import numpy as np

    paths = _numpy_files(tmp_path, "objects", {"w": torch.ones(2), "a": np.array(["x", 1], dtype=object)})
    structured = np.zeros(2, dtype=[("n", "<i4"), ("o", "O")])
    paths += _numpy_files(tmp_path, "structured", {"s": structured})
    return paths


def test_object_dtype_arrays_are_refused_and_the_advice_works(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from torchkeep.cli import app

    before = _wou_state()
    for path in _object_dtype_files(tmp_path):
        report = tk.scan(path)
        assert not report.ok and "numpy.dtype" in report.unsafe and not report.dangerous
        assert "object dtype" in report.reasons["numpy.dtype"] or "structured" in report.reasons["numpy.dtype"]
        with pytest.raises(UnsafeCheckpointError) as info:
            tk.load(path)
        message = str(info.value)
        assert "numpy.dtype" in message and ("object dtype" in message or "structured" in message)
        assert _wou_state() == before  # nothing leaked after a failed load either
        # every suggestion in the message works on this file: trust_pickle=True and `torchkeep scan FILE`
        assert "trust_pickle=True" in message and "`torchkeep scan FILE`" in message
        assert "tk.convert" not in message and "tk.save" not in message  # neither can store object arrays
        assert tk.load(path, trust_pickle=True)
        result = CliRunner().invoke(app, ["scan", str(path)])
        assert result.exit_code == 1 and "numpy.dtype" in result.output
        assert _wou_state() == before


def test_convert_advice_works_for_a_whole_model(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(UnsafeCheckpointError) as info:
        tk.load(path)
    assert "tk.convert(path, 'model.safetensors', trust_pickle=True)" in str(info.value)
    out = tk.convert(path, tmp_path / "model.safetensors", trust_pickle=True)
    assert tk.load(out)
    assert tk.scan(path).unsafe  # `torchkeep scan FILE` names them


class _Reduce:
    """Pickles as ``func(*args)`` (then ``BUILD state`` when given): crafted NumPy pickles."""

    def __init__(self, func: Any, args: tuple[Any, ...], state: Any = None) -> None:
        self.func, self.args, self.state = func, args, state

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def _crafted() -> dict[str, Any]:
    import numpy as np

    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    scalar = np.float64(1).__reduce__()[0]
    return {
        "object typecode": _Reduce(reconstruct, (np.ndarray, (0,), b"O")),
        "ndarray called": _Reduce(np.ndarray, ((2,), "O")),
        "dtype flags say objects": _Reduce(np.dtype, ("u8", False, True), (3, "<", None, None, None, -1, -1, 63)),
        "dtype with fields": _Reduce(
            np.dtype, ("f8", False, True), (3, "<", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 27)
        ),
        "wrong subtype": _Reduce(reconstruct, (collections_ordered_dict(), (0,), b"b")),
        "object scalar": _Reduce(scalar, (np.dtype("O"), "x")),
        "dtype from a class": _Reduce(np.dtype, (torch.Tensor, False, True)),
    }


def collections_ordered_dict() -> Any:
    from collections import OrderedDict

    return OrderedDict


@pytest.mark.parametrize("case", sorted(_crafted()))
def test_crafted_numpy_pickles_are_refused_by_scan_and_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    from torchkeep import legacy
    from torchkeep.scan import ScanReport

    before = _wou_state()
    for path in _numpy_files(tmp_path, "crafted", {"w": torch.ones(1), "x": _crafted()[case]}):
        report = tk.scan(path)
        assert not report.ok and report.reasons, report
        with pytest.raises(UnsafeCheckpointError):
            tk.load(path)
        assert _wou_state() == before
    # the load checks for itself, too: with a scan that sees nothing, it still refuses
    monkeypatch.setattr(legacy, "scan", lambda p: ScanReport(path=str(p)))
    for path in _numpy_files(tmp_path, "crafted2", {"w": torch.ones(1), "x": _crafted()[case]}):
        with pytest.raises(UnsafeCheckpointError):
            tk.load(path)
        assert _wou_state() == before


def test_dangerous_callable_through_numpy_is_refused(tmp_path: Path) -> None:
    import numpy as np

    marker = tmp_path / "pwned"
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    payload = {"x": _Reduce(reconstruct, (pathlib.Path.touch, (pathlib.Path(marker),), b"b"))}
    before = _wou_state()
    for path in _numpy_files(tmp_path, "smuggle", payload):
        report = tk.scan(path)
        # a bound method pickles through builtins.getattr (dangerous); the _reconstruct use is also named
        assert "builtins.getattr" in report.dangerous and report.reasons, report
        for trust in (False, True):
            with pytest.raises(UnsafeCheckpointError):
                tk.load(path, trust_pickle=trust)
        assert not marker.exists() and _wou_state() == before
    import os

    payload = {"x": _Reduce(reconstruct, (os.system, ("true",), b"b"))}
    for path in _numpy_files(tmp_path, "smuggle-os", payload):
        assert tk.scan(path).dangerous
        for trust in (False, True):
            with pytest.raises(UnsafeCheckpointError):
                tk.load(path, trust_pickle=trust)
        assert _wou_state() == before


def test_plain_dtype_states_match_numpy() -> None:
    """scan_policy spells the one BUILD state NumPy writes for each plain dtype without importing NumPy."""
    import numpy as np

    from torchkeep.scan_policy import numpy_dtype_problem, numpy_dtype_state

    for spec in ["b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8", "c8", "c16"]:
        for order in "<>":
            dt = np.dtype(spec).newbyteorder(order)
            func, args, state = dt.__reduce__()
            assert func is np.dtype and numpy_dtype_problem(args) is None, (spec, args)
            assert numpy_dtype_state(args[0], state[1]) == state, (spec, order, state)
    for spec in ["O", "V8", "U3", "S2", "M8[s]", "m8[s]", [("a", "<i4")]]:
        assert numpy_dtype_problem(np.dtype(spec).__reduce__()[1]) is not None, spec

"""register_model / save_model / load_model: rebuild whole models from a file, without pickle."""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import registered_models as rm
import torch
from torch import nn
from typer.testing import CliRunner

import torchkeep as tk
from torchkeep import registry
from torchkeep.cli import app
from torchkeep.errors import ModelVersionError, UnknownModelError, UnsupportedObjectError

HELPERS = Path(__file__).parent / "helpers"
SRC = Path(__file__).parents[1] / "src"


def _nested() -> rm.TinyNet:
    torch.manual_seed(0)
    return rm.TinyNet(sizes=(4, 6, 3), opts={"act": "tanh", "drop": [0.1, {"p": (1, 2)}], 3: None}, names=("x",))


# -- construction capture ---------------------------------------------------------------------


def test_nested_config_round_trips_with_exact_types(tmp_path: Path) -> None:
    model = _nested()
    p = tk.save_model(model, tmp_path / "m.safetensors")
    loaded = tk.load_model(p)
    got = loaded._torchkeep_init.arguments
    want = {
        "sizes": (4, 6, 3),
        "opts": {"act": "tanh", "drop": [0.1, {"p": (1, 2)}], 3: None},
        "dtype": torch.float32,
        "names": ("x",),
    }
    assert got == want
    assert type(got["sizes"]) is tuple and type(got["opts"]["drop"]) is list
    assert type(got["opts"]["drop"][1]["p"]) is tuple and 3 in got["opts"]
    assert got["dtype"] is torch.float32
    x = torch.randn(5, 4)
    assert torch.equal(loaded(x), model(x))
    assert tk.load(p).keys() == {"model"}


def test_defaults_filled_and_subclass_calls_do_not_record(tmp_path: Path) -> None:
    assert rm.TinyNet()._torchkeep_init.arguments["sizes"] == (4, 8, 3)

    class Sub(rm.TinyNet):  # not registered: super().__init__ must not make it look registered
        def __init__(self) -> None:
            super().__init__(sizes=(2, 2))

    with pytest.raises(UnknownModelError, match="not registered"):
        tk.save_model(Sub(), tmp_path / "s.safetensors")


@pytest.mark.parametrize(
    ("arg", "value"),
    [("sizes", lambda: 3), ("opts", {"act": "tanh", "f": io.StringIO()}), ("names", torch.zeros(2))],
)
def test_unrepresentable_arguments_are_named(tmp_path: Path, arg: str, value: object) -> None:
    class Holder(nn.Module):
        def __init__(self, sizes=1, opts=None, names=None):
            super().__init__()
            self.fc = nn.Linear(1, 1)

    tk.register_model(f"test-holder-{arg}")(Holder)
    model = Holder(**{arg: value})
    with pytest.raises(UnsupportedObjectError) as err:
        tk.save_model(model, tmp_path / "h.safetensors")
    msg = str(err.value)
    assert f"config.{arg}" in msg and "to_config" in msg and "from_config" in msg
    assert not (tmp_path / "h.safetensors").exists()


def test_to_config_from_config(tmp_path: Path) -> None:
    model = rm.CustomConfig(3, activation=torch.sigmoid)
    p = tk.save_model(model, tmp_path / "c.safetensors")
    assert tk.inspect(p)["model"]["config"] == {"width": 3, "activation": "sigmoid"}
    loaded = tk.load_model(p)
    assert loaded.activation is torch.sigmoid
    x = torch.randn(2, 3)
    assert torch.equal(loaded(x), model(x))


def test_pickle_deepcopy_compile_and_state_dict_unchanged(tmp_path: Path) -> None:
    model = _nested()
    assert set(model.state_dict()) == set(nn.Module.state_dict(model))
    assert not any("torchkeep" in k for k in model.state_dict())
    x = torch.randn(2, 4)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert torch.equal(clone(x), model(x))
        p = tk.save_model(clone, tmp_path / "clone.safetensors")  # the config survives the copy
        assert torch.equal(tk.load_model(p)(x), model(x))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), model(x))
    compiled = torch.compile(model, backend="eager")
    assert torch.equal(compiled(x), model(x))
    p = tk.save_model(compiled, tmp_path / "compiled.safetensors")  # unwrapped: keys without _orig_mod.
    assert torch.equal(tk.load_model(p)(x), model(x))
    # an unpicklable argument must not make pickling the model fail
    model2 = rm.CustomConfig(2, activation=lambda t: t)
    model2.activation = torch.relu
    assert pickle.loads(pickle.dumps(model2)).fc.in_features == 2


def test_training_flag_and_dtype(tmp_path: Path) -> None:
    model = _nested().eval()
    loaded = tk.load_model(tk.save_model(model, tmp_path / "e.safetensors"), dtype=torch.float64)
    assert loaded.training is False and not loaded.norm.training
    assert loaded.layers[0].weight.dtype == torch.float64
    assert torch.equal(loaded.layers[0].weight.float(), model.layers[0].weight)
    assert tk.load_model(tk.save_model(model.train(), tmp_path / "t.safetensors")).training is True


# -- a fresh process ----------------------------------------------------------------------------


def test_fresh_subprocess_rebuilds_identical_outputs(tmp_path: Path) -> None:
    model = _nested().eval()
    x = torch.randn(7, 4)
    p = tk.save_model(model, tmp_path / "model.safetensors")
    tk.save({"x": x}, tmp_path / "x.safetensors")
    script = textwrap.dedent(
        f"""
        import sys
        import registered_models  # only the module defining the class
        import torchkeep as tk
        assert "test_registry" not in sys.modules
        m = tk.load_model({str(p)!r})
        x = tk.load({str(tmp_path / "x.safetensors")!r})["x"]
        tk.save({{"y": m(x).detach(), "training": m.training}}, {str(tmp_path / "y.safetensors")!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HELPERS), str(SRC)])}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path, timeout=120)
    out = tk.load(tmp_path / "y.safetensors")
    assert out["training"] is False
    assert torch.equal(out["y"], model(x))


# -- discovery ------------------------------------------------------------------------------


def _write_module(directory: Path, module: str, name: str, version: int = 1, extra: str = "") -> None:
    (directory / f"{module}.py").write_text(
        textwrap.dedent(
            f"""
            import torch
            import torchkeep as tk

            @tk.register_model({name!r}, version={version})
            class Net(torch.nn.Module):
                def __init__(self, n=3):
                    super().__init__()
                    self.fc = torch.nn.Linear(n, 2)
            {textwrap.indent(textwrap.dedent(extra), "    ")}
                def forward(self, x):
                    return self.fc(x)
            """
        )
    )


def _forget(module: str, name: str) -> None:
    sys.modules.pop(module, None)
    registry._REGISTRY.pop(name, None)


def test_entry_point_discovery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    site.mkdir()
    _write_module(site, "tk_fake_ep_models", "test-ep-net")
    dist = site / "tk_fake_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tk-fake-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[torchkeep.models]\ntest-ep-net = tk_fake_ep_models:Net\n")
    monkeypatch.syspath_prepend(str(site))
    import tk_fake_ep_models  # build and save with the class, then forget it

    model = tk_fake_ep_models.Net(n=5)
    p = tk.save_model(model, tmp_path / "ep.safetensors")
    _forget("tk_fake_ep_models", "test-ep-net")
    try:
        loaded = tk.load_model(p)  # found through the entry point, not the recorded import path
        assert "tk_fake_ep_models" in sys.modules
        assert type(loaded).__module__ == "tk_fake_ep_models" and loaded.fc.in_features == 5
        assert torch.equal(loaded.fc.weight, model.fc.weight)
    finally:
        _forget("tk_fake_ep_models", "test-ep-net")


def test_unknown_model_and_allow_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_module(tmp_path, "tk_allow_import_mod", "test-allow-import")
    monkeypatch.syspath_prepend(str(tmp_path))
    import tk_allow_import_mod

    model = tk_allow_import_mod.Net(n=4)
    p = tk.save_model(model, tmp_path / "ai.safetensors")
    _forget("tk_allow_import_mod", "test-allow-import")
    try:
        with pytest.raises(UnknownModelError) as err:
            tk.load_model(p)
        e = err.value
        assert isinstance(e, KeyError) and e.name == "test-allow-import"
        # the message lists the registered names (sorted, the first ten of however many other tests made)
        assert "test-tiny-net" in e.registered and e.registered[0] in str(e)
        assert "allow_import=True" in str(e) and "tk_allow_import_mod.Net" in str(e) and "register_model" in str(e)
        assert "tk_allow_import_mod" not in sys.modules  # nothing was imported without permission
        loaded = tk.load_model(p, allow_import=True)
        assert torch.equal(loaded.fc.weight, model.fc.weight)
    finally:
        _forget("tk_allow_import_mod", "test-allow-import")


# -- versions -------------------------------------------------------------------------------


def test_version_upgrade_hook_and_newer_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "v1").mkdir()
    _write_module(tmp_path / "v1", "tk_versioned", "test-versioned", version=1)
    monkeypatch.syspath_prepend(str(tmp_path / "v1"))
    import tk_versioned

    old = tk_versioned.Net(n=3)
    p1 = tk.save_model(old, tmp_path / "v1.safetensors")
    _forget("tk_versioned", "test-versioned")
    sys.path.remove(str(tmp_path / "v1"))
    # version 2 renamed n -> width and fc -> head; its upgrade hook migrates version 1 files
    (tmp_path / "tk_versioned.py").write_text(
        textwrap.dedent(
            """
            import torch
            import torchkeep as tk

            @tk.register_model("test-versioned", version=2)
            class Net(torch.nn.Module):
                calls = []

                def __init__(self, width=3):
                    super().__init__()
                    self.head = torch.nn.Linear(width, 2)

                @classmethod
                def upgrade(cls, config, state_dict, from_version):
                    cls.calls.append(from_version)
                    sd = {k.replace("fc.", "head."): v for k, v in state_dict.items()}
                    return {"width": config["n"]}, sd
            """
        )
    )
    try:
        import tk_versioned as v2

        loaded = tk.load_model(p1)
        assert v2.Net.calls == [1]
        assert torch.equal(loaded.head.weight, old.fc.weight)
        p2 = tk.save_model(loaded, tmp_path / "v2.safetensors")
        assert tk.inspect(p2)["model"]["version"] == 2
        # a file from version 2 cannot be read by version 1 of the class
        tk.register_model("test-versioned", version=1)(v2.Net)
        with pytest.raises(ModelVersionError) as err:
            tk.load_model(p2)
        assert err.value.file_version == 2 and err.value.registered_version == 1
        assert "version 2" in str(err.value) and "Upgrade" in str(err.value)
    finally:
        _forget("tk_versioned", "test-versioned")


# -- meta-device construction ------------------------------------------------------------------


def _record_init_devices(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    devices: list[str] = []
    original = nn.Linear.reset_parameters

    def spy(self: nn.Linear) -> None:
        devices.append(self.weight.device.type)
        original(self)

    monkeypatch.setattr(nn.Linear, "reset_parameters", spy)
    return devices


def test_large_model_is_built_on_meta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = rm.TinyNet(sizes=(512, 1024, 1024, 512))
    p = tk.save_model(model, tmp_path / "big.safetensors")
    devices = _record_init_devices(monkeypatch)
    loaded = tk.load_model(p)
    assert devices == ["meta"] * 3  # weights were never initialised on the CPU, only loaded
    assert all(t.device.type == "cpu" for t in loaded.state_dict().values())
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True)
    )


def test_fallbacks_to_normal_construction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    np_model = rm.WithNonPersistent(4)
    p = tk.save_model(np_model, tmp_path / "np.safetensors")
    devices = _record_init_devices(monkeypatch)
    loaded = tk.load_model(p)
    assert devices == ["meta", "cpu"]  # tried on meta, refused: the non-persistent buffer is not in the file
    assert torch.equal(loaded.scale, torch.full((4,), 2.0))
    x = torch.randn(2, 4)
    assert torch.equal(loaded(x), np_model(x))

    class NeedsData(nn.Module):  # __init__ reads a value: impossible on meta
        def __init__(self, n=3):
            super().__init__()
            self.fc = nn.Linear(n, n)
            self.first = float(self.fc.weight.detach()[0, 0])

    tk.register_model("test-needs-data")(NeedsData)
    monkeypatch.undo()
    nd = NeedsData()
    p = tk.save_model(nd, tmp_path / "nd.safetensors")
    loaded = tk.load_model(p)
    assert torch.equal(loaded.fc.weight, nd.fc.weight)


# -- directory layout ---------------------------------------------------------------------------


def test_directory_layout_single_and_sharded(tmp_path: Path) -> None:
    model = _nested().eval()
    x = torch.randn(3, 4)
    out = tk.save_model(model, str(tmp_path / "out") + os.sep)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["name"] == "test-tiny-net" and config["version"] == 1 and config["training"] is False
    assert config["config"]["sizes"] == [4, 6, 3] and config["torchkeep_version"] == tk.__version__
    assert set(tk.load(out / "model.safetensors")) == set(model.state_dict())  # hub-style flat names
    assert torch.equal(tk.load_model(out)(x), model(x))

    out = tk.save_model(model, out, max_shard_size=200)  # an existing directory; tiny shards
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict()) and set(index["weight_map"].values()) == set(shards)
    loaded = tk.load_model(out)
    assert loaded.training is False and torch.equal(loaded(x), model(x))

    out = tk.save_model(model, out)  # back to one file: the old shards must not shadow it
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


# -- inspect ------------------------------------------------------------------------------------


def test_inspect_shows_registry_record(tmp_path: Path) -> None:
    p = tk.save_model(_nested(), tmp_path / "m.safetensors", metadata={"run": "r1"})
    info = tk.inspect(p)
    assert info["model"]["name"] == "test-tiny-net" and info["model"]["version"] == 1
    assert info["model"]["class"] == "registered_models.TinyNet"
    assert info["metadata"] == {"run": "r1"}
    result = CliRunner().invoke(app, ["inspect", str(p)])
    assert result.exit_code == 0, result.output
    assert "test-tiny-net v1" in result.output and "sizes" in result.output and "[4, 6, 3]" in result.output
    result = CliRunner().invoke(app, ["inspect", str(p), "--json"])
    assert json.loads(result.output)["model"]["config"]["opts"]["act"] == "tanh"
    assert "model" not in tk.inspect(tk.save({"w": torch.ones(1)}, tmp_path / "plain.safetensors"))


def test_inspect_a_model_directory_single_and_sharded(tmp_path: Path) -> None:
    """`torchkeep inspect DIR` summarises the directory's model file (or its first shard)."""
    model = rm.TinyNet(sizes=(4, 64, 3))
    single = tk.save_model(model, f"{tmp_path / 'single'}/")
    sharded = tk.save_model(model, f"{tmp_path / 'sharded'}/", max_shard_size=400)
    assert (Path(sharded) / "model.safetensors.index.json").is_file()
    for d in (single, sharded):
        info = tk.inspect(d)
        assert info["model"]["name"] == "test-tiny-net"
        assert info["model"]["config"]["sizes"] == [4, 64, 3]
        result = CliRunner().invoke(app, ["inspect", str(d)])
        assert result.exit_code == 0, result.output
        assert "test-tiny-net" in result.output
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "holds no checkpoint" in result.output


# -- typed argument errors ---------------------------------------------------------------------


def test_bad_register_model_arguments_are_typed_errors() -> None:
    with pytest.raises(tk.errors.ArgumentTypeError, match="version must be a non-negative int") as info:
        tk.register_model("test-typed-v", version="2")  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError)
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"version=-1: pass a non-negative int") as info:
        tk.register_model("test-typed-v", version=-1)
    assert isinstance(info.value, ValueError)
    with pytest.raises(tk.errors.ArgumentTypeError, match="name must be a string") as info:
        tk.register_model(3)  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError)
    with pytest.raises(tk.errors.ArgumentTypeError, match=r"must be an nn\.Module subclass") as info:
        tk.register_model("test-typed-fn")(lambda: None)  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError)

    class Other(nn.Module):
        pass

    with pytest.raises(tk.errors.InvalidArgumentError, match=r"name='test-tiny-net': already registered to") as info:
        tk.register_model("test-tiny-net")(Other)
    assert isinstance(info.value, ValueError) and registry.registered_names().count("test-tiny-net") == 1


def test_to_config_returning_a_non_dict_is_a_typed_error(tmp_path: Path) -> None:
    class BadConfig(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(1, 1)

        def to_config(self) -> list:
            return [1]

    tk.register_model("test-typed-bad-config")(BadConfig)
    with pytest.raises(UnsupportedObjectError, match=r"to_config\(\) must return a dict with string keys") as info:
        tk.save_model(BadConfig(), tmp_path / "b.safetensors")
    assert isinstance(info.value, TypeError)


def test_bad_load_model_dtype_and_malformed_config_are_typed(tmp_path: Path) -> None:
    d = tk.save_model(_nested(), f"{tmp_path / 'm'}/")
    with pytest.raises(tk.errors.ArgumentTypeError, match=r"dtype must be a torch\.dtype") as info:
        tk.load_model(d, dtype="float16")  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError)
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"dtype=torch\.int8: pass a floating-point") as info:
        tk.load_model(d, dtype=torch.int8)
    assert isinstance(info.value, ValueError)
    cfg = Path(d) / registry.CONFIG_FILE
    record = json.loads(cfg.read_text())
    record["config_typed"] = {"d": {"sizes": {"T": "weights"}}}  # a config never refers to a tensor
    cfg.write_text(json.dumps(record))
    with pytest.raises(tk.errors.CorruptCheckpointError, match="malformed model config") as info:
        tk.load_model(d)
    assert isinstance(info.value, ValueError)

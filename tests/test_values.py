"""Everyday Python values in a state tree: saved without pickle, loaded as themselves, never imported by name."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime as dt
import decimal
import enum
import fractions
import json
import math
import pathlib
import sys
import typing
import uuid
import warnings
from pathlib import Path

import pytest
import torch

import torchkeep as tk
from torchkeep.errors import UnsupportedObjectError
from torchkeep.values import UnregisteredTypeWarning


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclasses.dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    out: pathlib.Path = pathlib.Path("runs/a")
    derived: int = dataclasses.field(init=False, default=0)

    def __post_init__(self) -> None:
        self.derived = 7


class Pair(typing.NamedTuple):
    a: int
    b: str


STD = {
    "namespace": argparse.Namespace(lr=0.1, out=pathlib.Path("runs/x"), layers=[64, 64]),
    "path": pathlib.Path("data/train"),
    "posix": pathlib.PurePosixPath("a/b"),
    "windows": pathlib.PureWindowsPath(r"C:\data\x"),
    "set": {3, 1, 2},
    "frozenset": frozenset({"b", "a"}),
    "mixed_set": {1, "a", None},
    "datetime": dt.datetime(2026, 12, 5, 21, 17, 8, 123456),
    "datetime_tz": dt.datetime(2026, 12, 5, 21, 17, tzinfo=dt.timezone(dt.timedelta(hours=-5, minutes=-30))),
    "date": dt.date(2026, 12, 5),
    "time": dt.time(21, 17, 8, tzinfo=dt.timezone.utc),
    "timedelta": dt.timedelta(days=-1, seconds=5, microseconds=7),
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "decimal": decimal.Decimal("1.10"),
    "fraction": fractions.Fraction(2, 6),
    "complex": complex(1.5, -2.0),
    "bytes": b"\x00\xffabc",
    "bytearray": bytearray(b"xyz"),
    "deque": collections.deque([1, 2, 3], maxlen=5),
    "counter": collections.Counter("abracadabra"),
    "defaultdict": collections.defaultdict(list, {"k": [1, 2]}),
}


def _roundtrip(tree: object, tmp_path: Path) -> object:
    return tk.load(tk.save({"x": tree}, tmp_path / "v.safetensors"))["x"]


@pytest.mark.parametrize("name", sorted(STD))
def test_standard_library_values_come_back_as_themselves(name: str, tmp_path: Path) -> None:
    value = STD[name]
    back = _roundtrip(value, tmp_path)
    assert type(back) is type(value) and back == value
    if isinstance(value, collections.deque):
        assert back.maxlen == value.maxlen
    if isinstance(value, collections.defaultdict):
        assert back.default_factory is list and back["new"] == []
    if isinstance(value, dt.datetime):
        assert back.utcoffset() == value.utcoffset()


def test_non_finite_complex_and_nested_values(tmp_path: Path) -> None:
    back = _roundtrip({"c": complex(math.inf, math.nan), "deep": [{"s": {pathlib.Path("a")}}]}, tmp_path)
    assert math.isinf(back["c"].real) and math.isnan(back["c"].imag)
    assert back["deep"][0]["s"] == {pathlib.Path("a")}


def test_sets_are_stored_in_a_stable_order(tmp_path: Path) -> None:
    """The same set saves to the same bytes whatever the hash seed (files are reproducible)."""
    a = tk.save({"s": {"delta", "alpha", "charlie", "bravo"}}, tmp_path / "a.safetensors")
    with tk.open(a) as ck:
        node = ck.skeleton["d"]["s"]
    assert node == {"V": "set", "v": ["alpha", "bravo", "charlie", "delta"]}


def test_user_classes_load_as_stand_ins_until_registered(tmp_path: Path) -> None:
    tree = {"color": Color.BLUE, "level": Level.HIGH, "opt": Optim(lr=0.5), "pair": Pair(1, "x")}
    path = tk.save({"hp": tree}, tmp_path / "u.safetensors")
    with pytest.warns(UnregisteredTypeWarning) as caught:
        plain = tk.load(path)["hp"]
    names = " ".join(str(w.message) for w in caught)
    assert "test_values.Color" in names and "register_type(Optim)" in names
    assert plain["color"] == "blue" and plain["level"] == 2
    assert plain["opt"] == {"lr": 0.5, "betas": (0.9, 0.999), "out": pathlib.Path("runs/a"), "derived": 7}
    assert plain["pair"] == (1, "x") and plain["pair"].b == "x"

    for cls in (Color, Level, Optim, Pair):
        assert tk.register_type(cls) is cls
    tk.register_type(Optim)  # again: a no-op
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnregisteredTypeWarning)
        back = tk.load(path)["hp"]
    assert back["color"] is Color.BLUE and back["level"] is Level.HIGH
    assert back["opt"] == Optim(lr=0.5) and back["opt"].derived == 7 and type(back["opt"]) is Optim
    assert back["pair"] == Pair(1, "x") and type(back["pair"]) is Pair


def test_loading_never_imports_a_class_named_in_the_file(tmp_path: Path) -> None:
    """A file naming classes in modules that are not imported loads stand-ins; the modules stay unimported."""
    from torchkeep.tree import Flat
    from torchkeep.writer import save_flat

    skeleton = {
        "d": {
            "e": {"V": "enum", "c": "antigravity.Color", "n": "RED", "v": "red"},
            "dc": {"V": "dataclass", "c": "this.Config", "v": {"d": {"lr": 0.1}}},
            "nt": {"V": "namedtuple", "c": "turtle.Pair", "f": ["a", "b"], "v": [1, "x"]},
        }
    }
    path = save_flat(Flat(skeleton=skeleton), tmp_path / "named.safetensors")
    assert not {"antigravity", "this", "turtle"} & set(sys.modules)
    with pytest.warns(UnregisteredTypeWarning, match="antigravity.Color"):
        back = tk.load(path)
    assert back["e"] == "red" and back["dc"] == {"lr": 0.1} and back["nt"] == (1, "x") and back["nt"].b == "x"
    assert not {"antigravity", "this", "turtle"} & set(sys.modules)


def test_unsupported_values_are_refused_at_save_time_naming_the_place(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedObjectError, match=r"hp\.table") as err:
        tk.save({"hp": {"table": collections.defaultdict(lambda: 0)}}, tmp_path / "x.safetensors")
    assert isinstance(err.value, TypeError)
    assert not list(tmp_path.iterdir())  # nothing written

    class Broken:
        def state_dict(self) -> dict:
            raise AttributeError("'Broken' object has no attribute 'dl_state_dict'")

        def load_state_dict(self, sd: dict) -> None:
            pass

    with pytest.raises(UnsupportedObjectError, match=r"train_loader: .*state_dict\(\) raised AttributeError"):
        tk.save({"train_loader": Broken()}, tmp_path / "y.safetensors")
    assert not list(tmp_path.iterdir())


def test_register_type_refuses_what_it_cannot_rebuild() -> None:
    with pytest.raises(tk.errors.ArgumentTypeError):
        tk.register_type(Color.RED)  # an instance, not a class
    with pytest.raises(tk.errors.InvalidArgumentError, match="state_dict"):
        tk.register_type(dict)


def test_values_are_json_in_the_header_and_inspect_names_them(tmp_path: Path) -> None:
    path = tk.save({"hp": argparse.Namespace(out=pathlib.Path("runs/a"))}, tmp_path / "n.safetensors")
    with tk.open(path) as ck:
        assert json.loads(ck.header.metadata["torchkeep.tree"])["d"]["hp"]["V"] == "namespace"
    node = tk.inspect(path)["tree"][0]
    assert node["name"] == "hp" and node["kind"] == "namespace"


def test_a_model_and_optimizer_beside_hparams_still_restore(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tk.save({"model": model, "optimizer": opt, "hp": STD["namespace"]}, tmp_path / "m.safetensors")
    fresh = torch.nn.Linear(2, 2)
    state = tk.restore(path, {"model": fresh})
    assert state["hp"] == STD["namespace"] and torch.equal(fresh.weight, model.weight)

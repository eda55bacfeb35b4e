"""A load that matches (almost) nothing is an error, and every fix a KeyMismatchError offers,
applied as written, makes that same load pass."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep as tk
from torchkeep.errors import ArgumentTypeError, InvalidArgumentError, KeyMismatchError, TooFewMatchesError


def net(classes: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Linear(5, classes))


def trained(classes: int = 4) -> nn.Module:
    model = net(classes, seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    return model


def same(a: nn.Module, b: nn.Module, keys: list[str] | None = None) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in (keys or sa))


def snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def unchanged(m: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def fixes(err: BaseException) -> list[str]:
    """The fixes an error offers, one string each, as its message writes them."""
    text = str(err).split("  fix: ", 1)[1]
    return [f for f in text.split("; ") if "pass " in f or "tk.load_into(" in f]


def options(fix: str) -> dict[str, Any]:
    """The keyword arguments a ``pass ...`` fix names, parsed as Python."""
    found = re.search(r"pass (.+?)(?= to tk\.restore| to load| \(the names| if loading)", fix)
    assert found, fix
    return eval(f"dict({found.group(1)})")  # the message's own Python: remap={...}, strict=False


# -- min_matched --------------------------------------------------------------------------------------------


def test_non_strict_load_of_nothing_is_an_error_naming_the_file_and_the_prefix(tmp_path: Path) -> None:
    path = tk.save(
        {"model": {"encoder." + k: v for k, v in trained().state_dict().items()}}, tmp_path / "c.safetensors"
    )
    model = net()
    before = snapshot(model)
    with pytest.raises(TooFewMatchesError) as info:
        tk.load_into(model, path, strict=False)
    err = info.value
    assert isinstance(err, KeyMismatchError) and isinstance(err, KeyError)
    assert err.matched == 0 and err.needed == 1 and unchanged(model, before)
    msg = str(err)
    assert str(path) in msg and "fills 0 of the model's 9" in msg and "names differ by a prefix" in msg
    assert "remap={'^encoder\\\\.': ''}" in msg and "min_matched=0" in msg
    for fix in fixes(err):  # each one, as written, makes this load pass
        model = net()
        report = tk.load_into(model, path, strict=False, **options(fix))
        assert report.matched == [] or same(model, trained())


def test_min_matched_is_a_fraction_of_the_smaller_side_or_a_count() -> None:
    sd = trained().state_dict()
    partial = {k: v for k, v in sd.items() if k.startswith("0.")} | {"x." + k: v for k, v in sd.items()}
    # 2 of the model's 9 tensors match, from a checkpoint of 11: 2 >= 0.1 * 9 but < 0.5 * 9
    assert len(tk.load_into(net(), partial, strict=False).matched) == 2
    with pytest.raises(TooFewMatchesError, match=r"at least 5 tensor\(s\) \(min_matched=0\.5\) and this one fills 2"):
        tk.load_into(net(), partial, strict=False, min_matched=0.5)
    with pytest.raises(TooFewMatchesError, match="at least 3"):
        tk.load_into(net(), partial, strict=False, min_matched=3)
    assert len(tk.load_into(net(), partial, strict=False, min_matched=2).matched) == 2
    # a small checkpoint into a big model: the checkpoint is the smaller side, all of it matches
    head = {k: v for k, v in sd.items() if k.startswith("2.")}
    assert tk.load_into(net(), head, strict=False, min_matched=1.0).matched == ["2.weight", "2.bias"]
    # min_matched=0 accepts a load of nothing (the report says so)
    assert tk.load_into(net(), {"other": torch.ones(1)}, strict=False, min_matched=0).matched == []


def test_skipping_every_mismatched_shape_loads_nothing_and_says_so() -> None:
    def mlp(width: int) -> nn.Module:
        return nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, width))

    with pytest.raises(KeyMismatchError) as info:
        tk.load_into(mlp(5), mlp(6).state_dict())
    assert "no option makes this load pass" in str(info.value) and fixes(info.value) == []
    with pytest.raises(TooFewMatchesError, match="fills 0 of the model's 4"):
        tk.load_into(mlp(5), mlp(6).state_dict(), skip_mismatched=True)


@pytest.mark.parametrize(
    ("value", "error"),
    [(-1, InvalidArgumentError), (1.5, InvalidArgumentError), (True, ArgumentTypeError), ("all", ArgumentTypeError)],
)
def test_bad_min_matched_is_refused(value: Any, error: type) -> None:
    with pytest.raises(error, match="min_matched"):
        tk.load_into(net(), trained().state_dict(), min_matched=value)


def test_no_caller_relies_on_loading_nothing(tmp_path: Path) -> None:
    """restore(strict=False) of a module whose names match nothing raises too, before touching any target;
    its fix, min_matched=0, passes (and warns about what was not loaded)."""
    path = tk.save(
        {"model": {"encoder." + k: v for k, v in trained().state_dict().items()}, "epoch": 3}, tmp_path / "c"
    )
    model = net()
    before = snapshot(model)
    with pytest.raises(TooFewMatchesError) as info:
        tk.restore(path, {"model": model}, strict=False)
    assert unchanged(model, before)
    offered = fixes(info.value)
    assert any("min_matched=0 to tk.restore" in f for f in offered), offered
    with pytest.warns(UserWarning, match="loaded what matched"):
        assert tk.restore(path, {"model": model}, strict=False, **options(offered[-1]))["epoch"] == 3


# -- every fix offered makes the load pass --------------------------------------------------------------------


def _scenarios() -> dict[str, tuple[dict[str, torch.Tensor], dict[str, Any], int]]:
    """name -> (checkpoint, load_into options, number of fixes expected)."""
    sd = trained().state_dict()
    pre = {"encoder." + k: v for k, v in sd.items()}
    return {
        "missing and unexpected": ({k: v for k, v in sd.items() if k != "2.bias"} | {"aux": torch.ones(1)}, {}, 1),
        "shapes": (trained(classes=6).state_dict(), {}, 1),
        "shapes and missing": ({k: v for k, v in trained(classes=6).state_dict().items() if k != "0.bias"}, {}, 1),
        "a prefix": (pre, {}, 1),
        "a prefix and an extra key": (pre | {"aux": torch.ones(1)}, {}, 1),  # strict=False alone loads nothing
        "a prefix after the user's remap": (
            {"enc." + k: v for k, v in sd.items()},
            {"remap": {"^enc[.]": "encoder."}},
            1,
        ),
        "a prefix, not strict": (pre, {"strict": False}, 2),
        "too few": ({k: v for k, v in sd.items() if k == "2.bias"} | {"a": torch.ones(1), "b": torch.ones(1)}, {}, 1),
    }


@pytest.mark.parametrize("name", list(_scenarios()))
def test_each_fix_offered_makes_that_load_pass(name: str) -> None:
    sd, opts, expected = _scenarios()[name]
    if name == "too few":
        opts = {"strict": False, "min_matched": 0.5}
    with pytest.raises(KeyMismatchError) as info:
        tk.load_into(net(), sd, **opts)
    offered = fixes(info.value)
    assert len(offered) == expected, str(info.value)
    for fix in offered:
        model = net()
        report = tk.load_into(model, sd, **{**opts, **options(fix)})
        assert report.matched or "min_matched=0" in fix, fix


def test_a_prefix_fix_from_restore_names_the_load_into_call_that_passes(tmp_path: Path) -> None:
    """tk.restore cannot rename; its fix is the load_into call for that module, which passes as written."""
    src = trained()
    path = tk.save({"model": {"encoder." + k: v for k, v in src.state_dict().items()}}, tmp_path / "c.safetensors")
    for strict in (True, False):
        with pytest.raises(KeyMismatchError) as info:
            tk.restore(path, {"model": net()}, strict=strict)
        calls = [f for f in fixes(info.value) if "tk.load_into(" in f]
        assert len(calls) == 1, str(info.value)
        module = net()
        call = re.search(r"(tk\.load_into\(module, .*\)) \(the names", calls[0])
        assert call, calls[0]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            report = eval(call.group(1), {"tk": tk, "module": module})
        assert report.ok and same(module, src)


def test_restore_offers_strict_false_only_when_it_passes(tmp_path: Path) -> None:
    src = trained()
    path = tk.save({"model": src}, tmp_path / "c.safetensors")
    changed = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Linear(5, 4), nn.Linear(4, 2))
    with pytest.raises(KeyMismatchError) as info:
        tk.restore(path, {"model": changed})
    (fix,) = fixes(info.value)
    with pytest.warns(UserWarning, match="3.weight"):
        tk.restore(path, {"model": changed}, **options(fix))
    assert same(changed[:3], src)


def test_key_fix_names_the_state_dicts_there_are() -> None:
    tree = {"ema": trained().state_dict(), "meta": {"step": torch.tensor(3)}}
    with pytest.raises(KeyMismatchError, match=r"its state dicts are at \['ema', 'meta'\]"):
        tk.load_into(net(), tree, key="model")
    assert tk.load_into(net(), tree, key="ema").ok

"""Stateful leaves: optimizers, schedulers, GradScaler, user objects, generators; strict restore; refused leaves."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from compare import assert_same

import torchkeep as tk
from torchkeep.errors import KeyMismatchError, TorchkeepError, UnsupportedObjectError


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, i: int) -> float:
    x, y = batch(i)
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


# ------------------------------------------------------------------------------------------------ optimizers

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.95)),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_round_trip_and_next_step(tmp_path: Path, name: str) -> None:
    make_opt = OPTIMIZERS[name]
    model = make_model(0)
    opt = make_opt(model.parameters())
    for i in range(4):
        train_step(model, opt, i)
    path = tk.save({"model": model, "optimizer": opt}, tmp_path / "ckpt.safetensors")

    # the file alone gives back the exact optimizer state dict (int state keys, tuples, bools, None)
    assert_same(tk.load(path)["optimizer"], opt.state_dict(), "optimizer")

    model2 = make_model(1)
    opt2 = make_opt(model2.parameters())
    train_step(model2, opt2, 99)  # a different, non-empty state that restore must replace
    tk.restore(path, {"model": model2, "optimizer": opt2})
    assert_same(opt2.state_dict(), opt.state_dict(), "optimizer")
    assert_same(model2.state_dict(), model.state_dict(), "model")

    # continuing from the restored objects is bitwise the same as continuing the originals
    for i in range(4, 7):
        assert train_step(model, opt, i) == train_step(model2, opt2, i)
        for (k, p), p2 in zip(model.named_parameters(), model2.parameters(), strict=True):
            assert torch.equal(p, p2), f"{name}: {k} differs after step {i}"
    assert_same(opt2.state_dict(), opt.state_dict(), "optimizer")


def test_amsgrad_state_is_saved(tmp_path: Path) -> None:
    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True)
    for i in range(2):
        train_step(model, opt, i)
    state = tk.load(tk.save({"optimizer": opt}, tmp_path / "c.safetensors"))["optimizer"]
    assert sorted(state["state"]) == [0, 1, 2, 3]
    assert set(state["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert state["param_groups"][0]["amsgrad"] is True
    assert type(state["param_groups"][0]["betas"]) is tuple


# ------------------------------------------------------------------------------------------------ schedulers


class Warmup:
    """A callable object: LambdaLR saves its __dict__ (unlike a lambda's)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, epoch: int) -> float:
        return min(1.0, (epoch + 1) / self.steps)


def _sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "steplr": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=30),
    "plateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=1),
    "lambdalr": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 0.9**e),
    "lambdalr-callable": lambda o: torch.optim.lr_scheduler.LambdaLR(o, Warmup(5)),
}

# a loss curve that improves, then stalls: ReduceLROnPlateau reduces the lr
METRICS = [1.0, 0.8, 0.7, 0.7, 0.71, 0.72, 0.69, 0.75, 0.8, 0.8, 0.8, 0.8]


def _sched_step(sched: Any, i: int) -> None:
    if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        sched.step(METRICS[i % len(METRICS)])
    else:
        sched.step()


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scheduler_round_trip(tmp_path: Path, name: str) -> None:
    make_sched = SCHEDULERS[name]
    model = make_model(0)
    opt = _sgd(model)
    sched = make_sched(opt)
    for i in range(5):
        train_step(model, opt, i)
        _sched_step(sched, i)
    path = tk.save({"model": model, "optimizer": opt, "scheduler": sched}, tmp_path / "ckpt.safetensors")
    assert_same(tk.load(path)["scheduler"], sched.state_dict(), "scheduler")

    model2 = make_model(1)
    opt2 = _sgd(model2)
    sched2 = make_sched(opt2)
    lambdas_before = list(getattr(sched2, "lr_lambdas", []))
    tk.restore(path, {"model": model2, "optimizer": opt2, "scheduler": sched2})
    assert_same(sched2.state_dict(), sched.state_dict(), "scheduler")
    assert sched2.get_last_lr() == sched.get_last_lr()
    if lambdas_before:  # the restored scheduler keeps its own (code) lambdas
        assert [type(f) for f in sched2.lr_lambdas] == [type(f) for f in lambdas_before]
        assert all(callable(f) for f in sched2.lr_lambdas)

    for i in range(5, 12):
        assert train_step(model, opt, i) == train_step(model2, opt2, i)
        _sched_step(sched, i)
        _sched_step(sched2, i)
        assert sched2.get_last_lr() == sched.get_last_lr(), f"{name}: lr differs after step {i}"
        assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, p2)
    if name == "plateau":
        assert sched.get_last_lr()[0] < 0.1  # the metrics above did trigger a reduction


def test_lambdalr_state_holds_no_lambda(tmp_path: Path) -> None:
    model = make_model(0)
    opt = _sgd(model)
    fn = lambda e: 0.5**e  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
    for _ in range(3):
        opt.step()
        sched.step()
    loaded = tk.load(tk.save({"scheduler": sched}, tmp_path / "c.safetensors"))["scheduler"]
    assert loaded["lr_lambdas"] == [None]
    assert loaded["last_epoch"] == 3

    opt2 = _sgd(make_model(0))
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, fn)
    sched2.load_state_dict(loaded)
    assert sched2.lr_lambdas == [fn]
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_lambdalr_callable_object_state_is_saved(tmp_path: Path) -> None:
    opt = _sgd(make_model(0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, Warmup(7))
    loaded = tk.load(tk.save({"scheduler": sched}, tmp_path / "c.safetensors"))["scheduler"]
    assert loaded["lr_lambdas"] == [{"steps": 7}]
    sched2 = torch.optim.lr_scheduler.LambdaLR(_sgd(make_model(0)), Warmup(3))
    tk.restore(tmp_path / "c.safetensors", {"scheduler": sched2})
    assert sched2.lr_lambdas[0].steps == 7


def test_plateau_infinite_best_round_trips(tmp_path: Path) -> None:
    for mode in ("min", "max"):
        opt = _sgd(make_model(0))
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode)
        sd = sched.state_dict()
        assert math.isinf(sd["best"])  # nothing seen yet: best is +-inf
        loaded = tk.load(tk.save({"scheduler": sched}, tmp_path / f"{mode}.safetensors"))["scheduler"]
        assert type(loaded["best"]) is float and loaded["best"] == sd["best"]
        assert loaded["mode_worse"] == sd["mode_worse"]
        sched2 = torch.optim.lr_scheduler.ReduceLROnPlateau(_sgd(make_model(0)), mode=mode)
        sched2.best = 123.0
        tk.restore(tmp_path / f"{mode}.safetensors", {"scheduler": sched2})
        assert sched2.best == sd["best"]
        assert_same(sched2.state_dict(), sd, "scheduler")


# ------------------------------------------------------------------------------------------------ GradScaler


def _cpu_scaler() -> Any:
    amp = getattr(torch, "amp", None)
    if amp is None or not hasattr(amp, "GradScaler"):
        pytest.skip("torch.amp.GradScaler is not available in this torch")
    try:
        scaler = amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    except (RuntimeError, TypeError, ValueError) as e:
        pytest.skip(f"GradScaler('cpu') is not supported here: {e}")
    if not scaler.is_enabled():
        pytest.skip("GradScaler('cpu') is disabled in this torch")
    return scaler


def _scaled_step(model: torch.nn.Module, opt: torch.optim.Optimizer, scaler: Any, i: int, overflow: bool) -> None:
    x, y = batch(i)
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    if overflow:  # an inf gradient: the scaler skips the step and backs off
        loss = loss * float("inf")
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def test_grad_scaler_round_trip(tmp_path: Path) -> None:
    scaler = _cpu_scaler()
    model = make_model(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for i in range(6):
        _scaled_step(model, opt, scaler, i, overflow=i == 0)
    sd = scaler.state_dict()
    # backed off once, then grew twice, one step into the next interval: a non-default state
    assert (sd["scale"], sd["_growth_tracker"]) == (2.0**11, 1)
    path = tk.save({"model": model, "optimizer": opt, "scaler": scaler}, tmp_path / "c.safetensors")
    assert_same(tk.load(path)["scaler"], sd, "scaler")

    model2 = make_model(1)
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    scaler2 = _cpu_scaler()
    tk.restore(path, {"model": model2, "optimizer": opt2, "scaler": scaler2})
    assert_same(scaler2.state_dict(), sd, "scaler")
    assert scaler2.get_scale() == scaler.get_scale()
    for i in range(6, 10):
        _scaled_step(model, opt, scaler, i, overflow=i == 8)
        _scaled_step(model2, opt2, scaler2, i, overflow=i == 8)
        assert scaler2.get_scale() == scaler.get_scale()
    for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, p2)


# ------------------------------------------------------------------------------------------------ user objects, generators


class Counter:
    """A user class that is Stateful only through state_dict / load_state_dict."""

    def __init__(self) -> None:
        self.n = 0
        self.history: list[float] = []
        self.ema = torch.zeros(3)
        self.name = "fresh"

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "history": list(self.history), "ema": self.ema.clone(), "name": self.name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n = state["n"]
        self.history = list(state["history"])
        self.ema = state["ema"].clone()
        self.name = state["name"]


def test_user_stateful_round_trip(tmp_path: Path) -> None:
    c = Counter()
    c.n, c.history, c.ema, c.name = 5, [0.5, float("inf"), -2.0], torch.tensor([1.0, 2.5, -3.0]), "run-7"
    path = tk.save({"counter": c, "nested": {"inner": c}}, tmp_path / "c.safetensors")
    assert_same(tk.load(path)["counter"], c.state_dict(), "counter")

    c2, c3 = Counter(), Counter()
    state = tk.restore(path, {"counter": c2, "nested": {"inner": c3}})
    for restored in (c2, c3):
        assert (restored.n, restored.history, restored.name) == (5, [0.5, float("inf"), -2.0], "run-7")
        assert torch.equal(restored.ema, c.ema)
    assert state["counter"]["n"] == 5


def test_generator_leaf_restored_into_generator(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1234)
    torch.rand(17, generator=g)  # advance it somewhere non-trivial
    path = tk.save({"gen": g, "epoch": 3}, tmp_path / "c.safetensors")
    expected = torch.rand(50, generator=g)

    loaded = tk.load(path)["gen"]
    assert isinstance(loaded, torch.Generator)
    assert torch.equal(torch.rand(50, generator=loaded), expected)

    target = torch.Generator().manual_seed(999)
    state = tk.restore(path, {"gen": target})
    assert state["epoch"] == 3
    assert torch.equal(torch.rand(50, generator=target), expected)


# ------------------------------------------------------------------------------------------------ strict restore


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 8)
        self.fc2 = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class ChangedNet(torch.nn.Module):
    """fc2 renamed to head, one layer added: two unexpected and four missing keys."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 8)
        self.head = torch.nn.Linear(8, 2)
        self.extra = torch.nn.Linear(2, 2)


def _params(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _saved_net(tmp_path: Path) -> tuple[Net, Path]:
    torch.manual_seed(0)
    net = Net()
    return net, tk.save({"model": net, "epoch": 1}, tmp_path / "net.safetensors")


def test_strict_restore_lists_missing_and_unexpected_keys(tmp_path: Path) -> None:
    _, path = _saved_net(tmp_path)
    torch.manual_seed(1)
    changed = ChangedNet()
    before = _params(changed)
    with pytest.raises(KeyMismatchError) as info:
        tk.restore(path, {"model": changed})
    e = info.value
    assert isinstance(e, KeyError) and isinstance(e, TorchkeepError)
    assert e.missing == ["extra.bias", "extra.weight", "head.bias", "head.weight"]
    assert e.unexpected == ["fc2.bias", "fc2.weight"]
    msg = str(e)
    for key in [*e.missing, *e.unexpected]:
        assert key in msg
    assert "strict=False" in msg
    assert_same(_params(changed), before, "model")  # validate-first: nothing was copied, not even fc1


def test_strict_restore_reports_shape_mismatch(tmp_path: Path) -> None:
    _, path = _saved_net(tmp_path)
    wider = Net()
    wider.fc2 = torch.nn.Linear(8, 5)
    before = _params(wider)
    with pytest.raises(KeyMismatchError) as info:
        tk.restore(path, {"model": wider})
    assert [k for k, _, _ in info.value.mismatched] == ["fc2.bias", "fc2.weight"]
    assert "fc2.weight" in str(info.value)
    assert_same(_params(wider), before, "model")


def test_failed_strict_restore_changes_no_target(tmp_path: Path) -> None:
    torch.manual_seed(0)
    a, b = Net(), Net()
    opt = torch.optim.Adam(a.parameters())
    train_x = torch.randn(3, 4)
    a(train_x).sum().backward()
    opt.step()
    counter = Counter()
    counter.n = 9
    path = tk.save({"a": a, "opt": opt, "b": b, "counter": counter}, tmp_path / "c.safetensors")

    torch.manual_seed(1)
    a2, b_changed = Net(), ChangedNet()
    opt2 = torch.optim.Adam(a2.parameters())
    counter2 = Counter()
    before_a, before_b, before_opt = _params(a2), _params(b_changed), copy.deepcopy(opt2.state_dict())
    # "a", "opt" and "counter" would load fine; "b" does not match: nothing may be touched
    with pytest.raises(KeyMismatchError):
        tk.restore(path, {"a": a2, "opt": opt2, "counter": counter2, "b": b_changed})
    assert_same(_params(a2), before_a, "a")
    assert_same(_params(b_changed), before_b, "b")
    assert_same(opt2.state_dict(), before_opt, "opt")
    assert counter2.n == 0


def test_optimizer_over_other_parameters_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(2, 4)).sum().backward()
    opt.step()
    path = tk.save({"model": net, "optimizer": opt}, tmp_path / "c.safetensors")
    changed = ChangedNet()  # six parameters where the checkpoint's optimizer had four
    opt2 = torch.optim.Adam(changed.parameters(), lr=0.5)
    net2 = Net()
    before_net = _params(net2)
    with pytest.raises(KeyMismatchError) as info:
        tk.restore(path, {"model": net2, "optimizer": opt2})
    assert "optimizer" in str(info.value)
    assert opt2.state_dict()["state"] == {} and opt2.param_groups[0]["lr"] == 0.5
    assert_same(_params(net2), before_net, "model")


def test_non_strict_restore_loads_matching_keys_and_warns(tmp_path: Path) -> None:
    net, path = _saved_net(tmp_path)
    torch.manual_seed(1)
    changed = ChangedNet()
    before = _params(changed)
    with pytest.warns(UserWarning, match="fc2.weight") as rec:
        state = tk.restore(path, {"model": changed}, strict=False)
    text = "\n".join(str(w.message) for w in rec)
    assert "head.weight" in text and "extra.bias" in text
    assert state["epoch"] == 1
    assert torch.equal(changed.fc1.weight, net.fc1.weight) and torch.equal(changed.fc1.bias, net.fc1.bias)
    for k in ("head.weight", "head.bias", "extra.weight", "extra.bias"):
        assert torch.equal(changed.state_dict()[k], before[k]), f"{k} must stay as it was"


def test_target_absent_from_checkpoint(tmp_path: Path) -> None:
    _, path = _saved_net(tmp_path)
    net = Net()
    other = Net()
    before = _params(net)
    with pytest.raises(KeyMismatchError) as info:
        tk.restore(path, {"model": net, "ema_model": other})
    assert "ema_model" in info.value.missing
    assert_same(_params(net), before, "model")
    with pytest.warns(UserWarning, match="ema_model"):
        tk.restore(path, {"model": net, "ema_model": other}, strict=False)
    assert not torch.equal(net.fc1.weight, before["fc1.weight"])


# ------------------------------------------------------------------------------------------------ refused leaves


class Plain:
    """Neither data nor Stateful."""

    def __init__(self) -> None:
        self.x = 1


BAD_TREES: dict[str, tuple[Callable[[Any], Any], str]] = {
    "lambda": (lambda fh: {"epoch": 1, "config": {"lr": 0.1, "callback": lambda x: x}}, "config.callback"),
    "open-file": (lambda fh: {"model": {"w": torch.zeros(2)}, "log": fh}, "log"),
    "instance": (lambda fh: {"config": {"obj": Plain()}}, "config.obj"),
    "in-list": (lambda fh: {"items": [1, 2.0, Plain()]}, "items[2]"),
    "in-tuple": (lambda fh: {"cfg": {"pair": (torch.ones(1), object())}}, "cfg.pair[1]"),
}


@pytest.mark.parametrize("case", sorted(BAD_TREES))
def test_unsupported_leaf_names_its_path_and_writes_nothing(tmp_path: Path, case: str) -> None:
    make_tree, where = BAD_TREES[case]
    out = tmp_path / "out"
    out.mkdir()
    target = out / "ckpt.safetensors"
    with open(tmp_path / "log.txt", "w") as fh, pytest.raises(UnsupportedObjectError) as info:
        tk.save(make_tree(fh), target)
    e = info.value
    assert isinstance(e, TypeError) and isinstance(e, TorchkeepError)
    assert e.path == where
    assert str(e).startswith(f"{where}: cannot save")
    assert list(out.iterdir()) == []  # no file, no temp file


def test_unsupported_leaf_leaves_existing_file_untouched(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.safetensors"
    tk.save({"epoch": 1, "w": torch.arange(4.0)}, target)
    before = target.read_bytes()
    stat = target.stat()
    with pytest.raises(UnsupportedObjectError, match=r"config\.callback"):
        tk.save({"epoch": 2, "w": torch.zeros(4), "config": {"callback": print}}, target)
    assert target.read_bytes() == before
    assert target.stat().st_ino == stat.st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]
    assert tk.load(target)["epoch"] == 1


def test_unsupported_leaf_inside_optimizer_state(tmp_path: Path) -> None:
    model = make_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.param_groups[0]["foo"] = lambda: 0
    with pytest.raises(UnsupportedObjectError) as info:
        tk.save({"optimizer": opt}, tmp_path / "c.safetensors")
    assert info.value.path == "optimizer.param_groups[0].foo"
    assert "<lambda>" in str(info.value) or "lambda" in str(info.value)
    assert list(tmp_path.iterdir()) == []

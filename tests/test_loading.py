"""load_into: prefix repair, strictness, shapes, dtypes, identity, tied weights, buffers, devices."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep as tk
from torchkeep.errors import DtypeMismatchError, KeyMismatchError, TorchkeepError
from torchkeep.loading import LoadReport, load_into

FIXTURES = Path(__file__).parent / "fixtures" / "legacy"


class Net(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(classes)
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def trained() -> Net:
    """A Net whose weights and BatchNorm buffers all differ from a fresh one."""
    torch.manual_seed(123)
    net = Net()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    net.train()
    net(torch.randn(2, 1, 5, 5))  # moves running_mean/var, num_batches_tracked -> 1
    return net


def fresh() -> Net:
    torch.manual_seed(7)
    return Net()


def assert_same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


# -- prefixes -------------------------------------------------------------------------------------


def test_dataparallel_state_dict_has_module_prefix_and_loads_into_plain_model(tmp_path: Path) -> None:
    src = trained()
    dp = nn.DataParallel(src)
    assert all(k.startswith("module.") for k in dp.state_dict())
    torch.save(dp.state_dict(), tmp_path / "dp.pth")
    model = fresh()
    report = load_into(model, tmp_path / "dp.pth")
    assert report.ok and report.renamed == [("module.", "", len(src.state_dict()))]
    assert_same(model, src)
    assert model.bn.num_batches_tracked.item() == 1


def test_plain_checkpoint_into_dataparallel_wrapper(tmp_path: Path) -> None:
    src = trained()
    tk.save({"model": src}, tmp_path / "c.safetensors")
    target = nn.DataParallel(fresh())
    report = load_into(target, tmp_path / "c.safetensors")
    assert report.ok and report.renamed == [("", "module.", 9)]
    assert_same(target.module, src)


def test_ddp_style_prefixed_dict_in_memory() -> None:
    src = trained()
    ddp = OrderedDict(("module." + k, v) for k, v in src.state_dict().items())
    model = fresh()
    report = load_into(model, ddp)
    assert report.source == "<memory>" and report.ok
    assert_same(model, src)


def test_compiled_module_state_dict_loads_into_plain_and_back(tmp_path: Path) -> None:
    src = trained()
    compiled = torch.compile(src)  # never run: its state_dict is just the prefixed one
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    tk.save({"model": compiled.state_dict()}, tmp_path / "c.safetensors")
    plain = fresh()
    assert load_into(plain, tmp_path / "c.safetensors").renamed == [("_orig_mod.", "", 9)]
    assert_same(plain, src)
    # a plain checkpoint into a compiled wrapper: the prefix is added, parameters shared
    target_inner = fresh()
    target = torch.compile(target_inner)
    report = load_into(target, src.state_dict())
    assert report.renamed == [("", "_orig_mod.", 9)]
    assert_same(target_inner, src)


def test_dataparallel_of_compiled_into_plain() -> None:
    src = trained()
    sd = {"module._orig_mod." + k: v for k, v in src.state_dict().items()}
    model = fresh()
    assert load_into(model, sd).renamed == [("module._orig_mod.", "", 9)]
    assert_same(model, src)


def test_remap_regex_and_callable() -> None:
    src = trained()
    sd = {k.replace("fc.", "head.").replace("conv.", "stem.0."): v for k, v in src.state_dict().items()}
    with pytest.raises(KeyMismatchError):
        load_into(fresh(), sd)
    model = fresh()
    report = load_into(model, sd, remap={r"^head\.": "fc.", r"^stem\.0\.": "conv."})
    assert report.ok and report.renamed == [(r"^head\.", "fc.", 2), (r"^stem\.0\.", "conv.", 2)]
    assert_same(model, src)

    sd["extra.step"] = torch.tensor(3)
    model = fresh()
    report = load_into(
        model,
        sd,
        remap=lambda k: None if k.startswith("extra.") else k.replace("head.", "fc.").replace("stem.0.", "conv."),
    )
    assert report.ok and report.dropped == ["extra.step"]
    assert report.renamed == [("<callable>", "<callable>", 4)]
    assert_same(model, src)


def test_unknown_prefix_error_suggests_remap() -> None:
    sd = {"backbone." + k: v for k, v in trained().state_dict().items()}
    with pytest.raises(KeyMismatchError) as e:
        load_into(fresh(), sd)
    assert "remap={'^backbone\\\\.': ''}" in str(e.value)
    model = fresh()
    assert load_into(model, sd, remap={r"^backbone\.": ""}).ok


# -- strictness, shapes, dtypes -------------------------------------------------------------------


def test_changed_head_loads_with_skip_mismatched_and_report_names_it(tmp_path: Path) -> None:
    src = trained()
    tk.save({"model": src}, tmp_path / "c.safetensors")
    model = Net(classes=10)
    head_before = model.fc.weight.clone()
    with pytest.raises(KeyMismatchError) as e:
        load_into(model, tmp_path / "c.safetensors")
    msg = str(e.value)
    assert "fc.weight (4, 3) vs (10, 3)" in msg and "fc.bias" in msg and "skip_mismatched=True" in msg
    assert e.value.mismatched == [("fc.bias", (4,), (10,)), ("fc.weight", (4, 3), (10, 3))]
    report = load_into(model, tmp_path / "c.safetensors", skip_mismatched=True)
    assert [m[0] for m in report.mismatched] == ["fc.bias", "fc.weight"]
    assert "fc.weight" in str(report) and not report.ok
    assert torch.equal(model.fc.weight, head_before)
    assert torch.equal(model.conv.weight, src.conv.weight)
    assert torch.equal(model.bn.running_var, src.bn.running_var)


def test_strict_error_lists_names_and_fix_and_loads_nothing() -> None:
    src = trained().state_dict()
    sd = {k: v for k, v in src.items() if not k.startswith("bn.")}
    sd["aux.weight"] = torch.ones(2)
    model = fresh()
    before = snapshot(model)
    with pytest.raises(KeyMismatchError) as e:
        load_into(model, sd)
    err = e.value
    assert isinstance(err, KeyError) and isinstance(err, TorchkeepError)
    assert err.missing == ["bn.bias", "bn.num_batches_tracked", "bn.running_mean", "bn.running_var", "bn.weight"]
    assert err.unexpected == ["aux.weight"]
    assert "strict=False" in str(err) and "missing in checkpoint (5)" in str(err)
    for k, v in model.state_dict().items():  # half-loaded never
        assert torch.equal(v, before[k]), k
    report = load_into(model, sd, strict=False)
    assert report.missing == err.missing and report.unexpected == ["aux.weight"] and not report.ok
    assert torch.equal(model.conv.weight, src["conv.weight"])
    assert torch.equal(model.bn.weight, before["bn.weight"])
    assert "missing 5" in str(report) and "unexpected 1: aux.weight" in str(report)
    json.dumps(report.to_dict())


def test_strict_failure_with_shapes_and_missing_needs_both_options() -> None:
    sd = {k: v for k, v in Net(classes=6).state_dict().items() if k != "conv.bias"}
    with pytest.raises(KeyMismatchError) as e:
        load_into(fresh(), sd)
    assert "strict=False, skip_mismatched=True" in str(e.value)
    assert load_into(fresh(), sd, strict=False, skip_mismatched=True).missing == ["conv.bias"]


def test_dtype_cast_reported_and_error_policy() -> None:
    src = trained()
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in src.state_dict().items()}
    model = fresh()
    before = snapshot(model)
    with pytest.raises(DtypeMismatchError) as e:
        load_into(model, sd, dtype_policy="error")
    assert isinstance(e.value, TypeError) and "conv.weight float16 -> float32" in str(e.value)
    assert torch.equal(model.conv.weight, before["conv.weight"])
    report = load_into(model, sd)
    assert ("conv.weight", "float16", "float32") in report.cast and len(report.cast) == 8  # all but num_batches_tracked
    assert model.conv.weight.dtype == torch.float32
    assert torch.equal(model.conv.weight, src.conv.weight.half().float())
    with pytest.raises(ValueError):
        load_into(model, sd, dtype_policy="bogus")


# -- identity, ties, buffers ----------------------------------------------------------------------


def test_parameter_identity_and_optimizer_keep_working(tmp_path: Path) -> None:
    src = trained()
    tk.save({"model": src}, tmp_path / "c.safetensors")
    model = fresh()
    params = {n: p for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    load_into(model, tmp_path / "c.safetensors")
    assert all(p is params[n] for n, p in model.named_parameters())
    assert opt.param_groups[0]["params"][0] is model.conv.weight
    loss = model(torch.randn(2, 1, 5, 5)).sum()
    loss.backward()
    w = model.fc.weight.detach().clone()
    opt.step()
    assert not torch.equal(model.fc.weight, w)  # the optimizer still updates the live parameters


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.emb.weight


def test_tied_weights_stay_tied_and_deduplicated_checkpoint_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = Tied()
    tk.save({"model": src}, tmp_path / "c.safetensors")
    model = Tied()
    report = load_into(model, tmp_path / "c.safetensors")
    assert report.ok and model.out.weight is model.emb.weight
    assert torch.equal(model.emb.weight, src.emb.weight)
    # a checkpoint that stores the tied weight once (as Hugging Face files do)
    only = {"emb.weight": torch.full((5, 3), 2.0)}
    model = Tied()
    report = load_into(model, only)
    assert report.ok and sorted(report.matched) == ["emb.weight", "out.weight"]
    assert model.out.weight is model.emb.weight and model.out.weight.eq(2).all()


def test_batchnorm_buffers_load(tmp_path: Path) -> None:
    src = trained()
    torch.save({"epoch": 1, "model_state_dict": src.state_dict()}, tmp_path / "c.pt")
    model = fresh()
    report = load_into(model, tmp_path / "c.pt")
    assert {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"} <= set(report.matched)
    assert torch.equal(model.bn.running_mean, src.bn.running_mean)
    assert model.bn.num_batches_tracked.item() == 1


# -- devices --------------------------------------------------------------------------------------


def test_cuda_tagged_legacy_fixture_loads_on_cpu() -> None:
    class Fixture(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(3, 4))
            self.bias = nn.Parameter(torch.zeros(3))
            self.tied = nn.Parameter(torch.zeros(3, 4))

    model = Fixture()
    report = load_into(model, FIXTURES / "cuda0.pt")
    assert report.ok and report.key == "model"
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 8
    assert torch.equal(model.weight, w) and torch.equal(model.tied, w)
    assert model.bias.tolist() == [0.5, -1.0, 2.0]
    lin = nn.Linear(4, 3)
    report = load_into(lin, FIXTURES / "cuda0.pt", strict=False, map_location={"cuda:0": "cpu"})
    assert report.unexpected == ["tied"] and torch.equal(lin.weight, w)


def test_map_location_callable_and_unavailable_device() -> None:
    src = trained()
    seen = []

    def fn(t: torch.Tensor, dev: str) -> torch.Tensor:
        seen.append(dev)
        return t * 2

    model = fresh()
    load_into(model, src.state_dict(), map_location=fn)
    assert set(seen) == {"cpu"} and torch.equal(model.fc.weight, src.fc.weight * 2)
    if not torch.cuda.is_available():
        before = snapshot(model)
        with pytest.raises(tk.errors.DeviceUnavailableError):
            load_into(model, src.state_dict(), map_location="cuda:0")
        assert torch.equal(model.fc.weight, before["fc.weight"])


def test_report_str_and_dict_are_compact() -> None:
    names = [f"layer{i}.weight" for i in range(25)]
    r = LoadReport(matched=names, missing=names, source="x.pt", key="model")
    text = str(r)
    assert text.startswith("x.pt [model]: loaded 25 tensors") and "(15 more)" in text
    assert json.loads(json.dumps(r.to_dict()))["key"] == "model"
    assert LoadReport().ok


def test_non_module_target_rejected() -> None:
    with pytest.raises(TypeError):
        load_into({"w": torch.ones(1)}, {"w": torch.ones(1)})  # type: ignore[arg-type]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loads_onto_each_parameters_own_device(tmp_path: Path) -> None:
    src = trained()
    p = tk.save({"model": src}, tmp_path / "c.safetensors")
    model = fresh().cuda()
    weight = model.conv.weight
    report = load_into(model, p)
    assert report.ok and model.conv.weight is weight and weight.is_cuda
    assert torch.equal(model.fc.weight.cpu(), src.fc.weight)
    with pytest.raises(tk.errors.TooFewMatchesError):  # names differ: nothing to copy is an error, nothing broken
        load_into(model, FIXTURES / "cuda0.pt", strict=False, key="model")
    assert model.conv.weight is weight and torch.equal(model.fc.weight.cpu(), src.fc.weight)
    assert load_into(model, FIXTURES / "cuda0.pt", strict=False, key="model", min_matched=0).matched == []
    cuda_sd = {k: v.cuda() for k, v in src.state_dict().items()}
    cpu_model = fresh()
    assert load_into(cpu_model, cuda_sd).ok and not cpu_model.conv.weight.is_cuda


def test_restore_repairs_prefixes_like_load_into(tmp_path: Path) -> None:
    """tk.restore plans module targets with load_into's rules: a DataParallel checkpoint restores
    into the plain model (and its optimizer), and the plain one into a compiled wrapper."""
    torch.manual_seed(0)
    trained = torch.nn.DataParallel(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)))
    opt = torch.optim.Adam(trained.parameters())
    trained(torch.randn(3, 4)).sum().backward()
    opt.step()
    path = tk.save({"model": trained, "optimizer": opt, "epoch": 2}, tmp_path / "dp.safetensors")

    plain = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    plain_opt = torch.optim.Adam(plain.parameters())
    state = tk.restore(path, {"model": plain, "optimizer": plain_opt})
    assert state["epoch"] == 2
    for k, v in trained.module.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k
    assert torch.equal(plain_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])

    compiled = torch.compile(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)))
    tk.restore(tk.save({"model": plain}, tmp_path / "plain.safetensors"), {"model": compiled})
    assert torch.equal(compiled._orig_mod[0].weight, plain[0].weight)


# -- typed argument errors ---------------------------------------------------------------------


def test_bad_load_into_arguments_are_typed_errors() -> None:
    sd = nn.Linear(2, 2).state_dict()
    with pytest.raises(tk.errors.ArgumentTypeError, match=r"model must be an nn\.Module") as info:
        load_into({"w": torch.ones(2)}, sd)  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError) and isinstance(info.value, TorchkeepError)
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"dtype_policy='strict': pass \"cast\"") as info:
        load_into(nn.Linear(2, 2), sd, dtype_policy="strict")
    assert isinstance(info.value, ValueError)
    with pytest.raises(tk.errors.ArgumentTypeError, match="remap must be a dict of regex") as info:
        load_into(nn.Linear(2, 2), sd, remap=[("a", "b")])  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError)
    with pytest.raises(tk.errors.InvalidArgumentError, match="not a valid regular expression") as info:
        load_into(nn.Linear(2, 2), sd, remap={"(": ""})
    assert isinstance(info.value, ValueError) and info.value.argument == "remap"


def test_load_into_the_meta_device_is_refused_before_copying() -> None:
    model = nn.Linear(2, 2)
    before = model.weight.detach().clone()
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"map_location='meta': load_into copies values") as info:
        load_into(model, nn.Linear(2, 2).state_dict(), map_location="meta")
    assert isinstance(info.value, ValueError) and torch.equal(model.weight, before)


def test_plan_into_names_the_options_of_its_caller() -> None:
    """tk.restore has no skip_mismatched: its mismatch error must point at strict=False."""
    from torchkeep.loading import plan_into

    def two(out: int) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 3), nn.Linear(3, out))

    big = two(4).state_dict()  # the same body, a wider head
    args = {"strict": True, "skip_mismatched": False, "label": "c.safetensors", "key": "model"}
    with pytest.raises(KeyMismatchError) as as_load_into:
        plan_into(two(2), big, **args)
    assert "skip_mismatched=True" in str(as_load_into.value)
    with pytest.raises(KeyMismatchError) as as_restore:
        plan_into(two(2), big, **args, caller="restore")
    msg = str(as_restore.value)
    assert "skip_mismatched" not in msg and "pass strict=False to tk.restore" in msg and "warn" in msg
    assert "1.weight (4, 3) vs (2, 3)" in msg
    missing = {**{k: v for k, v in big.items() if k.startswith("0.")}, "1.weight": big["1.weight"][:2]}
    with pytest.raises(KeyMismatchError, match=r"strict=False to tk\.restore") as info:
        plan_into(two(2), missing, **args, caller="restore")  # a missing bias and fitting weights: only strict=False
    assert "skip_mismatched" not in str(info.value)
    whole = nn.Linear(3, 4).state_dict()  # every shape differs: no option would load anything, none is offered
    with pytest.raises(KeyMismatchError, match="no option makes this load pass") as info:
        plan_into(nn.Linear(3, 2), whole, **args)
    assert "pass" not in str(info.value).split("fix:")[1].replace("no option makes this load pass", "")
    with pytest.raises(tk.errors.InvalidArgumentError, match="caller='api'"):
        plan_into(two(2), big, **args, caller="api")

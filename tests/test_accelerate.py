"""Accelerate: save_state/load_state as one torchkeep file, resumed bit-exactly with a real Accelerator(cpu=True)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("accelerate", reason="pip install 'torchkeep[accelerate]'")
sys.path.insert(0, str(Path(__file__).parent / "helpers"))

from accel_train import build, train

import torchkeep as tk
from torchkeep.errors import InvalidArgumentError
from torchkeep.integrations.accelerate import STATE_FILE, load_state, loader_state, save_state

pytestmark = pytest.mark.filterwarnings("ignore")


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    for (name, p), q in zip(a["model"].named_parameters(), b["model"].parameters(), strict=True):
        assert torch.equal(p, q), name
    sa, sb = a["opt"].state_dict(), b["opt"].state_dict()
    assert sa["state"].keys() == sb["state"].keys() and sa["state"]
    for k, st in sa["state"].items():
        for n, v in st.items():
            assert torch.equal(v, sb["state"][k][n]), (k, n)
    assert a["sched"].state_dict() == b["sched"].state_dict()
    assert a["counter"].seen == b["counter"].seen and torch.equal(a["counter"].total, b["counter"].total)


@pytest.fixture(scope="module")
def whole() -> dict[str, Any]:
    run = build()
    train(run, 3)
    return run


def test_resume_is_bitwise(whole: dict[str, Any], tmp_path: Path) -> None:
    first = build()
    train(first, 1)
    save_state(first["accelerator"], tmp_path, extra={"epoch": 1, "note": "after epoch 1"})
    expected_draw = torch.rand(2)  # what the interrupted run would have drawn next
    assert os.listdir(tmp_path) == [STATE_FILE]  # no pickles beside it

    resumed = build()
    got = load_state(resumed["accelerator"], tmp_path)
    assert got["extra"] == {"epoch": 1, "note": "after epoch 1"}
    assert torch.equal(torch.rand(2), expected_draw)  # RNG restored
    tk.RNGState().load_state_dict(tk.load(tmp_path / STATE_FILE)["rng"])  # undo the draw
    train(resumed, 2)
    _same(whole, resumed)


def test_rng_matters(whole: dict[str, Any], tmp_path: Path) -> None:
    """The control: restoring everything but the RNG (shuffle order and dropout) ends elsewhere."""
    first = build()
    train(first, 1)
    save_state(first["accelerator"], tmp_path)
    resumed = build()
    load_state(resumed["accelerator"], tmp_path)
    torch.manual_seed(999)
    train(resumed, 2)
    with pytest.raises(AssertionError):
        _same(whole, resumed)


def test_failed_restore_touches_nothing(tmp_path: Path) -> None:
    first = build()
    save_state(first["accelerator"], tmp_path)
    other = build()
    before = [p.detach().clone() for p in other["model"].parameters()]
    other["accelerator"]._models.append(torch.nn.Linear(2, 2))  # a model the file does not hold
    with pytest.raises(KeyError):
        load_state(other["accelerator"], tmp_path)
    assert all(torch.equal(p, q) for p, q in zip(other["model"].parameters(), before, strict=True))


def test_stock_save_state_folder_restores_without_pickle(whole: dict[str, Any], tmp_path: Path) -> None:
    """A folder from an unmodified ``accelerator.save_state``: optimizer.bin, random_states_0.pkl (NumPy arrays),
    custom_checkpoint_0.pkl... read by torchkeep without trust_pickle."""
    first = build()
    train(first, 1)
    first["accelerator"].save_state(str(tmp_path))
    assert "random_states_0.pkl" in os.listdir(tmp_path)
    resumed = build()
    load_state(resumed["accelerator"], tmp_path)
    train(resumed, 2)
    _same(whole, resumed)


def test_seedable_sampler_epoch_is_kept(tmp_path: Path) -> None:
    """With use_seedable_sampler the permutation follows the loader's epoch counter, which is saved too."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    def loader() -> Any:
        acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
        data = torch.utils.data.TensorDataset(torch.arange(16.0))
        return acc, acc.prepare(torch.utils.data.DataLoader(data, batch_size=4, shuffle=True))

    acc, dl = loader()
    for _ in range(2):
        list(dl)
    save_state(acc, tmp_path)
    expected = [b[0].tolist() for b in dl]
    acc2, dl2 = loader()
    load_state(acc2, tmp_path)
    assert [b[0].tolist() for b in dl2] == expected


def test_loader_state_is_stateful_for_a_plain_dataloader(tmp_path: Path) -> None:
    run = build()
    train(run, 1)
    path = tk.save({"loader": loader_state(run["loader"])}, tmp_path / "l.safetensors")
    assert tk.load(path)["loader"]["iteration"] == 1
    other = build()
    tk.restore(path, {"loader": loader_state(other["loader"])})
    assert other["loader"].iteration == 1


def test_sharded_setups_are_refused() -> None:
    class Fake:
        class distributed_type:
            name = "FSDP"

    with pytest.raises(InvalidArgumentError, match="FSDP"):
        save_state(Fake(), "unused")


def test_stock_custom_state_of_a_class_you_name_loads_with_allow_globals(tmp_path: Path) -> None:
    import argparse

    first = build()
    train(first, 1)
    first["accelerator"].save_state(str(tmp_path))
    custom = tmp_path / "custom_checkpoint_0.pkl"
    state = torch.load(custom, weights_only=True)
    torch.save({**state, "args": argparse.Namespace(lr=0.1)}, custom)  # a plain-data class in the state
    with pytest.raises(tk.errors.UnsafeCheckpointError, match=r"argparse\.Namespace"):
        load_state(build()["accelerator"], tmp_path)
    resumed = build()
    load_state(resumed["accelerator"], tmp_path, allow_globals=["argparse.Namespace"])
    assert resumed["counter"].seen == first["counter"].seen

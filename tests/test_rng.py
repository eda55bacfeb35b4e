"""RNGState: Python random, NumPy's global RNG, torch's CPU generator and every CUDA device's."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import torchkeep as tk

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def draw() -> dict[str, Any]:
    """Numbers from every global generator, including the cached-Gaussian paths of Python and NumPy."""
    return {
        "python": [random.random() for _ in range(5)] + [random.gauss(0, 1) for _ in range(3)],
        "numpy": np.concatenate([np.random.rand(5), np.random.standard_normal(3)]),
        "torch": torch.cat([torch.rand(5), torch.randn(3), torch.randint(0, 1000, (4,)).float()]),
    }


def assert_draws_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["python"] == b["python"]
    np.testing.assert_array_equal(a["numpy"], b["numpy"])
    assert torch.equal(a["torch"], b["torch"])


def scramble() -> None:
    random.seed(987)
    np.random.seed(987)
    torch.manual_seed(987)


def advance() -> None:
    """Seed, then leave every generator mid-stream with a cached Gaussian pending.

    ``draw`` takes an odd number of Gaussians: Python and NumPy's legacy RandomState then
    hold the second value of the last pair, which the state must carry too.
    """
    random.seed(42)
    np.random.seed(42)
    torch.manual_seed(42)
    draw()
    assert random.getstate()[2] is not None
    assert np.random.get_state(legacy=True)[3] == 1


def test_save_restore_every_generator(tmp_path: Path) -> None:
    advance()
    path = tk.save({"rng": tk.RNGState(), "epoch": 2}, tmp_path / "c.safetensors")
    expected = draw()
    scramble()
    assert draw()["python"] != expected["python"]
    state = tk.restore(path, {"rng": tk.RNGState()})
    assert state["epoch"] == 2
    assert_draws_equal(draw(), expected)


def test_restore_twice_gives_same_numbers(tmp_path: Path) -> None:
    advance()
    path = tk.save({"rng": tk.RNGState()}, tmp_path / "c.safetensors")
    tk.restore(path, {"rng": tk.RNGState()})
    first = draw()
    scramble()
    tk.restore(path, {"rng": tk.RNGState()})
    assert_draws_equal(draw(), first)


def test_state_dict_round_trip_in_memory() -> None:
    advance()
    sd = tk.RNGState().state_dict()
    expected = draw()
    scramble()
    tk.RNGState().load_state_dict(sd)
    assert_draws_equal(draw(), expected)


def test_state_is_plain_data_in_the_file(tmp_path: Path) -> None:
    advance()
    tree = tk.load(tk.save({"rng": tk.RNGState()}, tmp_path / "c.safetensors"))["rng"]
    assert set(tree) >= {"python", "numpy", "torch"}
    assert isinstance(tree["torch"], torch.Tensor) and tree["torch"].dtype == torch.uint8
    assert torch.equal(tree["torch"], torch.get_rng_state())
    assert isinstance(tree["python"]["gauss"], float)  # a Gaussian is cached
    assert tree["numpy"]["has_gauss"] == 1
    assert ("cuda" in tree) == torch.cuda.is_available()


def test_torch_only_draws_are_restored_exactly(tmp_path: Path) -> None:
    torch.manual_seed(3)
    torch.randn(1000)
    path = tk.save({"rng": tk.RNGState()}, tmp_path / "c.safetensors")
    a = torch.nn.functional.dropout(torch.ones(64, 64), p=0.5)
    torch.manual_seed(4)
    tk.restore(path, {"rng": tk.RNGState()})
    assert torch.equal(torch.nn.functional.dropout(torch.ones(64, 64), p=0.5), a)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_cuda_states_without_cuda_warn_and_restore_the_rest() -> None:
    advance()
    sd = tk.RNGState().state_dict()
    assert "cuda" not in sd
    sd["cuda"] = [torch.zeros(16, dtype=torch.uint8)]  # as if saved on a GPU machine
    expected = draw()
    scramble()
    with pytest.warns(UserWarning, match="CUDA"):
        tk.RNGState().load_state_dict(sd)
    assert_draws_equal(draw(), expected)


@pytest.mark.cuda
@needs_cuda
def test_cuda_generators_are_restored(tmp_path: Path) -> None:
    n = torch.cuda.device_count()
    for i in range(n):
        with torch.cuda.device(i):
            torch.cuda.manual_seed(100 + i)
            torch.rand(10, device=f"cuda:{i}")
    path = tk.save({"rng": tk.RNGState()}, tmp_path / "c.safetensors")
    loaded = tk.load(path)["rng"]
    assert len(loaded["cuda"]) == n
    expected = [torch.rand(7, device=f"cuda:{i}").cpu() for i in range(n)]
    expected_cpu = torch.rand(3)
    torch.cuda.manual_seed_all(5)
    torch.manual_seed(5)
    assert not torch.equal(torch.rand(7, device="cuda:0").cpu(), expected[0])
    tk.restore(path, {"rng": tk.RNGState()})
    for i in range(n):
        assert torch.equal(torch.rand(7, device=f"cuda:{i}").cpu(), expected[i]), f"cuda:{i}"
    assert torch.equal(torch.rand(3), expected_cpu)


@pytest.mark.cuda
@needs_cuda
def test_cuda_dropout_is_reproducible_after_restore(tmp_path: Path) -> None:
    torch.cuda.manual_seed_all(11)
    x = torch.ones(128, 128, device="cuda")
    torch.nn.functional.dropout(x, 0.3)
    path = tk.save({"rng": tk.RNGState()}, tmp_path / "c.safetensors")
    a = torch.nn.functional.dropout(x, 0.3)
    torch.cuda.manual_seed_all(12)
    tk.restore(path, {"rng": tk.RNGState()})
    assert torch.equal(torch.nn.functional.dropout(x, 0.3), a)


@pytest.mark.cuda
@needs_cuda
def test_restore_with_tensors_mapped_to_cuda(tmp_path: Path) -> None:
    """map_location="cuda" puts the state tensors on the GPU; RNGState must still restore from them."""
    advance()
    path = tk.save({"rng": tk.RNGState()}, tmp_path / "c.safetensors")
    expected = draw()
    scramble()
    tk.restore(path, {"rng": tk.RNGState()}, map_location="cuda")
    assert_draws_equal(draw(), expected)


# -- typed argument errors ---------------------------------------------------------------------


def test_a_state_not_from_rngstate_is_a_typed_error() -> None:
    with pytest.raises(tk.errors.KeyMismatchError, match=r"not written by RNGState\.state_dict") as info:
        tk.RNGState().load_state_dict({"torch": torch.get_rng_state(), "step": 3})
    err = info.value
    assert isinstance(err, KeyError) and err.missing == ["numpy", "python"] and err.unexpected == ["step"]
    with pytest.raises(tk.errors.ArgumentTypeError, match=r"state must be the dict RNGState\.state_dict") as info2:
        tk.RNGState().load_state_dict([1, 2])  # type: ignore[arg-type]
    assert isinstance(info2.value, TypeError)

"""ResumableSampler: a run interrupted mid-epoch resumes without repeating or skipping samples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import torchkeep as tk
from torchkeep.data import ResumableSampler


def _batches(sampler: ResumableSampler, data: list[int], count: int | None = None) -> list[list[int]]:
    loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler)
    out: list[list[int]] = []
    while count is None or len(out) < count:
        epoch_batches = [b.tolist() for b in loader]
        out.extend(epoch_batches)
        if count is None:
            break
    return out[:count] if count is not None else out


@pytest.mark.parametrize("stop_after", [1, 3, 4, 5, 7])  # mid-epoch and at / across epoch boundaries
@pytest.mark.parametrize("size", [18, 16])  # a short last batch, and whole batches only
def test_resume_mid_epoch_matches_an_uninterrupted_run(tmp_path: Path, stop_after: int, size: int) -> None:
    data = list(range(size))
    reference = _batches(ResumableSampler(data, seed=7), data, count=12)

    sampler = ResumableSampler(data, seed=7)
    loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler)
    seen: list[list[int]] = []
    it = iter(loader)
    while len(seen) < stop_after:
        try:
            seen.append(next(it).tolist())
        except StopIteration:
            it = iter(loader)
    path = tk.save({"sampler": sampler, "step": len(seen)}, tmp_path / "ckpt.safetensors")

    resumed = ResumableSampler(data, seed=0)  # a different seed: the checkpoint must override it
    state = tk.restore(path, {"sampler": resumed})
    rest = _batches(resumed, data, count=12 - state["step"])
    assert seen + rest == reference
    flat = [i for b in seen + rest for i in b]
    for epoch in range(2):  # every epoch used every sample exactly once
        assert sorted(flat[epoch * size : (epoch + 1) * size]) == data


def test_epochs_differ_and_unshuffled_order() -> None:
    data = list(range(10))
    s = ResumableSampler(data, seed=1)
    e0, e1 = list(s), list(s)
    assert sorted(e0) == sorted(e1) == data and e0 != e1
    assert list(ResumableSampler(data, shuffle=False)) == data


def test_a_different_dataset_size_is_refused(tmp_path: Path) -> None:
    s = ResumableSampler(10)
    path = tk.save({"sampler": s}, tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="10 samples"):
        tk.restore(path, {"sampler": ResumableSampler(12)})


# -- typed argument errors ---------------------------------------------------------------------


def test_bad_sampler_arguments_and_a_resize_are_typed_errors() -> None:
    with pytest.raises(tk.errors.ArgumentTypeError, match="data_source must be a dataset with len") as info:
        ResumableSampler(object())  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError)
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"data_source=-3") as info:
        ResumableSampler(-3)
    assert isinstance(info.value, ValueError)
    state = ResumableSampler(10, seed=0).state_dict()
    with pytest.raises(tk.errors.InvalidArgumentError, match="covered 10 samples, this dataset has 12") as info:
        ResumableSampler(12).load_state_dict(state)
    assert isinstance(info.value, ValueError) and info.value.argument == "state['n']"

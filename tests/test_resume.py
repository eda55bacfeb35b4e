"""Exact resume: N steps, checkpoint, a fresh process restores and trains N more == 2N steps straight.

The training program is tests/helpers/resume_train.py (dropout, a shuffling DataLoader with a
seeded generator, Adam, StepLR, and a little Python/NumPy randomness).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from compare import assert_same
from loadfile import load_file

import torchkeep as tk

HELPER = Path(__file__).parent / "helpers" / "resume_train.py"
N = 10  # two epochs of five batches


def start(*args: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HELPER), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(*procs: subprocess.Popen[str]) -> None:
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, f"{p.args} failed:\n{out}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("resume")
    paths = {name: d / f"{name}.safetensors" for name in ("reference", "ckpt", "resumed")}
    # the 2N-step reference and the first half run side by side; then a fresh process resumes
    finish(start("full", paths["reference"], "--steps", 2 * N), start("first", paths["ckpt"], "--steps", N))
    finish(start("resume", paths["ckpt"], paths["resumed"], "--steps", N))
    return paths


def test_resumed_run_is_bitwise_identical(runs: dict[str, Path]) -> None:
    ref = tk.load(runs["reference"])
    res = tk.load(runs["resumed"])
    assert ref["epoch"] == res["epoch"] == 4
    assert len(ref["losses"]) == 2 * N and len(res["losses"]) == N
    assert res["losses"] == ref["losses"][N:]
    assert_same(res["model"], ref["model"], "model")
    assert_same(res["optimizer"], ref["optimizer"], "optimizer")
    assert_same(res["scheduler"], ref["scheduler"], "scheduler")
    assert int(res["optimizer"]["state"][0]["step"]) == 2 * N


def test_checkpoint_holds_the_whole_training_state(runs: dict[str, Path]) -> None:
    ck = tk.load(runs["ckpt"])
    assert set(ck) == {"model", "optimizer", "scheduler", "rng", "generator", "epoch"}
    assert ck["epoch"] == 2
    assert isinstance(ck["generator"], torch.Generator)
    assert ck["scheduler"]["last_epoch"] == N
    ref = tk.load(runs["reference"])
    # the first half really moved the weights, and the second half moved them again
    assert not torch.equal(ck["model"]["0.weight"], ref["model"]["0.weight"])


@pytest.fixture
def helper() -> Iterator[Any]:
    module = load_file("torchkeep_test_resume_train", HELPER)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses
    try:
        yield module
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("skip", [(), ("rng",), ("generator",)], ids=["all", "no-rng", "no-generator"])
def test_resume_needs_every_piece_of_state(runs: dict[str, Path], helper: Any, skip: tuple[str, ...]) -> None:
    """The comparison is sharp: leaving out the RNG or the loader's generator changes the result."""
    ref = tk.load(runs["reference"])
    out = helper.resume(str(runs["ckpt"]), N, skip)
    model = out["model"].state_dict()
    if not skip:
        assert out["losses"] == ref["losses"][N:]
        assert_same(model, ref["model"], "model")
    else:
        assert out["losses"] != ref["losses"][N:]
        assert not torch.equal(model["0.weight"], ref["model"]["0.weight"])

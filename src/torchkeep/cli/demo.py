"""``torchkeep demo``: train, crash, resume exactly, export; the training lives in :mod:`torchkeep.cli.demo_run`."""

from __future__ import annotations

import tempfile
from pathlib import Path

import typer
from rich.console import Console

import torchkeep as tk  # lazy: nothing heavy is imported until the demo runs

__all__ = ["demo_command", "tk"]


def demo_command(
    directory: Path | None = typer.Option(
        None, "--dir", help="Where to write the checkpoints (default: a new temporary directory).", show_default=False
    ),
    epochs: int = typer.Option(6, "--epochs", min=2, help="Epochs to train; the crash comes after half of them."),
    seed: int = typer.Option(0, "--seed", help="Seed for the data, the initial weights and the shuffling."),
) -> None:
    """Train a tiny model, crash it halfway, resume from the last checkpoint, check it is exact.

    Then ship it: export to ONNX (verified against eager) and predict with onnxruntime.
    Takes a few seconds on a CPU; exits 1 if the resumed run differs from an uninterrupted one.

    Example: torchkeep demo --dir runs/demo
    """
    if directory is None:
        directory = Path(tempfile.mkdtemp(prefix="torchkeep-demo-"))
    from torchkeep.cli.demo_run import report, run_demo  # torch: only when the demo runs

    result = run_demo(directory, epochs=epochs, seed=seed)
    report(result, Console(highlight=False))
    if not result.exact:
        raise typer.Exit(1)

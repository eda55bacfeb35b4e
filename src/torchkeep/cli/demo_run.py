"""``torchkeep demo``: train, crash, resume from the last checkpoint, and prove the resume was exact.

The demo trains a small MLP with dropout on synthetic data, with everything that makes
resuming hard in practice: a shuffling DataLoader driven by its own seeded generator,
Adam's moment estimates, a StepLR schedule and the global RNG that dropout draws from.
It saves the whole training state every epoch, throws every object away halfway
("the crash"), restores the latest checkpoint into freshly built objects, finishes,
and compares the result bit for bit with a run that was never interrupted. Finally it
ships the trained model: exported to ONNX, verified, and run with onnxruntime.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchkeep as tk
from torchkeep.cli.inspect import human_bytes
from torchkeep.cli.text import escape
from torchkeep.errors import ExportUnavailableError
from torchkeep.export import ExportReport

__all__ = ["DemoResult", "report", "run_demo"]


@dataclass
class _Run:
    """Everything one training run owns, and therefore everything a checkpoint must hold."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # drives the DataLoader's shuffling
    loader: DataLoader


def _dataset(seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, 16, generator=g)
    w = torch.randn(16, 1, generator=g)
    y = torch.sin(x @ w) + 0.05 * torch.randn(1024, 1, generator=g)
    return TensorDataset(x, y)


def _build(dataset: TensorDataset, init_seed: int) -> _Run:
    torch.manual_seed(init_seed)  # the initial weights, and the RNG state dropout starts from
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    generator = torch.Generator().manual_seed(init_seed)
    loader = DataLoader(dataset, batch_size=64, shuffle=True, generator=generator)
    return _Run(model, optimizer, scheduler, generator, loader)


def _train_epoch(run: _Run) -> float:
    run.model.train()
    total, count = 0.0, 0
    for x, y in run.loader:
        loss = nn.functional.mse_loss(run.model(x), y)
        run.optimizer.zero_grad()
        loss.backward()
        run.optimizer.step()
        total += loss.item() * len(x)
        count += len(x)
    run.scheduler.step()
    return total / count


_FILENAME = "epoch-{step:03d}"


def _state(run: _Run, epoch: int, loss: float) -> dict:
    """The training state tree: Stateful objects go in as they are."""
    return {
        "model": run.model,
        "optimizer": run.optimizer,
        "scheduler": run.scheduler,
        "rng": tk.RNGState(),
        "loader_generator": run.generator,
        "epoch": epoch,
        "metrics": {"train_loss": loss, "lr": run.scheduler.get_last_lr()[0]},
    }


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _differences(a: dict, b: dict, prefix: str) -> list[str]:
    """Names of tensors whose bytes differ between two (nested) state dicts."""
    out: list[str] = []
    for k in sorted(set(a) | set(b), key=str):
        va, vb = a.get(k), b.get(k)
        name = f"{prefix}{k}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{name}.")
        elif isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor):
            if va.dtype != vb.dtype or va.shape != vb.shape or _bits(va) != _bits(vb):
                out.append(name)
        elif isinstance(va, torch.Tensor) or isinstance(vb, torch.Tensor):
            out.append(name)
    return out


@dataclass
class DemoResult:
    """What :func:`run_demo` did: the checkpoints it wrote and whether the resume was exact."""

    directory: Path
    checkpoints: list[tuple[Path, int, float]]  # (file, epoch, train loss)
    resumed_from: Path
    resume_epoch: int
    differences: list[str]
    tensors_compared: int
    values_compared: int
    seconds: float
    onnx: ExportReport | None = None  # None when the onnx extra is not installed
    onnx_max_error: float = 0.0  # onnxruntime vs eager on a batch of validation rows
    onnx_rows: int = 0

    @property
    def exact(self) -> bool:
        return not self.differences


def run_demo(directory: Path, *, epochs: int = 6, seed: int = 0) -> DemoResult:
    """Train with a simulated crash and exact resume, plus an uninterrupted reference run.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> run_demo(Path(tempfile.mkdtemp()), epochs=2).exact
        True
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs several times faster on one thread than on many
    try:
        return _run(directory, epochs, seed)
    finally:
        torch.set_num_threads(threads)


def _run(directory: Path, epochs: int, seed: int) -> DemoResult:
    started = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    data = _dataset(seed)
    crash_after = epochs // 2

    # 1. The reference: the same training, never interrupted.
    reference = _build(data, seed)
    for _ in range(epochs):
        _train_epoch(reference)

    # 2. The interrupted run: a CheckpointManager saves every epoch (asynchronously), then "the crash".
    written: list[tuple[Path, int, float]] = []
    run = _build(data, seed)
    with tk.CheckpointManager(directory, filename=_FILENAME, async_save=True) as mgr:
        for epoch in range(1, crash_after + 1):
            loss = _train_epoch(run)
            info = mgr.save(_state(run, epoch, loss), step=epoch, metrics={"train_loss": loss})
            written.append((info.path, epoch, loss))
    del run  # every training object is gone, as after a crash

    # 3. A new start: fresh objects (different initial weights, different global RNG), then the
    #    manager restores the newest checkpoint that verifies into them.
    fresh = _build(data, seed + 1)
    targets = {
        "model": fresh.model,
        "optimizer": fresh.optimizer,
        "scheduler": fresh.scheduler,
        "rng": tk.RNGState(),
        "loader_generator": fresh.generator,
    }
    with tk.CheckpointManager(directory, filename=_FILENAME, async_save=True) as mgr:
        restored = mgr.restore(targets)
        if restored is None:
            raise RuntimeError(f"{directory}: the run has no checkpoint to resume from")
        latest = restored.path
        resume_epoch = (restored.step or 0) + 1
        for epoch in range(resume_epoch, epochs + 1):
            loss = _train_epoch(fresh)
            info = mgr.save(_state(fresh, epoch, loss), step=epoch, metrics={"train_loss": loss})
            written.append((info.path, epoch, loss))

    # 4. Bit-for-bit comparison of the final weights and optimizer state.
    ref_sd = {"model": reference.model.state_dict(), "optimizer": reference.optimizer.state_dict()["state"]}
    new_sd = {"model": fresh.model.state_dict(), "optimizer": fresh.optimizer.state_dict()["state"]}
    compared = [t for t in _leaves(ref_sd) if isinstance(t, torch.Tensor)]
    onnx, onnx_error, rows = _ship(fresh.model, data, directory)
    return DemoResult(
        directory=directory,
        checkpoints=written,
        resumed_from=latest,
        resume_epoch=resume_epoch,
        differences=_differences(ref_sd, new_sd, ""),
        tensors_compared=len(compared),
        values_compared=sum(t.numel() for t in compared),
        seconds=time.perf_counter() - started,
        onnx=onnx,
        onnx_max_error=onnx_error,
        onnx_rows=rows,
    )


def _ship(model: nn.Module, data: TensorDataset, directory: Path) -> tuple[ExportReport | None, float, int]:
    """Export the trained model to ONNX (verified by torchkeep), then run it as a deployment would."""
    try:
        report = tk.export(model, data.tensors[0][:1], directory / "model.onnx")
    except ExportUnavailableError:
        return None, 0.0, 0
    import onnxruntime as ort

    session = ort.InferenceSession(report.path, providers=["CPUExecutionProvider"])
    x = data.tensors[0][:100]  # a batch size the export never saw: the batch axis is dynamic
    (pred,) = session.run(None, {report.input_names[0]: x.numpy()})
    model.eval()
    with torch.no_grad():
        error = float((torch.from_numpy(pred) - model(x)).abs().max())
    return report, error, len(x)


def _leaves(tree: dict) -> list:
    out = []
    for v in tree.values():
        out += _leaves(v) if isinstance(v, dict) else [v]
    return out


def report(result: DemoResult, console: Console) -> None:
    console.print("[bold]torchkeep demo[/]: an MLP with dropout, Adam, StepLR and a shuffling DataLoader\n")
    table = Table(box=None, padding=(0, 1), pad_edge=False, header_style="bold")
    table.add_column("checkpoint", no_wrap=True)
    table.add_column("epoch", justify="right", no_wrap=True)
    table.add_column("train loss", justify="right", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    crash_epoch = result.resume_epoch - 1
    for path, epoch, loss in result.checkpoints:
        note = ""
        if path == result.resumed_from:
            note = "[yellow]← resumed from this one[/]"
        elif epoch > crash_epoch:
            note = "[dim]after resume[/]"
        table.add_row(path.name, str(epoch), f"{loss:.4f}", human_bytes(path.stat().st_size), note)
    console.print(f"checkpoints in [cyan]{escape(str(result.directory))}[/]:")
    console.print(Padding(table, (0, 0, 0, 2)))
    console.print(
        f"\nsimulated a crash after epoch {crash_epoch}: every training object was discarded.\n"
        f"restored [cyan]{escape(result.resumed_from.name)}[/] into a fresh model, optimizer, scheduler, "
        f"RNG state and DataLoader generator; resumed at epoch {result.resume_epoch}."
    )
    if result.exact:
        console.print(
            f"[bold green]exact resume:[/] the final weights and optimizer state ({result.tensors_compared} tensors, "
            f"{result.values_compared:,} values) are [bold]bitwise equal[/] to an uninterrupted run."
        )
    else:
        console.print(
            f"[bold red]resume was NOT exact:[/] {len(result.differences)} tensors differ from the uninterrupted run: "
            f"{escape(', '.join(result.differences[:10]))}"
        )
    if result.onnx is not None:
        r = result.onnx
        console.print(
            f"\n[bold]shipped:[/] exported the model to [cyan]{escape(r.path)}[/] ({human_bytes(r.bytes)}, "
            f"{escape(r.exporter)}); verified against eager (max abs error {r.max_abs_error:.1e}); "
            f"onnxruntime predicted {result.onnx_rows} rows at once, max abs error {result.onnx_max_error:.1e}."
        )
    else:
        console.print(
            '\n[dim]ONNX export skipped: pip install "torchkeep\\[onnx]" to ship the model with onnxruntime.[/]'
        )
    last = result.checkpoints[-1][0]
    console.print(f"\n[dim]done in {result.seconds:.1f} s. Next, look inside a checkpoint and the run:[/]")
    console.print(f"  torchkeep inspect {escape(str(last))}")
    console.print(f"  torchkeep verify {escape(str(last))}")
    console.print(f"  torchkeep ls {escape(str(result.directory))} --verify")
    if result.onnx is not None:
        console.print(f"  torchkeep export YOUR_MODEL.safetensors --input-shape 1x16 -o {escape(result.onnx.path)}")

"""``torchkeep export CHECKPOINT -o OUT``: rebuild a ``save_model`` file, export it, verify the artifact."""

from __future__ import annotations

import json
import os
import sys
import warnings
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.padding import Padding
from rich.table import Table

from torchkeep.cli.inspect import human_bytes
from torchkeep.cli.problems import JSON_ERROR_HELP, ModelInputError
from torchkeep.cli.text import escape
from torchkeep.errors import ArgumentTypeError, ExportVerificationError, InvalidArgumentError

if TYPE_CHECKING:
    import torch

__all__ = [
    "as_cli",
    "check_runs",
    "example_inputs",
    "export_command",
    "in_file",
    "parse_dynamic",
    "parse_shape",
    "spinner",
]


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1x3x32x32"`` (or ``1,3,32,32``) -> ``(1, 3, 32, 32)``.

    Example:
        >>> parse_shape("1x3x32x32"), parse_shape("8,16")
        ((1, 3, 32, 32), (8, 16))
    """
    parts = text.lower().replace(",", "x").replace("*", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts if p.strip())
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise typer.BadParameter(f"{text!r} is not a shape: write positive sizes joined by x, e.g. 1x3x32x32")
    return shape


def _dtype(name: str) -> torch.dtype:
    import torch  # the CLI starts without torch; only commands that build models load it

    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise typer.BadParameter(f"{name!r} is not a torch dtype (float32, float16, bfloat16, int64, ...)")
    return dtype


def example_inputs(shapes: list[str], dtype: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """One random tensor per ``--input-shape`` (normal floats; integers 0/1 for integer dtypes)."""
    import torch

    dt = _dtype(dtype)
    g = torch.Generator().manual_seed(seed)
    out = []
    for text in shapes:
        shape = parse_shape(text)
        if dt.is_floating_point:
            out.append(torch.randn(shape, generator=g).to(dt))
        else:
            out.append(torch.randint(0, 2, shape, generator=g).to(dt))
    return tuple(out)


_DYNAMIC_FORM = "write [NAME:]AXIS=SYMBOL[,AXIS=SYMBOL...], e.g. input_ids:0=batch,1=seq (without NAME: every input)"


def parse_dynamic(specs: list[str]) -> dict[str, dict[int, str]]:
    """``--dynamic`` values -> ``dynamic_axes``; the key ``"*"`` holds the axes given for every input.

    Example:
        >>> parse_dynamic(["input_ids:0=batch,1=seq", "0=batch"])
        {'input_ids': {0: 'batch', 1: 'seq'}, '*': {0: 'batch'}}
    """
    out: dict[str, dict[int, str]] = {}
    for spec in specs:
        name, _, axes = spec.rpartition(":")
        parsed: dict[int, str] = {}
        for part in axes.split(","):
            axis, eq, symbol = part.partition("=")
            try:
                index = int(axis)
            except ValueError:
                index = -1
            if not eq or index < 0 or not symbol.strip().isidentifier():
                raise typer.BadParameter(f"{spec!r}: {_DYNAMIC_FORM}", param_hint="--dynamic")
            parsed[index] = symbol.strip()
        out.setdefault(name.strip() or "*", {}).update(parsed)
    return out


def as_cli(e: BaseException, command: Any) -> str:
    """A library message on one line, in ``command``'s flags (``pass dynamic_batch=False`` -> ``pass --static-batch``)."""
    from torchkeep.cli import as_flags  # the root package, loaded before any command runs

    return as_flags(" ".join(str(e).split()), command)


def in_file(e: InvalidArgumentError | ArgumentTypeError, checkpoint: Path, command: Any) -> ModelInputError:
    """A library argument error, in ``command``'s flags, as an error naming ``checkpoint``."""
    return ModelInputError(checkpoint, as_cli(e, command))


def check_runs(
    model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], shapes: list[str], dtype: str, checkpoint: Path
) -> None:
    """Run the model once on the example inputs (eval mode, no grad); a failure is a :class:`ModelInputError`
    naming the file, the shapes, the dtype and the flags that set them."""
    from torchkeep.export._failures import first_line
    from torchkeep.export._inputs import eval_mode, run_eager

    try:
        with eval_mode(model):
            run_eager(model, (inputs, {}))
    except Exception as e:
        given = ", ".join(shapes)
        raise ModelInputError(
            checkpoint,
            f"the model cannot run example inputs of shape {given} and dtype {dtype}: {first_line(e)}. "
            "Check --input-shape (one per forward input, batch first) and --dtype.",
        ) from e


def spinner(label: str, *, json_out: bool) -> AbstractContextManager[Any]:
    """A rich spinner on stderr while a slow step runs (not with ``--json`` or without a terminal)."""
    err = Console(stderr=True, highlight=False)
    if json_out or not err.is_terminal:
        return nullcontext()
    return err.status(label, spinner="dots")


def load_checkpoint_model(checkpoint: Path, allow_import: bool) -> torch.nn.Module:
    """The model of a ``save_model`` file (``--allow-import`` allows importing its recorded class).

    With ``--allow-import`` the current directory is on the import path, as it is for ``python -m``,
    so a class defined in ``./model.py`` is found.
    """
    if allow_import and "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    from torchkeep.registry import load_model

    return load_model(checkpoint, allow_import=allow_import)


def print_report(report: Any, console: Console) -> None:
    """The human report of an :class:`~torchkeep.export.ExportReport`."""
    files = f" + {len(report.files) - 1} data file(s)" if len(report.files) > 1 else ""
    console.print(
        f"[bold green]exported[/] {escape(report.path)}{files}: {report.format} via {escape(report.exporter)}, "
        f"{human_bytes(report.bytes)} in {report.export_seconds:.2f} s"
    )
    axes = "; ".join(
        f"{name} " + ",".join(f"{axis}={symbol}" for axis, symbol in sorted(a.items()))
        for name, a in report.dynamic_axes.items()
    )
    opset = f", opset {report.opset}" if report.opset else ""
    console.print(
        f"  inputs {escape(', '.join(report.input_names))}; outputs {escape(', '.join(report.output_names))}; "
        f"{'dynamic axes ' + escape(axes) if axes else 'static shapes'}{opset}"
    )
    for note in report.defaults:
        console.print(f"  [cyan]default:[/] {escape(note)}")
    for note in report.warnings:
        console.print(f"  [yellow]note:[/] {escape(note)}")
    if not report.checks:
        console.print("  [yellow]not verified[/] (--no-verify)")
        return
    table = Table(box=None, padding=(0, 1), pad_edge=False, header_style="bold")
    for col, right in (("check", False), ("output", False), ("max abs err", True), ("max rel err", True), ("", False)):
        table.add_column(col, justify="right" if right else "left", no_wrap=True)
    for check in report.checks:
        for o in check.outputs:
            mark = "[green]ok[/]" if o.ok else f"[bold red]FAIL[/] {escape(o.reason)}"
            table.add_row(escape(check.name), escape(o.name), f"{o.max_abs:.2e}", f"{o.max_rel:.2e}", mark)
    verdict = "[bold green]verified[/]" if report.verified else "[bold red]NOT verified[/]"
    shapes = [", ".join("x".join(map(str, s)) or "scalar" for s in c.shapes.values()) for c in report.checks]
    seen = "; ".join(f"({s})" if "," in s else s for s in dict.fromkeys(shapes) if s)
    console.print(
        f"  {verdict} against the eager model{' at input shapes ' + escape(seen) if seen else ''} "
        f"in {report.verify_seconds:.2f} s:"
    )
    console.print(Padding(table, (0, 0, 0, 4)))


def export_command(
    ctx: typer.Context,
    checkpoint: Path = typer.Argument(
        ...,
        metavar="CHECKPOINT",
        help="A file written by tk.save_model (its class must be importable).",
        show_default=False,
    ),
    output: Path = typer.Option(
        ..., "-o", "--output", metavar="OUT", help="The artifact: .onnx, .pt/.ts (TorchScript) or .pt2 (torch.export)."
    ),
    input_shape: list[str] = typer.Option(
        ..., "--input-shape", "-s", metavar="SHAPE", help="Shape of an example input, e.g. 1x3x32x32; repeat per input."
    ),
    format: str = typer.Option(
        None,
        "--format",
        "-f",
        metavar="FORMAT",
        help="onnx, torchscript, torch.export or tensorrt (NVIDIA GPU). Default: from OUT's suffix.",
        show_default=False,
    ),
    dtype: str = typer.Option(
        "float32",
        "--dtype",
        help="dtype of the example inputs; a floating dtype (float16, bfloat16) also casts the model's floating "
        "weights to it.",
    ),
    dynamic_batch: bool = typer.Option(True, "--dynamic-batch/--static-batch", help="Make dim 0 a dynamic batch axis."),
    dynamic_axes: list[str] = typer.Option(
        None,
        "--dynamic",
        "-d",
        metavar="[INPUT:]AXIS=NAME,...",
        help="Make axes dynamic, e.g. --dynamic input_ids:0=batch,1=seq (forward's parameter names; without INPUT: "
        "every input). Axes sharing a NAME change size together. Replaces --dynamic-batch; repeat per input.",
        show_default=False,
    ),
    opset: int = typer.Option(
        None, "--opset", help="ONNX opset version (default: the exporter's).", show_default=False
    ),
    legacy: bool = typer.Option(False, "--legacy", help="ONNX: use the deprecated TorchScript-based exporter."),
    method: str = typer.Option("trace", "--method", help="TorchScript: trace or script."),
    rtol: float = typer.Option(None, "--rtol", help="Relative tolerance (default per dtype).", show_default=False),
    atol: float = typer.Option(None, "--atol", help="Absolute tolerance (default per dtype).", show_default=False),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Load the artifact back and compare with eager."),
    allow_import: bool = typer.Option(
        False, "--allow-import", help="Import the model's module recorded in the file (runs its code)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON. " + JSON_ERROR_HELP),
) -> None:
    """Export a saved model for deployment and prove the artifact matches the eager model.

    Rebuilds the model from a tk.save_model file (no pickle, no training script), exports it in eval mode with a dynamic batch (or the axes --dynamic names), loads the artifact back with its own runtime (onnxruntime, torch.jit.load, torch.export.load), runs it on random inputs of the given shape and at other sizes of the dynamic axes (batch and sequence together), and prints the largest differences from eager.

    Exits 0 when verified, 1 if the differences exceed the tolerances (the artifact is kept for inspection), 2 if the export cannot run.

    \b
    Examples:
      torchkeep export model.safetensors -s 1x3x32x32 -o model.onnx
      torchkeep export model.safetensors -s 8x128 --dtype int64 -o model.pt2
      torchkeep export model.safetensors -s 1x16 -s 1x4 -o model.pt --json
      # a language model: any batch size and sequence length
      torchkeep export lm.safetensors -s 2x12 --dtype int64 --dynamic input_ids:0=batch,1=seq -o lm.onnx
    """
    from torchkeep.export import export, format_for
    from torchkeep.export._inputs import input_names_for

    if method not in ("trace", "script"):
        raise typer.BadParameter(f"{method!r}: use trace or script", param_hint="--method")
    try:
        format_for(output, format)
    except InvalidArgumentError as e:
        what = "--format" if format is not None else "-o"
        raise typer.BadParameter(f"{output}: {as_cli(e, ctx.command).split(': ', 1)[-1]}", param_hint=what) from None
    axes = parse_dynamic(dynamic_axes) if dynamic_axes else None
    inputs = example_inputs(input_shape, dtype)
    model = load_checkpoint_model(checkpoint, allow_import)
    dt = _dtype(dtype)
    if dt.is_floating_point and any(p.is_floating_point() and p.dtype != dt for p in model.state_dict().values()):
        model = model.to(dt)  # inputs and weights in the same dtype: the model as it would be deployed
    check_runs(model, inputs, input_shape, dtype, checkpoint)
    if axes is not None and "*" in axes:  # the axes given for every input, on those that have them
        every = axes.pop("*")
        for name, x in zip(input_names_for(model, (inputs, {})), inputs, strict=False):
            axes[name] = {**{a: s for a, s in every.items() if a < x.dim()}, **axes.get(name, {})}
    fmt_label = format or output.suffix.lstrip(".") or "?"
    failed: ExportVerificationError | None = None
    label = f"exporting {escape(str(checkpoint))} to {escape(fmt_label)}…"
    with spinner(label, json_out=json_out), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the report carries the TorchScript note
        warnings.filterwarnings("ignore", message="torchkeep.export:")  # and the fallback note
        try:
            report = export(
                model,
                inputs,
                output,
                format=format,
                dynamic_batch=dynamic_batch,
                dynamic_axes=axes,
                opset=opset,
                verify=verify,
                rtol=rtol,
                atol=atol,
                legacy=legacy,
                method=method,
            )
        except ExportVerificationError as e:
            failed, report = e, e.report
        except (InvalidArgumentError, ArgumentTypeError) as e:
            raise in_file(e, checkpoint, ctx.command) from e
    if json_out:
        typer.echo(json.dumps(report.to_dict(), indent=2, default=str, allow_nan=False))
    else:
        print_report(report, Console(highlight=False, soft_wrap=True))
        if failed is not None:
            Console(stderr=True, highlight=False, soft_wrap=True).print(
                f"[bold red]error:[/] {escape(as_cli(failed, ctx.command))}"
            )
    if failed is not None:
        raise typer.Exit(1)

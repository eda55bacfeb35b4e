"""``torchkeep quantize CHECKPOINT``: dynamic int8 quantization of a ``save_model`` file, with a size
and accuracy report and, with ``-o``, a verified TorchScript artifact of the quantized model."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import typer
from rich.console import Console

from torchkeep.cli.export import (
    as_cli,
    check_runs,
    example_inputs,
    in_file,
    load_checkpoint_model,
    print_report,
    spinner,
)
from torchkeep.cli.inspect import human_bytes
from torchkeep.cli.problems import JSON_ERROR_HELP, ModelInputError
from torchkeep.cli.text import escape
from torchkeep.errors import ArgumentTypeError, ExportVerificationError, InvalidArgumentError

__all__ = ["quantize_command"]

_MODULES = ("linear", "lstm", "gru")  # torch.nn.Linear / LSTM / GRU


def quantize_command(
    ctx: typer.Context,
    checkpoint: Path = typer.Argument(
        ...,
        metavar="CHECKPOINT",
        help="A file written by tk.save_model (its class must be importable).",
        show_default=False,
    ),
    input_shape: list[str] = typer.Option(
        None,
        "--input-shape",
        "-s",
        metavar="SHAPE",
        help="Shape of an example input (repeat per input): measures the output error; required with -o.",
        show_default=False,
    ),
    input_dtype: str = typer.Option("float32", "--input-dtype", help="dtype of the example inputs."),
    dtype: str = typer.Option("qint8", "--dtype", help="Weight dtype: qint8 or float16."),
    modules: str = typer.Option("linear,lstm,gru", "--modules", help="Layer types to quantize, comma-separated."),
    output: Path = typer.Option(
        None,
        "-o",
        "--output",
        metavar="OUT",
        help="Also write the quantized model as TorchScript (.pt/.ts), verified against the quantized eager model.",
        show_default=False,
    ),
    allow_import: bool = typer.Option(
        False, "--allow-import", help="Import the model's module recorded in the file (runs its code)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON. " + JSON_ERROR_HELP),
) -> None:
    """Dynamically quantize a saved model (int8 weights) and report size and accuracy.

    Rebuilds the model from a tk.save_model file, replaces its Linear/LSTM/GRU layers with dynamically quantized ones (CPU inference), and reports the saved-state size before and after and, given --input-shape, the largest output difference from the float model.

    A quantized model cannot be stored in a torchkeep file (its packed weights need pickle): keep the float file and quantize at load, tk.quantize(tk.load_model(path)), or ship the TorchScript file that -o writes.

    \b
    Examples:
      torchkeep quantize model.safetensors -s 1x128
      torchkeep quantize model.safetensors -s 1x128 -o model-int8.pt --json
    """
    import torch

    from torchkeep.export import export, quantize

    kinds = []
    for name in (m.strip().lower() for m in modules.split(",") if m.strip()):
        if name not in _MODULES:
            raise typer.BadParameter(f"unknown module type {name!r}; use {', '.join(_MODULES)}", param_hint="--modules")
        kinds.append({"linear": torch.nn.Linear, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[name])
    if dtype not in ("qint8", "float16"):
        raise typer.BadParameter("use qint8 or float16", param_hint="--dtype")
    if output is not None and not input_shape:
        raise typer.BadParameter("-o needs --input-shape to trace and verify the quantized model", param_hint="-o")
    if output is not None and output.suffix.lower() not in (".pt", ".ts"):
        raise typer.BadParameter(
            "a dynamically quantized model exports to TorchScript only: name it .pt or .ts", param_hint="-o"
        )
    inputs = example_inputs(input_shape, input_dtype) if input_shape else None
    model = load_checkpoint_model(checkpoint, allow_import)
    if inputs is not None:
        check_runs(model, inputs, input_shape, input_dtype, checkpoint)
    if not any(isinstance(m, tuple(kinds)) for name, m in model.named_modules() if name):
        present = [
            n
            for n, k in zip(_MODULES, (torch.nn.Linear, torch.nn.LSTM, torch.nn.GRU), strict=True)
            if any(isinstance(m, k) for m in model.modules())
        ]
        raise ModelInputError(
            checkpoint,
            f"{type(model).__name__} has no submodule of type {', '.join(k.__name__ for k in kinds)} to quantize: "
            f"pass --modules with the layer types it has ({', '.join(present) or 'none of ' + ', '.join(_MODULES)})",
        )
    try:
        with spinner("quantizing…", json_out=json_out):
            qmodel, report = quantize(model, dtype=getattr(torch, dtype), modules=tuple(kinds), example_inputs=inputs)
    except (InvalidArgumentError, ArgumentTypeError) as e:
        raise in_file(e, checkpoint, ctx.command) from e
    exported = failed = None
    if output is not None:
        with spinner(f"exporting to {escape(str(output))}…", json_out=json_out), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                exported = export(qmodel, inputs, output, format="torchscript")
            except ExportVerificationError as e:
                failed, exported = e, e.report
            except (InvalidArgumentError, ArgumentTypeError) as e:
                raise in_file(e, checkpoint, ctx.command) from e
    if json_out:
        out = report.to_dict()
        out["export"] = exported.to_dict() if exported is not None else None
        typer.echo(json.dumps(out, indent=2, default=str, allow_nan=False))
    else:
        con = Console(highlight=False, soft_wrap=True)
        con.print(
            f"[bold green]quantized[/] {escape(str(checkpoint))} to {report.dtype}: "
            f"{len(report.quantized_modules)} layer(s) ({escape(', '.join(report.quantized_modules[:10]))})"
        )
        con.print(
            f"  saved state {human_bytes(report.bytes_before)} -> {human_bytes(report.bytes_after)} ({_size_change(report.ratio)})"
        )
        if report.max_abs_error is not None:
            con.print(
                f"  output error vs float: max abs {report.max_abs_error:.2e}, max rel {report.max_rel_error:.2e}"
            )
        if exported is not None:
            print_report(exported, con)
        else:
            con.print("  [dim]keep the float file; quantize at load with tk.quantize(tk.load_model(path))[/]")
    if failed is not None:
        Console(stderr=True, highlight=False, soft_wrap=True).print(
            f"[bold red]error:[/] {escape(as_cli(failed, ctx.command))}"
        )
        raise typer.Exit(1)


def _size_change(ratio: float) -> str:
    """``"3.64x smaller"``, ``"1.03x larger"`` (the float16 packing can outweigh the saving on small layers).

    Example:
        >>> _size_change(3.641), _size_change(0.97), _size_change(1.0)
        ('3.64x smaller', '1.03x larger', 'same size')
    """
    if ratio > 1.005:
        return f"{ratio:.2f}x smaller"
    if 0 < ratio < 0.995:
        return f"{1 / ratio:.2f}x larger"
    return "same size"

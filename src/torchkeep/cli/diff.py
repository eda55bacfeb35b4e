"""``torchkeep diff A B``: what differs between two checkpoints; exit 0 identical, 1 different, 2 unreadable."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from torchkeep.cli.problems import JSON_ERROR_HELP
from torchkeep.cli.text import escape
from torchkeep.cli.verify import byte_progress

__all__ = ["diff_command"]

_STYLE = {
    "changed": "yellow",
    "shape": "magenta",
    "dtype": "magenta",
    "only A": "red",
    "only B": "green",
    "value": "cyan",
}


def _size(p: Path) -> int:
    return os.stat(p).st_size if p.is_file() else 0


def diff_command(
    a: Path = typer.Argument(..., metavar="A", help="The first checkpoint.", show_default=False),
    b: Path = typer.Argument(..., metavar="B", help="The second checkpoint.", show_default=False),
    json_out: bool = typer.Option(False, "--json", help="Print the full report as JSON. " + JSON_ERROR_HELP),
    atol: float = typer.Option(0.0, "--atol", metavar="X", help="Absolute tolerance for tensor values."),
    rtol: float = typer.Option(0.0, "--rtol", metavar="Y", help="Relative tolerance (times |B|) for tensor values."),
    show_all: bool = typer.Option(False, "--all", help="List every difference (default: 20 per kind)."),
) -> None:
    """Compare two checkpoints tensor by tensor: exit 0 if identical, 1 if different, 2 if unreadable.

    Reports names only in A or only in B, shape and dtype changes, the max absolute and relative L2 difference of changed tensors, and changed values such as epoch or config. Memory stays bounded: tensors are read in batches and dropped.

    \b
    Examples:
      torchkeep diff epoch-9.safetensors epoch-10.safetensors
      torchkeep diff a.safetensors b.safetensors --atol 1e-6 && echo same
      torchkeep diff old.pt converted.safetensors --json | jq .value_changed
    """
    from torchkeep.diff import diff, report_json  # torch: only when a comparison runs

    with byte_progress("comparing", _size(a) + _size(b), json_out=json_out) as progress:
        report = diff(a, b, rtol=rtol, atol=atol, progress=progress)
    code = 0 if report.identical else 1
    if json_out:
        typer.echo(report_json(report))
        raise typer.Exit(code)
    out = Console(highlight=False, soft_wrap=True)
    style = "bold green" if code == 0 else "bold yellow"
    out.print(f"[{style}]{escape(report.summary())}[/]  A={escape(str(a))}  B={escape(str(b))}")
    rows = list(report.rows(None if show_all else 20))
    if rows:
        table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
        table.add_column("kind")
        table.add_column("name", overflow="fold")
        table.add_column("detail")
        for kind, name, detail in rows:
            table.add_row(f"[{_STYLE.get(kind, '')}]{kind}[/]", escape(name), escape(detail))
        out.print(table)
    raise typer.Exit(code)

"""``torchkeep scan PATH...``: static pickle scan; exit 0 all clean, 1 any unsafe, 2 any unreadable."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from torchkeep.cli.problems import what_is
from torchkeep.cli.text import escape
from torchkeep.errors import TorchkeepError
from torchkeep.scan import ScanReport, scan
from torchkeep.scan_policy import check_allow_globals

__all__ = ["scan_command"]


def _row_style(report: ScanReport, name: str) -> tuple[str, str]:
    if name in report.dangerous:
        return "[bold red]DANGEROUS[/]", escape(report.dangerous[name])
    if name in report.unsafe:
        return "[yellow]unsafe[/]", "outside the weights_only allowlist"
    if name in report.allowed:
        return "[cyan]allowed[/]", "named by --allow-global"
    return "[green]ok[/]", ""


def _print_report(out: Console, report: ScanReport) -> None:
    colour = {"clean": "bold green", "UNSAFE": "bold red", "unreadable": "bold yellow"}[report.verdict]
    called = set(report.called)
    out.print(
        f"[{colour}]{report.verdict}[/] {escape(report.path)} ({escape(report.format)}, "
        f"{len(report.globals)} globals, {len(report.unsafe)} unsafe, {len(report.dangerous)} dangerous)"
    )
    if report.globals or report.dangerous:
        table = Table(show_edge=False, pad_edge=False, box=None)
        table.add_column("global")
        table.add_column("status")
        table.add_column("called", justify="center")
        table.add_column("why")
        names = list(report.globals) + [n for n in report.dangerous if n not in report.globals]
        for name in names:
            status, why = _row_style(report, name)
            table.add_row(escape(name), status, "yes" if name in called else "", why)
        out.print(table)
    for issue in report.issues:
        out.print(f"  [red]issue:[/] {escape(issue)}")
    if report.calls:
        out.print("  opcodes: " + ", ".join(f"{k} x{v}" for k, v in report.calls.items()), style="dim")


def scan_command(
    paths: list[Path] = typer.Argument(..., metavar="PATH...", help="Files to scan.", show_default=False),
    allow_global: list[str] = typer.Option(
        [],
        "--allow-global",
        metavar="PATTERN",
        help="Count this global as safe too (mypkg.models.Net, or mypkg.models.* for a whole module), "
        "as tk.load(allow_globals=...) would accept it. Repeatable.",
    ),
    json_out: bool = typer.Option(
        False,
        "--json",
        help="Print one JSON object per file, as a list; a file that cannot be read gives "
        '{"path", "ok": false, "verdict": "unreadable", "error"}.',
    ),
) -> None:
    """Statically scan pickles (torch.save files, raw pickles) without running them.

    Lists every global each file imports, marks those torch.load(weights_only=True) would
    refuse (unsafe) and those only malicious files need (dangerous: os.system, eval, nested
    unpicklers, ...). Exit 0 if all files are clean, 1 if any is unsafe, 2 if any is unreadable.

    Example: torchkeep scan model.pth downloads/*.ckpt --json
    """
    out = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        check_allow_globals(allow_global, "--allow-global")
    except TorchkeepError as e:
        raise typer.BadParameter(str(e), param_hint="--allow-global") from None
    results: list[dict] = []
    code = 0
    for path in paths:
        try:
            report = scan(path, allow_globals=allow_global or None)
        except (TorchkeepError, OSError) as e:
            message = " ".join(str(e).split())
            if path.is_dir():  # not "a directory checkpoint": say what it is and what scan takes
                message = (
                    f"{path}: {what_is(path)} with no single checkpoint in it to scan; "
                    f"scan takes checkpoint files: pass them, e.g. torchkeep scan {path}/*"
                )
            results.append({"path": str(path), "ok": False, "verdict": "unreadable", "error": message})
            if not json_out:
                err.print(f"[bold red]error:[/] {escape(message)}")
            code = 2
            continue
        row = report.to_dict()
        results.append(row)
        if report.verdict == "unreadable":
            code = 2
            why = (
                "; ".join(list(dict.fromkeys(report.issues))[:3])
                or "not a pickle, a torch.save file or a safetensors file"
            )
            row.setdefault("error", f"{path}: unreadable as {report.format}: {why}")
            if not json_out:  # one line, like any file that cannot be read
                err.print(f"[bold red]error:[/] {escape(' '.join(row['error'].split()))}")
                if report.globals:  # what it did import before it broke off
                    _print_report(out, report)
            continue
        if report.verdict == "UNSAFE" and code == 0:
            code = 1
        if not json_out:
            _print_report(out, report)
    if json_out:
        typer.echo(json.dumps(results, indent=2, ensure_ascii=False))
    raise typer.Exit(code)

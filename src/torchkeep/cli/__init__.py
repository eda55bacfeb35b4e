"""The ``torchkeep`` command line: a typer app, one module per verb, thin over the library.

Exit codes: 0 success, 1 the check failed (``verify`` found damage, ``demo`` did not
resume exactly), 2 the command could not run (missing or unreadable file, bad usage).
Errors print one red line naming the file, never a traceback.

Example:
    >>> from typer.testing import CliRunner
    >>> from torchkeep.cli import app
    >>> CliRunner().invoke(app, ["verify", "no-such-file.safetensors"]).exit_code
    2
"""

from __future__ import annotations

import re
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from torchkeep._version import __version__
from torchkeep.cli.convert import convert_command
from torchkeep.cli.demo import demo_command
from torchkeep.cli.diff import diff_command
from torchkeep.cli.export import export_command
from torchkeep.cli.inspect import inspect_command
from torchkeep.cli.quantize import quantize_command
from torchkeep.cli.runs import ls_command, plot_command, prune_command
from torchkeep.cli.scan import scan_command
from torchkeep.cli.verify import verify_command
from torchkeep.errors import TorchkeepError

__all__ = ["app", "as_flags", "main"]


_KEYWORD = re.compile(r"\b(pass|with|give|use|set)\s+([a-z_]+)=('[^']*'|\"[^\"]*\"|[^\s,;:)]+)?")


def as_flags(message: str, command: Any) -> str:
    """Library advice in the command's own words: ``pass trust_pickle=True`` -> ``pass --trust-pickle``.

    Only keywords the command has an option for are rewritten (``to='torch'`` -> ``--to torch``,
    ``verify=False`` -> ``--no-verify``); Python code in a message is left alone.
    """
    options = {
        p.name: p for p in getattr(command, "params", []) if getattr(p, "opts", None) and p.param_type_name == "option"
    }

    def flag(m: re.Match[str]) -> str:
        verb, name, value = m.group(1), m.group(2), m.group(3)
        p = options.get(name)
        if p is None:
            return m.group(0)
        long = max(p.opts, key=len)
        if value in ("True", "False") and getattr(p, "is_flag", False):
            if value == "False":
                off = [o for o in getattr(p, "secondary_opts", []) if o.startswith("--")]
                return f"{verb} {off[0]}" if off else m.group(0)
            return f"{verb} {long}"
        if value is None:
            return f"{verb} {long}"
        return f"{verb} {long} {value.strip(chr(39) + chr(34))}"

    return _KEYWORD.sub(flag, message)


class _Group(TyperGroup):
    """Turns library errors into one red line on stderr and exit status 2."""

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        name, cmd, rest = super().resolve_command(ctx, args)
        ctx.meta["torchkeep.command"] = cmd  # for error messages in the command's own flags
        return name, cmd, rest

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (TorchkeepError, OSError) as e:
            # messages already name the file and say what to do; keep them on one line
            message = as_flags(" ".join(str(e).split()), ctx.meta.get("torchkeep.command"))
            if isinstance(e, OSError) and not isinstance(e, TorchkeepError) and e.filename:
                message = f"{e.filename}: {e.strerror or message}"
            Console(stderr=True, soft_wrap=True, highlight=False).print(f"[bold red]error:[/] {escape(message)}")
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_Group,
    name="torchkeep",
    help="Save, resume, inspect and verify PyTorch checkpoints, without pickle.\n\nStart with: torchkeep demo",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"torchkeep {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", "-V", callback=_version, is_eager=True, help="Print the torchkeep version and exit."
    ),
) -> None:
    """Save, resume, inspect and verify PyTorch checkpoints, without pickle.

    Start with: torchkeep demo
    """


app.command("inspect", no_args_is_help=True)(inspect_command)
app.command("verify", no_args_is_help=True)(verify_command)
app.command("convert", no_args_is_help=True)(convert_command)
app.command("diff", no_args_is_help=True)(diff_command)
app.command("scan", no_args_is_help=True)(scan_command)
app.command("ls", no_args_is_help=True)(ls_command)
app.command("prune", no_args_is_help=True)(prune_command)
app.command("plot", no_args_is_help=True)(plot_command)
app.command("export", no_args_is_help=True)(export_command)
app.command("quantize", no_args_is_help=True)(quantize_command)
app.command("demo")(demo_command)


def main() -> None:
    """Console-script entry point (``torchkeep = "torchkeep.cli:main"``)."""
    app(prog_name="torchkeep")

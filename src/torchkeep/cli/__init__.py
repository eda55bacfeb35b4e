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

import json
import re
import sys
import traceback
from typing import Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from torchkeep._version import __version__
from torchkeep.cli.convert import convert_command
from torchkeep.cli.demo import demo_command
from torchkeep.cli.diff import diff_command
from torchkeep.cli.export import export_command
from torchkeep.cli.get import get_command
from torchkeep.cli.inspect import inspect_command
from torchkeep.cli.quantize import quantize_command
from torchkeep.cli.runs import ls_command, plot_command, prune_command
from torchkeep.cli.scan import scan_command
from torchkeep.cli.text import escape_lines
from torchkeep.cli.verify import verify_command
from torchkeep.errors import TorchkeepError

__all__ = ["app", "as_flags", "main"]

# typer 0.28 vendors click as typer._click; earlier typers use click itself
try:
    from typer._click import exceptions as _click_errors
except ImportError:  # pragma: no cover - typer < 0.28
    from click import exceptions as _click_errors  # type: ignore[no-redef]

_UsageError: type[Exception] = _click_errors.UsageError
# shows the command's help (click >= 8.2 raises it for a bare ``torchkeep VERB``): not an error to rewrite
_HelpShown: tuple[type[BaseException], ...] = tuple(
    c for c in (getattr(_click_errors, "NoArgsIsHelpError", None),) if c is not None
)


# a snake_case name in prose (not code: no ``=``, ``(`` or ``.`` around it)
_SNAKE = re.compile(r"(?<![\w.=-])([a-z]+(?:_[a-z]+)+)(?![\w=(.-])")
_PREFIX = re.compile(r"^([a-z_]+)=('[^']*'|\"[^\"]*\"|[^\s:]+): ")
_KEYWORD = re.compile(r"\b(pass|with|give|use|set)\s+([a-z_]+)=('[^']*'|\"[^\"]*\"|[^\s,;:)]+)?")


def as_flags(message: str, command: Any) -> str:
    """Library advice in the command's own words: ``pass trust_pickle=True`` -> ``pass --trust-pickle``.

    Only keywords the command has an option for are rewritten (``to='torch'`` -> ``--to torch``,
    ``verify=False`` -> ``--no-verify``, a leading ``mode='up': `` -> ``--mode up: ``, and a
    snake_case name in prose, ``max_shard_size`` -> ``--max-shard-size``); Python code in a
    message is left alone.
    """
    options = {
        p.name: p for p in getattr(command, "params", []) if getattr(p, "opts", None) and p.param_type_name == "option"
    }

    def flag(m: re.Match[str]) -> str:
        verb, name, value = m.group(1), m.group(2), m.group(3)
        p = options.get(name) or (options.get(name[:-1]) if name.endswith("s") else None)  # allow_globals
        if p is None:
            return m.group(0)
        long = max(p.opts, key=len)
        if value is not None and value.startswith("[") and value.endswith("]"):  # a list: the flag repeated
            return f"{verb} " + " ".join(f"{long} {item}" for item in re.findall(r"'([^']*)'", value))
        if value in ("True", "False") and getattr(p, "is_flag", False):
            if value == "False":
                off = [o for o in getattr(p, "secondary_opts", []) if o.startswith("--")]
                return f"{verb} {off[0]}" if off else m.group(0)
            return f"{verb} {long}"
        if value is None:
            return f"{verb} {long}"
        return f"{verb} {long} {value.strip(chr(39) + chr(34))}"

    def bare(m: re.Match[str]) -> str:  # ``max_shard_size 'abc' is not a size``: an argument named in prose
        p = options.get(m.group(1))
        return max(p.opts, key=len) if p is not None else m.group(0)

    def prefix(m: re.Match[str]) -> str:  # ``mode='sideways': pass ...``, how InvalidArgumentError starts
        p = options.get(m.group(1))
        return f"{max(p.opts, key=len)} {m.group(2).strip(chr(39) + chr(34))}: " if p is not None else m.group(0)

    message = _KEYWORD.sub(flag, message)
    message = _PREFIX.sub(prefix, message, count=1)
    return _SNAKE.sub(bare, message)


def _json_wanted(args: list[str]) -> bool:
    """Whether the command line asks for ``--json`` (before a ``--`` that ends the options)."""
    head = args[: args.index("--")] if "--" in args else args
    return "--json" in head


_VERBOSE = ("-v", "--verbose")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _Group(TyperGroup):
    """Turns errors into one red line on stderr and exit status 2 (``-v``: the traceback instead).

    With ``--json`` the error is also printed on stdout as ``{"ok": false, "error": ..., "path": ...}``.
    """

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        name, cmd, rest = super().resolve_command(ctx, args)
        own = {o for p in getattr(cmd, "params", []) for o in getattr(p, "opts", [])}
        head = rest.index("--") if "--" in rest else len(rest)
        flags = [a for a in rest[:head] if a in _VERBOSE and a not in own]
        if flags:  # -v after the verb (torchkeep inspect -v FILE) means what it means before it
            ctx.meta["torchkeep.verbose"] = True
            rest = [a for i, a in enumerate(rest) if i >= head or a not in flags]
        ctx.meta["torchkeep.command"] = cmd  # for error messages in the command's own flags
        ctx.meta["torchkeep.name"] = name
        ctx.meta["torchkeep.json"] = _json_wanted(rest)
        return name, cmd, rest

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, *_HelpShown):
            raise
        except _UsageError as e:  # a bad option value, a missing option, an unknown command
            name = ctx.meta.get("torchkeep.name")
            see = f"See 'torchkeep {name} -h'." if name else "See 'torchkeep -h'."
            text = _one_line(e.format_message()).rstrip(".")  # type: ignore[attr-defined]
            self._fail(ctx, f"{text}. {see}", None)
        except (TorchkeepError, OSError) as e:
            if ctx.meta.get("torchkeep.verbose"):
                self._traceback(e)
            # messages already name the file and say what to do; keep them on one line
            message = as_flags(_one_line(str(e)), ctx.meta.get("torchkeep.command"))
            path = getattr(e, "path", None)
            if isinstance(e, OSError) and not isinstance(e, TorchkeepError) and e.filename:
                message, path = f"{e.filename}: {e.strerror or message}", e.filename
            self._fail(ctx, message, path)
        except Exception as e:  # a bug, or a third-party error we do not translate: still one line
            if ctx.meta.get("torchkeep.verbose"):
                self._traceback(e)
            self._fail(
                ctx,
                f"unexpected {type(e).__name__}: {_one_line(str(e))} (run 'torchkeep -v ...' for the traceback)",
                None,
            )

    @staticmethod
    def _traceback(e: BaseException) -> None:
        traceback.print_exception(e, file=sys.stderr)
        raise typer.Exit(2) from None

    @staticmethod
    def _fail(ctx: Any, message: str, path: Any) -> None:
        if ctx.meta.get("torchkeep.json"):
            doc = {"ok": False, "error": message, "path": None if path is None else str(path)}
            typer.echo(json.dumps(doc, ensure_ascii=False))
        Console(stderr=True, soft_wrap=True, highlight=False).print(f"[bold red]error:[/] {escape_lines(message)}")
        raise typer.Exit(2) from None


app = typer.Typer(
    cls=_Group,
    name="torchkeep",
    help="Save, resume, inspect and verify PyTorch checkpoints, without pickle.\n\nStart with: torchkeep demo",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"torchkeep {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(
        False, "--version", "-V", callback=_version, is_eager=True, help="Print the torchkeep version and exit."
    ),
    verbose: bool = typer.Option(
        False,
        "--verbose",
        "-v",
        help="On an error, print the full traceback instead of one line (also accepted after the command).",
    ),
) -> None:
    """Save, resume, inspect and verify PyTorch checkpoints, without pickle.

    Start with: torchkeep demo
    """
    ctx.meta["torchkeep.verbose"] = verbose or ctx.meta.get("torchkeep.verbose", False)  # read by _Group.invoke


app.command("inspect", no_args_is_help=True)(inspect_command)
app.command("verify", no_args_is_help=True)(verify_command)
app.command("convert", no_args_is_help=True)(convert_command)
app.command("diff", no_args_is_help=True)(diff_command)
app.command("scan", no_args_is_help=True)(scan_command)
app.command("get", no_args_is_help=True)(get_command)
app.command("ls", no_args_is_help=True)(ls_command)
app.command("prune", no_args_is_help=True)(prune_command)
app.command("plot", no_args_is_help=True)(plot_command)
app.command("export", no_args_is_help=True)(export_command)
app.command("quantize", no_args_is_help=True)(quantize_command)
app.command("demo")(demo_command)


def main() -> None:
    """Console-script entry point (``torchkeep = "torchkeep.cli:main"``)."""
    app(prog_name="torchkeep")

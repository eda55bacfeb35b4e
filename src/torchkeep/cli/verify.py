"""``torchkeep verify FILE``: check every checksum, exit 0 when intact and 1 when damaged."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import typer
from rich.console import Console

from torchkeep.cli.inspect import human_bytes
from torchkeep.cli.text import escape, escape_lines
from torchkeep.errors import CheckpointNotFoundError, TorchkeepError
from torchkeep.inspection import verify
from torchkeep.kinds import detect

__all__ = ["PROGRESS_MIN_BYTES", "byte_progress", "verify_command"]

#: Files at least this large get a progress bar (on a terminal, without --json).
PROGRESS_MIN_BYTES = 64 << 20


def byte_progress(
    label: str, total: int, *, json_out: bool = False, min_bytes: int | None = None
) -> AbstractContextManager[Callable[[int], None] | None]:
    """A context giving a ``progress(nbytes)`` callback that drives a rich bar on stderr, or ``None``
    when no bar is wanted (``--json``, input under ``min_bytes``, default :data:`PROGRESS_MIN_BYTES`,
    or stderr is not a terminal)."""
    err = Console(stderr=True, highlight=False)
    if json_out or total < (PROGRESS_MIN_BYTES if min_bytes is None else min_bytes) or not err.is_terminal:
        return nullcontext(None)

    class _Bar:
        def __enter__(self) -> Callable[[int], None]:
            # rich.progress only when a bar is shown: it is a fifth of the CLI's start-up
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            columns = (TextColumn(label), BarColumn(), DownloadColumn(binary_units=True), TransferSpeedColumn())
            self.bar = Progress(*columns, TimeRemainingColumn(), console=err, transient=True)
            self.bar.__enter__()
            task = self.bar.add_task(label, total=total)
            return lambda n: self.bar.advance(task, n)

        def __exit__(self, *exc: object) -> None:
            self.bar.__exit__(*exc)  # type: ignore[arg-type]

    return _Bar()


def _looks_like_safetensors(path: Path) -> bool:
    """Whether ``path`` starts like a safetensors/torchkeep file (a sane header length, then ``{``):
    one that then fails to read is damaged (truncated, overwritten), not some other kind of file."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and 2 <= int.from_bytes(head[:8], "little") <= 1 << 28 and head[8:9] == b"{"


def _exit_code(result: dict, file: Path) -> int:
    if result["ok"]:
        return 0
    # 1: damaged (a checksum names it, or a safetensors file is truncated or malformed);
    # 2: not checkable at all (not a checkpoint, a legacy file, a directory without one)
    if result["key"]:
        return 1
    return 1 if result["format"] is None and file.is_file() and _looks_like_safetensors(file) else 2


def _input_bytes(path: Path) -> int:
    """Bytes verify will read (every shard of a shard set), for the progress bar; 0 when unknown."""
    try:
        found = detect(path, operation="verify")
        return sum(f.stat().st_size for f in found.shards)
    except (TorchkeepError, OSError):
        return 0  # verify itself reports the problem


def _for_the_cli(message: str) -> str:
    """A library message on one line; its advice to load anyway is Python code (verify has no such flag)."""
    return " ".join(message.split()).replace("pass verify=False", "load it with tk.load(path, verify=False)")


def _missing(file: Path, message: str) -> dict:
    """The ``--json`` result for a path that does not exist: verify's own shape, not ok."""
    return {
        "path": str(file),
        "format": None,
        "ok": False,
        "checksums": False,
        "tensors": 0,
        "bytes_checked": 0,
        "error": message,
        "key": None,
    }


def _verify_run(run: Path, json_out: bool) -> None:
    """``torchkeep verify RUN_DIR``: every checkpoint of a CheckpointManager run, shared shards read once."""
    from torchkeep.cli.runs import verify_run_rows

    started = time.perf_counter()
    rows = verify_run_rows(str(run))
    code = 0 if all(r["ok"] for r in rows) else 1
    if json_out:
        typer.echo(json.dumps({"run": str(run), "ok": code == 0, "checkpoints": rows}, indent=2, ensure_ascii=False))
        raise typer.Exit(code)
    out = Console(highlight=False, soft_wrap=True)
    for r in rows:
        shared = f", {r['shared']} shared with an older checkpoint (checked once)" if r["shared"] else ""
        if r["ok"]:
            out.print(f"[bold green]ok[/] {escape(r['file'])}: {r['shards']} file(s){shared}")
        else:
            out.print(f"[bold red]DAMAGED[/] {escape(r['file'])}: {escape(' '.join(str(r['error']).split()))}")
    bad = sum(not r["ok"] for r in rows)
    verdict = "all intact" if not bad else f"{bad} damaged"
    out.print(f"{escape(str(run))}: {len(rows)} checkpoints, {verdict} ({time.perf_counter() - started:.2f} s)")
    raise typer.Exit(code)


def verify_command(
    file: Path = typer.Argument(
        ..., metavar="FILE", help="The checkpoint to check, or a CheckpointManager run directory.", show_default=False
    ),
    json_out: bool = typer.Option(
        False,
        "--json",
        help='Print the result as JSON: {"path", "format", "ok", "checksums", "tensors", "bytes_checked", '
        '"error", "key"}; the same shape, with "ok": false and "error", when the file is missing or unreadable.',
    ),
) -> None:
    """Check every checksum of a checkpoint; exit 0 if intact, 1 if damaged, 2 if unreadable.

    Reads the whole file and names the damaged tensor (or the header) on failure; a truncated
    or malformed torchkeep/safetensors file is damaged too (exit 1).

    Given a run directory (the one a CheckpointManager saves into), checks every checkpoint of the
    run, reading each shard that incremental checkpoints share once, and names every checkpoint
    a damaged shard belongs to.

    Example: torchkeep verify ckpt.safetensors && echo intact
    """
    from torchkeep.cli.runs import is_run

    if is_run(file):
        _verify_run(file, json_out)
    err = Console(stderr=True, highlight=False)
    if json_out and not file.exists():
        message = str(CheckpointNotFoundError(file))
        typer.echo(json.dumps(_missing(file, message), indent=2, ensure_ascii=False))
        err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
        raise typer.Exit(2)
    size = _input_bytes(file)
    started = time.perf_counter()
    with byte_progress("verifying", size, json_out=json_out) as progress:
        result = verify(file, progress=progress)
    elapsed = time.perf_counter() - started
    code = _exit_code(result, file)
    if json_out:
        typer.echo(json.dumps(result, indent=2, ensure_ascii=False))
        raise typer.Exit(code)
    out = Console(highlight=False, soft_wrap=True)
    name = escape(str(file))
    shards = f" in {result['shards']} shards" if result.get("shards") else ""
    heads = "their headers" if shards else "the header"
    if code == 0 and result["checksums"]:
        out.print(
            f"[bold green]ok[/] {name}: all {result['tensors']:,} tensor checksums{shards} and {heads} match "
            f"({human_bytes(result['bytes_checked'])} in {elapsed:.2f} s)"
        )
    elif code == 0:
        out.print(
            f"[bold yellow]ok, unchecked[/] {name}: a plain {escape(result['format'])} "
            f"{'shard set' + shards.replace(' in', ' of') if shards else 'file'} has no checksums; "
            f"its layout ({result['tensors']:,} tensors) is consistent, but bit flips cannot be detected"
        )
    elif code == 1 and not result["key"]:
        out.print(f"[bold red]DAMAGED[/] {name}: truncated or malformed")
        out.print(f"[red]{escape_lines(_for_the_cli(result['error']))}[/]")
    elif code == 1:
        key = result["key"]
        what = "the header" if key == "<header>" else f"tensor {key!r}"
        if result.get("shard"):
            what += f" of shard {result['shard']}"
        out.print(f"[bold red]DAMAGED[/] {name}: {escape(what)} does not match its checksum")
        out.print(f"[red]{escape_lines(_for_the_cli(result['error']))}[/]")
    else:
        err.print(f"[bold red]error:[/] {escape(' '.join(result['error'].split()))}", soft_wrap=True)
    raise typer.Exit(code)

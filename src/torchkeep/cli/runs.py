"""``torchkeep ls RUN_DIR`` and ``torchkeep prune RUN_DIR``: the checkpoints of a CheckpointManager run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from torchkeep.cli.inspect import human_bytes
from torchkeep.cli.problems import JSON_ERROR_HELP, WrongInputError, what_is
from torchkeep.cli.text import escape
from torchkeep.errors import CheckpointNotFoundError, TorchkeepError
from torchkeep.headers import HeaderFile
from torchkeep.storage import open_run
from torchkeep.storage.paths import is_url
from torchkeep.storage.runs import RunStore

if TYPE_CHECKING:
    from torchkeep.manager import manifest

__all__ = ["is_run", "ls_command", "plot_command", "prune_command", "verify_run_rows"]


_RUN_HELP = "A CheckpointManager directory, or an fsspec URL (s3://bucket/run)."


def _not_a_run(run: str, verb: str) -> WrongInputError:
    """The error for an existing path that is no CheckpointManager run: what it is, and what to pass."""
    p = Path(run)
    if p.is_file():
        return WrongInputError(
            run,
            f"{what_is(p)}, not a run directory: {verb} takes the directory a CheckpointManager saves into; "
            f"for a single checkpoint file use torchkeep inspect {run} (or verify)",
        )
    return WrongInputError(
        run,
        f"{what_is(p)} that is not a CheckpointManager run (no manifest.json and no checkpoint a "
        f"CheckpointManager saved); pass the directory given to CheckpointManager(...)",
    )


def _entries(run: str, verb: str = "ls") -> tuple[RunStore, list[manifest.CheckpointInfo], str | None]:
    """The run's checkpoints and the best one the manifest records, read-only: the manifest, or the
    files' own records when it is lost. Writes nothing, takes no lock."""
    from torchkeep.manager import manifest, naming  # run commands only: not on inspect/verify's start-up path

    local = not is_url(run)
    if local and not Path(run).exists():
        raise CheckpointNotFoundError(run, "Pass the directory a CheckpointManager saves into.")
    if local and not Path(run).is_dir():
        raise _not_a_run(run, verb)
    store = open_run(run, create=False)
    raw = store.read(manifest.MANIFEST)
    entries, _reason = manifest.parse(raw, store.path_of)
    names = store.names() if (entries is None or store.adopts) else []
    ours = sorted(n for n in names if n.endswith(naming.SUFFIXES))
    if entries is None:
        entries = manifest.rebuild(store, ours)
        if not entries:
            if not local and not names:  # an object-store prefix with nothing under it
                raise CheckpointNotFoundError(run, "Pass the URL a CheckpointManager saves into.")
            raise _not_a_run(run, verb)
        return store, entries, None
    if store.adopts:  # as the manager sees it on open: files deleted by hand drop out, unindexed ones join
        known = {e.file for e in entries}
        present = [e for e in entries if e.file in set(names)]
        extra = manifest.rebuild(store, [n for n in ours if n not in known])
        entries = manifest.ordered(present + extra) if extra else present
    try:
        best = json.loads(raw or b"{}").get("best")
    except (ValueError, AttributeError):
        best = None
    return store, entries, best if isinstance(best, str) else None


def is_run(path: Path) -> bool:
    """Whether ``path`` is a local CheckpointManager run directory (it has the run's manifest)."""
    return path.is_dir() and (path / "manifest.json").is_file()


def verify_run_rows(run: str) -> list[dict[str, Any]]:
    """Every checkpoint of the run, verified, each shard shared by incremental checkpoints read once:
    ``{"file", "step", "ok", "error", "shards", "shared"}`` per checkpoint, oldest first."""
    from torchkeep.manager.shardset import verify_run

    store, entries, _ = _entries(run, "verify")
    if not entries:
        return []
    with store.local(entries[0].file) as first:
        rows = verify_run(first.parent, [e.file for e in entries])
    return [{"step": e.step, **r} for e, r in zip(entries, rows, strict=True)]


def _check_mode(mode: str) -> None:
    if mode not in ("max", "min"):
        raise typer.BadParameter(f"{mode!r}: use max (higher is better) or min (e.g. a loss)", param_hint="--mode")


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _verify(store: RunStore, name: str) -> str:
    from torchkeep.manager import naming

    if name.endswith(naming.SHARDS_SUFFIX):  # an incremental checkpoint: through verify_run, shards once
        from torchkeep.manager.shardset import verify_run

        with store.local(name) as path:
            row = verify_run(path.parent, [name])[0]
        return "ok" if row["ok"] else f"DAMAGED ({row['error']})"
    try:
        if name.endswith(naming.DIR_SUFFIX):  # a sharded checkpoint directory of a distributed run
            from torchkeep.storage.dcp_manifest import verify_all

            with store.local(name) as path:
                verify_all(path)
            return "ok"
        with store.local(name) as path, HeaderFile(path) as ck:
            ck.verify_all()
        return "ok"
    except TorchkeepError as e:
        return f"DAMAGED ({type(e).__name__})"
    except OSError as e:
        return f"unreadable ({e.strerror})"


def _metric_text(k: str, v: Any) -> str:
    return f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"


def _cells(r: dict[str, Any], now: float, verify: bool) -> list[str]:
    metrics = "\n".join(_metric_text(k, v) for k, v in r["metrics"].items())  # one per line: a narrow column
    size, disk = human_bytes(r["size"]), human_bytes(r["physical"])
    cells = [str(r["step"]), r["file"], metrics, size, disk, _age(now - r["created"]), " ".join(r["marks"])]
    return [*cells, r["verify"]] if verify else cells


def _print_rows(console: Console, run: str, rows: list[dict[str, Any]], now: float, *, verify: bool) -> None:
    """The ``ls`` table; where it would not fit the terminal, one block per checkpoint instead, so that no
    file name or metric value is ever cut or folded."""
    logical, physical = sum(r["size"] for r in rows), sum(r["physical"] for r in rows)
    title = f"{run} ({len(rows)} checkpoints, {human_bytes(logical)}, {human_bytes(physical)} on disk)"
    table = Table(title=escape(title), box=box.SIMPLE_HEAD, pad_edge=False)
    for head in ["step", "file", "metrics", "size", "disk", "age", ""] + (["verify"] if verify else []):
        table.add_column(head, no_wrap=head in ("file", "metrics"))
    for r in rows:
        table.add_row(*(escape(c) for c in _cells(r, now, verify)))
    if Measurement.get(console, console.options.update_width(1 << 16), table).maximum <= console.width:
        console.print(table)
        return
    console.print(escape(title), style="bold")
    for r in rows:
        step, file, metrics, size, disk, age, marks, *check = _cells(r, now, verify)
        shared = [f"{disk} on disk"] if disk != size else []  # differs only where shards are shared
        facts = [f"step {step}", size, *shared, f"{age} ago", *([marks] if marks else []), *check]
        console.print(f"[bold]{escape(file)}[/]")
        console.print("    " + escape(" · ".join(facts)))
        if metrics:
            console.print("    " + escape(" ".join(metrics.splitlines())))


def ls_command(
    run: str = typer.Argument(..., metavar="RUN_DIR", help=_RUN_HELP, show_default=False),
    monitor: str | None = typer.Option(None, "--monitor", help="Mark the best checkpoint by this metric."),
    mode: str = typer.Option("max", "--mode", help="'max' or 'min': which direction of --monitor is better."),
    verify: bool = typer.Option(False, "--verify", help="Check every checkpoint's checksums (reads every file)."),
    json_out: bool = typer.Option(False, "--json", help="Print the list as JSON. " + JSON_ERROR_HELP),
) -> None:
    """List a run's checkpoints: step, file, metrics, size, age, latest/best, and with --verify their integrity.

    "size" is a checkpoint's logical size, "disk" the bytes it is first to store: an incremental run's
    checkpoints share unchanged shards (hard links), counted once, in the oldest that holds them. The
    title gives both for the whole run. Read-only: it works beside a training job that is writing the run.

    Example: torchkeep ls runs/exp1 --monitor val_acc --verify
    """
    from torchkeep.manager import retention

    _check_mode(mode)
    store, entries, recorded = _entries(run, "ls")
    now = time.time()
    if monitor:
        best = retention.best_index(entries, monitor, mode)
    else:  # the best checkpoint by the metric the run's manager monitors, as its manifest records it
        best = next((i for i, e in enumerate(entries) if e.file == recorded), None)
    rows: list[dict[str, Any]] = []
    physical = [e.size for e in entries]
    if store.adopts and entries:  # a local run: shards shared by hard links count once
        from torchkeep.manager.shardset import physical_sizes

        with store.local(entries[0].file) as first:
            physical = physical_sizes(first.parent, [e.file for e in entries])
    for i, e in enumerate(entries):
        marks = [m for m, on in (("latest", i == len(entries) - 1), ("best", i == best)) if on]
        row = {"step": e.step, "file": e.file, "metrics": e.metrics, "size": e.size, "physical": physical[i]}
        row["created"] = e.created
        row["marks"] = marks
        if verify:
            row["verify"] = _verify(store, e.file)
        rows.append(row)
    damaged = verify and any(r["verify"] != "ok" for r in rows)
    if json_out:
        totals = {"size": sum(r["size"] for r in rows), "physical": sum(r["physical"] for r in rows)}
        typer.echo(json.dumps({"run": str(run), **totals, "checkpoints": rows}, indent=2, default=str))
    else:
        _print_rows(Console(soft_wrap=True), str(run), rows, now, verify=verify)
    if damaged:
        raise typer.Exit(1)


def prune_command(
    run: str = typer.Argument(..., metavar="RUN_DIR", help=_RUN_HELP, show_default=False),
    keep_last: int | None = typer.Option(None, "--keep-last", min=0, help="Keep the N most recent."),
    keep_best: int | None = typer.Option(None, "--keep-best", min=0, help="Keep the K best by --monitor."),
    monitor: str | None = typer.Option(None, "--monitor", help="The metric for --keep-best."),
    mode: str = typer.Option("max", "--mode", help="'max' or 'min'."),
    keep_every: int | None = typer.Option(None, "--keep-every", min=1, help="Keep steps that are multiples of N."),
    yes: bool = typer.Option(False, "--yes", help="Delete. Without it, only show what would be deleted."),
) -> None:
    """Delete the checkpoints no --keep-* rule keeps (a dry run unless --yes).

    The newest checkpoint is always kept; files the run's manager did not write are never touched.
    The dry run only reads the run (no lock, nothing written). With --yes it takes the run's lock,
    so it refuses while a training job is writing the run.

    Example: torchkeep prune runs/exp1 --keep-last 3 --keep-best 2 --monitor val_acc --yes
    """
    if keep_last is None and keep_best is None and keep_every is None:
        raise typer.BadParameter("give at least one of --keep-last, --keep-best, --keep-every")
    if keep_best is not None and not monitor:
        raise typer.BadParameter(
            "--keep-best needs --monitor, the metric to rank by, e.g. --keep-best 2 --monitor val_acc",
            param_hint="--keep-best",
        )
    _check_mode(mode)
    _, entries, _ = _entries(run, "prune")  # a run, or a clear error, before anything is locked or written
    if not yes:  # the dry run reads the manifest as ls does: no lock, no write
        from torchkeep.manager.retention import policy_of

        policy = policy_of(keep_last=keep_last, keep_best=keep_best, monitor=monitor, mode=mode, keep_every=keep_every)
        kept_at = policy.keep(entries)
        gone = [e for i, e in enumerate(entries) if i not in kept_at]
        kept = len(entries) - len(gone)
    else:
        from torchkeep.manager.manager import CheckpointManager  # torch: prune only

        with CheckpointManager(
            run, keep_last=keep_last, keep_best=keep_best, monitor=monitor, mode=mode, keep_every=keep_every
        ) as mgr:
            gone = mgr.prune()
            kept = len(mgr.checkpoints())
    verb = "deleted" if yes else "would delete"
    console = Console(soft_wrap=True)
    for e in gone:
        console.print(f"{verb} {escape(e.file)} (step {e.step}, {human_bytes(e.size)})")
    freed = human_bytes(sum(e.size for e in gone))
    console.print(
        f"{verb} {len(gone)} checkpoint(s), {freed}; {kept} kept" + ("" if yes else ". Pass --yes to delete.")
    )


def plot_command(
    run: str = typer.Argument(..., metavar="RUN_DIR", help=_RUN_HELP, show_default=False),
    metric: str = typer.Option(..., "--metric", help="The metric to plot (as passed to mgr.save(metrics=...))."),
    output: Path = typer.Option(Path("curve.png"), "-o", "--output", help="The image to write (.png, .svg, .pdf)."),
    mode: str = typer.Option("max", "--mode", help="'max' or 'min': which direction is better (marks the best)."),
) -> None:
    """Plot a metric per checkpoint of a run, with the best and the latest marked (needs matplotlib).

    Example: torchkeep plot runs/exp1 --metric val_acc -o curve.png
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise typer.BadParameter("plot needs matplotlib: pip install 'torchkeep[plot]'") from None
    from matplotlib.backend_bases import FigureCanvasBase

    from torchkeep.manager import retention

    _check_mode(mode)
    kinds = FigureCanvasBase.get_supported_filetypes()
    if output.suffix.lower().lstrip(".") not in kinds:
        raise typer.BadParameter(
            f"{output}: cannot write a {output.suffix or 'suffix-less'} image; name it .png, .svg or .pdf "
            f"(also: {', '.join(sorted(k for k in kinds if k not in ('png', 'svg', 'pdf')))})",
            param_hint="-o",
        )
    _, entries, _ = _entries(run, "plot")
    points = [(e.step, v, e) for e in entries if (v := retention.metric_value(e, metric)) is not None]
    if not points:
        names = sorted({k for e in entries for k in e.metrics})
        raise typer.BadParameter(f"no checkpoint of {run} has a numeric {metric!r}; metrics recorded: {names}")
    best = retention.best_index([p[2] for p in points], metric, mode)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=metric)
    if best is not None:
        ax.scatter([points[best][0]], [points[best][1]], s=160, facecolors="none", edgecolors="green", label="best")
    ax.scatter([points[-1][0]], [points[-1][1]], marker="x", s=90, color="red", label="latest")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(str(run))
    ax.legend()
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    plt.close(fig)
    Console(soft_wrap=True).print(f"wrote {escape(str(output))}: {escape(metric)} over {len(points)} checkpoints")

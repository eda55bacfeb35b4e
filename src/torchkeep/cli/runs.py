"""``torchkeep ls RUN_DIR`` and ``torchkeep prune RUN_DIR``: the checkpoints of a CheckpointManager run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from torchkeep.cli.inspect import human_bytes
from torchkeep.errors import CheckpointNotFoundError, TorchkeepError
from torchkeep.headers import HeaderFile
from torchkeep.storage import open_run
from torchkeep.storage.paths import is_url
from torchkeep.storage.runs import RunStore

if TYPE_CHECKING:
    from torchkeep.manager import manifest

__all__ = ["ls_command", "plot_command", "prune_command"]


_RUN_HELP = "A CheckpointManager directory, or an fsspec URL (s3://bucket/run)."


def _entries(run: str) -> tuple[RunStore, list[manifest.CheckpointInfo]]:
    """The run's checkpoints, read-only: the manifest, or the files' own records when it is lost."""
    from torchkeep.manager import manifest, naming  # run commands only: not on inspect/verify's start-up path

    store = open_run(run, create=False)
    if not is_url(run) and not Path(store.location).is_dir():
        raise CheckpointNotFoundError(run)
    entries, _reason = manifest.parse(store.read(manifest.MANIFEST), store.path_of)
    if entries is None:
        names = store.names()
        if not names:
            raise CheckpointNotFoundError(run)
        entries = manifest.rebuild(store, sorted(n for n in names if n.endswith(naming.SUFFIXES)))
    return store, entries


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _verify(store: RunStore, name: str) -> str:
    from torchkeep.manager import naming

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


def ls_command(
    run: str = typer.Argument(..., metavar="RUN_DIR", help=_RUN_HELP, show_default=False),
    monitor: str | None = typer.Option(None, "--monitor", help="Mark the best checkpoint by this metric."),
    mode: str = typer.Option("max", "--mode", help="'max' or 'min': which direction of --monitor is better."),
    verify: bool = typer.Option(False, "--verify", help="Check every checkpoint's checksums (reads every file)."),
    json_out: bool = typer.Option(False, "--json", help="Print the list as JSON."),
) -> None:
    """List a run's checkpoints: step, file, metrics, size, age, latest/best, and with --verify their integrity.

    Read-only: it works beside a training job that is writing the run.

    Example: torchkeep ls runs/exp1 --monitor val_acc --verify
    """
    from torchkeep.manager import retention

    store, entries = _entries(run)
    now = time.time()
    best = retention.best_index(entries, monitor, mode) if monitor else None
    rows: list[dict[str, Any]] = []
    for i, e in enumerate(entries):
        marks = [m for m, on in (("latest", i == len(entries) - 1), ("best", i == best)) if on]
        row = {"step": e.step, "file": e.file, "metrics": e.metrics, "size": e.size, "created": e.created}
        row["marks"] = marks
        if verify:
            row["verify"] = _verify(store, e.file)
        rows.append(row)
    damaged = verify and any(r["verify"] != "ok" for r in rows)
    if json_out:
        typer.echo(json.dumps({"run": str(run), "checkpoints": rows}, indent=2, default=str))
    else:
        table = Table(title=f"{run} ({len(rows)} checkpoints)")
        for col in ["step", "file", "metrics", "size", "age", ""] + (["verify"] if verify else []):
            table.add_column(col)
        for r in rows:
            metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["metrics"].items())
            cells = [str(r["step"]), r["file"], metrics, human_bytes(r["size"]), _age(now - r["created"])]
            cells.append(" ".join(r["marks"]))
            if verify:
                cells.append(r["verify"])
            table.add_row(*cells)
        Console(soft_wrap=True).print(table)
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
    It takes the run's lock, so it refuses while a training job is writing the run.

    Example: torchkeep prune runs/exp1 --keep-last 3 --keep-best 2 --monitor val_acc --yes
    """
    if keep_last is None and keep_best is None and keep_every is None:
        raise typer.BadParameter("give at least one of --keep-last, --keep-best, --keep-every")
    if not is_url(run) and not Path(run).is_dir():
        raise CheckpointNotFoundError(run)
    from torchkeep.manager.manager import CheckpointManager  # torch: prune only

    with CheckpointManager(
        run, keep_last=keep_last, keep_best=keep_best, monitor=monitor, mode=mode, keep_every=keep_every
    ) as mgr:
        gone = mgr.prune(dry_run=not yes)
        kept = len(mgr.checkpoints()) - (0 if yes else len(gone))
    verb = "deleted" if yes else "would delete"
    console = Console(soft_wrap=True)
    for e in gone:
        console.print(f"{verb} {e.file} (step {e.step}, {human_bytes(e.size)})")
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
    from torchkeep.manager import retention

    _, entries = _entries(run)
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
    Console(soft_wrap=True).print(f"wrote {output}: {metric} over {len(points)} checkpoints")

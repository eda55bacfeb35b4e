"""``torchkeep convert SRC DST``: legacy torch files to torchkeep, torchkeep to plain safetensors or torch, sharding,
and distributed checkpoint directories gathered into one file in bounded memory."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.console import Console

from torchkeep.cli.inspect import human_bytes
from torchkeep.cli.problems import JSON_ERROR_HELP
from torchkeep.cli.text import escape
from torchkeep.cli.verify import PROGRESS_MIN_BYTES, byte_progress
from torchkeep.format.meta import OUTPUT_FORMATS
from torchkeep.format.shards import is_index_name

__all__ = ["convert_command"]


def _written(path: Path) -> tuple[int, int]:
    """``(files, bytes)`` written: the index plus its shards, or one file, or a folder's files."""
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file()]
        return len(files), sum(p.stat().st_size for p in files)
    if is_index_name(path.name):
        shards = set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values())
        return len(shards) + 1, sum((path.parent / s).stat().st_size for s in shards) + path.stat().st_size
    return 1, path.stat().st_size


def convert_command(
    src: Path = typer.Argument(..., metavar="SRC", help="The checkpoint to read (never modified).", show_default=False),
    dst: Path = typer.Argument(..., metavar="DST", help="The file to write.", show_default=False),
    to: str = typer.Option(
        None,
        "--to",
        metavar="FORMAT",
        help=f"Output format, one of {', '.join(OUTPUT_FORMATS)}. Default: from DST's name "
        "(.safetensors -> torchkeep, .pt/.pth/.bin/.ckpt -> torch). hf: DST is a folder that Hugging Face "
        "from_pretrained loads.",
        show_default=False,
    ),
    max_shard_size: str = typer.Option(
        None,
        "--max-shard-size",
        metavar="SIZE",
        help="Split into shards of at most SIZE (5GB, 500MB, 4GiB) with an HF-style .safetensors.index.json.",
        show_default=False,
    ),
    key: str = typer.Option(
        None,
        "--key",
        metavar="PATH",
        help="With --to safetensors or hf: the subtree holding the weights (e.g. ema/model). "
        "Default: model, model_state_dict, state_dict, module or net, or the whole file if it is flat.",
        show_default=False,
    ),
    max_memory: str = typer.Option(
        None,
        "--max-memory",
        metavar="SIZE",
        help="Gathering a distributed checkpoint directory: use about SIZE of memory for its tensors "
        "(batches of half of it; a larger tensor alone, at twice its size). Default: 1GiB.",
        show_default=False,
    ),
    config: Path = typer.Option(
        None,
        "--config",
        metavar="PATH",
        help="With --to hf: the model's config.json (or the folder holding it). Default: the checkpoint's "
        "own top-level 'config' dict, when it has one with a model_type.",
        show_default=False,
    ),
    trust_pickle: bool = typer.Option(
        False, "--trust-pickle", help="Allow a legacy pickle that needs more than plain data. RUNS ITS CODE."
    ),
    allow_global: list[str] = typer.Option(
        [],
        "--allow-global",
        metavar="PATTERN",
        help="A global a legacy pickle may use besides torch's allowlist (mypkg.models.Net or mypkg.models.*), "
        "still through the weights-only unpickler. Repeatable.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON. " + JSON_ERROR_HELP),
) -> None:
    """Convert a checkpoint; the output is written atomically and SRC is never modified.

    \b
    Examples:
      # legacy torch.save file -> torchkeep (whole tree: epoch, optimizer, config)
      torchkeep convert old.pth ckpt.safetensors
      # the weights only, as a plain safetensors file for other tools
      torchkeep convert ckpt.safetensors model.safetensors --to safetensors
      # shards of at most 5 GB + model.safetensors.index.json
      torchkeep convert ckpt.safetensors model.safetensors --max-shard-size 5GB
      # torch.save format for old tools
      torchkeep convert ckpt.safetensors legacy.pt
      # the model of a training checkpoint as a folder from_pretrained loads
      torchkeep convert runs/exp1/step-001000.safetensors gpt2-ft/ --to hf --config base/config.json
      # gather a distributed checkpoint into one file, 512 MiB of tensors at a time
      torchkeep convert runs/exp1/step-001000 model.safetensors --max-memory 512MiB
    """
    if to is not None and to not in OUTPUT_FORMATS:
        raise typer.BadParameter(f"{to!r}: use one of {', '.join(OUTPUT_FORMATS)}", param_hint="--to")
    from torchkeep.convert import convert, input_size  # torch: only when a conversion runs

    started = time.perf_counter()
    with byte_progress(
        "converting", input_size(src) if src.exists() else 0, json_out=json_out, min_bytes=PROGRESS_MIN_BYTES
    ) as progress:
        out = convert(
            src,
            dst,
            to=to,
            max_shard_size=max_shard_size,
            trust_pickle=trust_pickle,
            allow_globals=allow_global or None,
            key=key,
            progress=progress,
            max_memory=max_memory,
            config=config,
        )
    files, size = _written(out)
    elapsed = time.perf_counter() - started
    if json_out:
        typer.echo(json.dumps({"src": str(src), "dst": str(out), "files": files, "bytes": size, "seconds": elapsed}))
        return
    shards = f" ({files} files)" if out.is_dir() else f" ({files - 1} shards + index)" if files > 1 else ""
    Console(highlight=False, soft_wrap=True).print(
        f"[bold green]wrote[/] {escape(str(out))}{shards}: {human_bytes(size)} in {elapsed:.2f} s"
    )

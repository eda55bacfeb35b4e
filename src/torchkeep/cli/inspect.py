"""``torchkeep inspect FILE``: what a checkpoint holds, read from its header alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from torchkeep.cli.problems import JSON_ERROR_HELP
from torchkeep.cli.text import clean, escape
from torchkeep.inspection import inspect

__all__ = ["human_bytes", "inspect_command", "render"]

DEFAULT_DEPTH = 3
MAX_CHILDREN = 20
_VALUE_WIDTH = 60


def human_bytes(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"`` (binary units, three significant digits).

    Example:
        >>> human_bytes(512), human_bytes(1536), human_bytes(3 << 30)
        ('512 B', '1.5 KiB', '3.0 GiB')
    """
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"


def _short(value: Any) -> str:
    """A scalar as Python prints it (``True``, ``None``, ``'text'``); containers as JSON."""
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else repr(value)
    return text if len(text) <= _VALUE_WIDTH else text[: _VALUE_WIDTH - 1] + "…"


def _counts(node: dict[str, Any]) -> str:
    t = node["tensors"]
    return f"{t} tensor{'s' if t != 1 else ''} · {node['elements']:,} elements · {human_bytes(node['bytes'])}"


def _label(node: dict[str, Any]) -> Text:
    name = node["name"]
    kind = node["kind"]
    label = Text(clean(name) if name else "''", style="bold")
    if kind == "per rank":  # RNG states and per_rank= entries of a distributed checkpoint
        label.append(f"  {clean(node['value'])}", style="magenta")
        return label
    if "value" in node:
        value = node["value"]
        shown = _short(value) if kind not in ("float", "dtype", "device") or not isinstance(value, str) else value
        label.append(f" = {clean(shown)}", style="cyan")
        return label
    if kind in ("tensor", "ndarray"):
        if node.get("missing"):
            label.append(f"  missing from the header: {clean(node['key'])}", style="red")
            return label
        shape = "[" + ", ".join(map(str, node["shape"])) + "]"
        label.append(f"  {clean(node['dtype'])} {shape}", style="green")
        label.append(f"  {human_bytes(node['bytes'])}", style="dim")
        if node.get("tied"):
            label.append(f"  shares storage with {clean(node['key'])}", style="yellow")
        if "device" in node:
            label.append(f"  (saved from {clean(node['device'])})", style="dim")
        return label
    cls = node.get("class")
    if cls:
        short = cls.rsplit(".", 1)[-1]
        shown = short if kind in ("stateful", "rng_state") or kind.split("_")[0] in short.lower() else f"{short} {kind}"
        label.append(f"  {clean(shown)}", style="magenta")
    elif kind in ("list", "tuple", "generator"):
        label.append(f"  {clean(kind)}", style="magenta")
    if kind == "generator":
        label.append(f" ({clean(node.get('device', 'cpu'))})", style="dim")
    elif node["tensors"]:
        label.append(f"  {_counts(node)}", style="dim")
    omitted = node.get("children_omitted")
    if omitted:
        label.append(f"  +{omitted} hidden", style="dim italic")
    return label


def _add(tree: Tree, nodes: list[dict[str, Any]]) -> None:
    for node in nodes[:MAX_CHILDREN]:
        branch = tree.add(_label(node))
        _add(branch, node.get("children", []))
    rest = nodes[MAX_CHILDREN:]
    if rest:
        more = {
            "tensors": sum(n["tensors"] for n in rest),
            "elements": sum(n["elements"] for n in rest),
            "bytes": sum(n["bytes"] for n in rest),
        }
        tree.add(Text(f"... {len(rest)} more  ({_counts(more)})", style="dim italic"))


def render(info: dict[str, Any], console: Console) -> None:
    """Print an :func:`torchkeep.inspect` summary as rich tables and a tree."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("file", escape(info["path"]))
    if info.get("legacy"):
        grid.add_row("format", f"[yellow]{escape(info['format'])}[/]")
        grid.add_row("size", human_bytes(info["file_size"]))
        if "storages" in info:
            grid.add_row("storages", f"{info['storages']:,} ({human_bytes(info['storage_bytes'])})")
        if "shards" in info:
            grid.add_row("sharded", f"{info['shards']} shards, {info['tensors']:,} tensors in the index")
        if "tree" not in info:
            console.print(grid)
            console.print(f"[yellow]{escape(info['hint'])}[/]")
            return
        grid.add_row("tensors", f"{info['tensors']:,} · {info['elements']:,} elements")
        grid.add_row("parameters", f"{info['parameters']:,}")
        console.print(grid)
        _dtype_table(info, console)
        console.print(f"[yellow]{escape(info['hint'])}[/]")
        _state_tree(info, console)
        return
    fmt = info["format"] + (" (checksummed)" if info["checksums"] else " (no checksums)")
    grid.add_row("format", escape(fmt))
    if info.get("created") or info.get("torchkeep_version"):
        parts = [info.get("created") or "unknown time"]
        if info.get("torchkeep_version"):
            parts.append(f"torchkeep {info['torchkeep_version']}")
        if info.get("torch_version"):
            parts.append(f"torch {info['torch_version']}")
        grid.add_row("created", escape(" · ".join(parts)))
    head = f"header {human_bytes(info['header_size'])}, " if "header_size" in info else ""
    grid.add_row("size", f"{human_bytes(info['file_size'])} ({head}tensor data {human_bytes(info['bytes'])})")
    grid.add_row("tensors", f"{info['tensors']:,} · {info['elements']:,} elements")
    if "shards" in info:
        grid.add_row(
            "sharded",
            f"{info['shards']} shards, every one read: {escape(', '.join(info['files'][:4]))}"
            + (f", ... ({len(info['files']) - 4} more)" if len(info["files"]) > 4 else ""),
        )
    if "world_size" in info:
        grid.add_row(
            "sharded", f"saved on {info['world_size']} rank(s) · {info['files']} files, restores on any number"
        )
    grid.add_row("parameters", f"{info['parameters']:,}")
    model = info.get("model")
    if model:
        version = f" v{model['version']}" if model.get("version") is not None else ""
        grid.add_row("model", escape(f"{model['name']}{version} ({model['class']})"))
        for i, (key, value) in enumerate((model.get("config") or {}).items()):
            grid.add_row("config" if i == 0 else "", f"{escape(key)} = {escape(_short(value))}")
    for i, (key, value) in enumerate(info["metadata"].items()):
        grid.add_row("metadata" if i == 0 else "", f"{escape(key)} = {escape(_short(value))}")
    console.print(grid)

    _dtype_table(info, console)
    if info.get("hint"):
        console.print(f"[yellow]{escape(info['hint'])}[/]")
    _state_tree(info, console)


def _dtype_table(info: dict[str, Any], console: Console) -> None:
    if info["dtypes"]:
        table = Table(title=None, box=None, padding=(0, 2), show_edge=False, header_style="bold")
        table.add_column("dtype")
        table.add_column("tensors", justify="right")
        table.add_column("elements", justify="right")
        table.add_column("bytes", justify="right")
        for name, d in info["dtypes"].items():
            table.add_row(escape(name), f"{d['tensors']:,}", f"{d['elements']:,}", human_bytes(d["bytes"]))
        console.print()
        console.print(table)


def _state_tree(info: dict[str, Any], console: Console) -> None:
    console.print()
    tree = Tree(Text("state tree", style="bold"), guide_style="dim")
    _add(tree, info["tree"])
    console.print(tree)


def inspect_command(
    file: Path = typer.Argument(
        ...,
        metavar="FILE",
        help="A torchkeep, safetensors or torch.save file, or a torchkeep distributed checkpoint directory.",
        show_default=False,
    ),
    json_out: bool = typer.Option(
        False, "--json", help="Print the summary as JSON (full tree unless --depth). " + JSON_ERROR_HELP
    ),
    depth: int | None = typer.Option(
        None,
        "--depth",
        "-d",
        min=1,
        help=f"Tree levels to show (default {DEFAULT_DEPTH}; with --json, the whole tree).",
    ),
) -> None:
    """Show what a checkpoint holds, reading only its header (instant, even for huge files).

    Prints format, creation info, parameter counts, bytes per dtype, user metadata
    and the state tree (collapsed for large models).

    Example: torchkeep inspect ckpt.safetensors --depth 2
    """
    if json_out:
        typer.echo(json.dumps(inspect(file, depth=depth), indent=2, ensure_ascii=False))
        return
    render(inspect(file, depth=depth or DEFAULT_DEPTH), Console(highlight=False))

"""``torchkeep get FILE KEY``: one tensor or value out of a checkpoint: its stats, or a file of it."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from torchkeep.cli.inspect import human_bytes
from torchkeep.cli.problems import JSON_ERROR_HELP, WrongInputError
from torchkeep.cli.text import escape

__all__ = ["get_command"]

_OUT_SUFFIXES = (".npy", ".pt", ".safetensors")


_MISSING = object()


def _lookup(file: Path, key: str) -> tuple[Any, list[str]]:
    """``(value, [])``, or ``(_MISSING, names to suggest)``: a stored tensor read alone when it is one,
    else the tree walked by the ``/``-path."""
    import torchkeep as tk
    from torchkeep import kinds

    found = kinds.detect(file, operation="get")
    if found.kind in (kinds.TORCHKEEP, kinds.SAFETENSORS):
        with tk.open(found.target) as ck:
            if key in ck.keys():
                return ck.get(key), []
    tree = tk.load(file)
    node: Any = tree
    for part in [p for p in key.split("/") if p]:
        if isinstance(node, dict) and any(str(k) == part for k in node):
            node = node[next(k for k in node if str(k) == part)]
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING, sorted(_flat(tree))
    return node, []


def _flat(tree: Any, prefix: str = "") -> list[str]:
    """Every ``/``-path of a tree, for suggestions."""
    if isinstance(tree, dict):
        out = []
        for k, v in tree.items():
            name = f"{prefix}/{k}" if prefix else str(k)
            out += [name, *_flat(v, name)]
        return out
    return []


def _summary(value: Any) -> dict[str, Any]:
    import torch

    if isinstance(value, torch.Tensor):
        t = value.detach()
        out: dict[str, Any] = {
            "kind": "tensor",
            "dtype": str(t.dtype).removeprefix("torch."),
            "shape": list(t.shape),
            "elements": t.numel(),
            "bytes": t.numel() * t.element_size(),
        }
        if t.numel() and (
            t.is_floating_point()
            or t.is_complex()
            or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
        ):
            f = t.abs().double() if t.is_complex() else t.double()
            finite = f[torch.isfinite(f)]
            out["nan"] = int(torch.isnan(f).sum())
            out["inf"] = int(torch.isinf(f).sum())
            if finite.numel():
                out.update(min=float(finite.min()), max=float(finite.max()), mean=float(finite.mean()))
                out["std"] = float(finite.std()) if finite.numel() > 1 else 0.0
        elif t.numel() and t.dtype is torch.bool:
            out["true"] = int(t.sum())
        return out
    if isinstance(value, dict):
        return {"kind": "dict", "keys": [str(k) for k in list(value)[:50]], "length": len(value)}
    try:
        shown: Any = json.loads(json.dumps(value))
    except (TypeError, ValueError):
        shown = repr(value)
    return {"kind": type(value).__name__, "value": shown}


def _write(value: Any, out: Path, key: str) -> None:
    import numpy as np
    import torch

    if not isinstance(value, torch.Tensor):
        raise WrongInputError(out, f"--out writes a tensor; {key} is a {type(value).__name__}")
    out.parent.mkdir(parents=True, exist_ok=True)
    t = value.detach().cpu().contiguous()
    if out.suffix == ".npy":
        np.save(out, t.numpy())
    elif out.suffix == ".pt":
        torch.save(t.clone(), out)  # a tensor alone: loads with torch.load(weights_only=True)
    else:
        from safetensors.torch import save_file

        save_file({key.rsplit("/", 1)[-1] or "tensor": t}, str(out))


def get_command(
    file: Path = typer.Argument(
        ..., metavar="FILE", help="The checkpoint (any kind torchkeep reads).", show_default=False
    ),
    key: str = typer.Argument(
        ...,
        metavar="KEY",
        help="A stored tensor name (model/fc.weight) or a /-path in the tree (epoch, cfg/lr).",
        show_default=False,
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Write the tensor to .npy, .pt (a bare tensor) or .safetensors.", show_default=False
    ),
    json_out: bool = typer.Option(False, "--json", help=f"Print the summary as JSON. {JSON_ERROR_HELP}"),
) -> None:
    """Show one tensor or value from a checkpoint: shape, dtype and statistics, or the value itself.

    Reads only that tensor from torchkeep and safetensors files (checksum verified); other kinds
    are loaded whole. Nothing is written unless --out is given.

    \b
    Examples:
      torchkeep get ckpt.safetensors model/fc.weight
      torchkeep get ckpt.safetensors epoch
      torchkeep get ckpt.safetensors model/fc.weight -o fc.npy
    """
    if out is not None and out.suffix not in _OUT_SUFFIXES:
        raise typer.BadParameter(f"end it in one of {', '.join(_OUT_SUFFIXES)}", param_hint="--out")
    value, names = _lookup(file, key)
    if value is _MISSING:
        close = difflib.get_close_matches(key, names, n=5, cutoff=0.5) or names[:10]
        hint = f"; did you mean: {', '.join(close)}" if close else ""
        raise WrongInputError(file, f"no {key!r} in it{hint} (torchkeep inspect {file} lists what it holds)")
    summary = {"path": str(file), "key": key, **_summary(value)}
    if out is not None:
        _write(value, out, key)
        summary["written"] = str(out)
    if json_out:
        typer.echo(json.dumps(summary, indent=2, ensure_ascii=False))
        return
    con = Console(highlight=False, soft_wrap=True)
    if summary["kind"] == "tensor":
        head = f"{escape(key)}: {summary['dtype']} {summary['shape']} ({human_bytes(summary['bytes'])})"
        con.print(f"[bold]{head}[/]")
        stats = [f"{k} {summary[k]:.6g}" for k in ("min", "max", "mean", "std") if k in summary]
        stats += [f"{k} {summary[k]}" for k in ("nan", "inf", "true") if summary.get(k)]
        if stats:
            con.print("  " + "  ".join(stats))
    else:
        shown = summary.get("value", summary.get("keys"))
        con.print(f"[bold]{escape(key)}[/] ({summary['kind']}): {escape(json.dumps(shown, ensure_ascii=False))}")
    if out is not None:
        con.print(f"wrote {escape(str(out))}")

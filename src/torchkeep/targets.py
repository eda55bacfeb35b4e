"""Restore targets: the objects a checkpoint is loaded into, found in a nested dict (one rule for every restore).

Example:
    >>> import torch
    >>> [p for p, _ in restore_targets({"model": torch.nn.Linear(1, 1), "extra": {"g": torch.Generator()}})]
    [('model',), ('extra', 'g')]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from torchkeep.errors import ArgumentTypeError
from torchkeep.tree import format_path, is_stateful

__all__ = ["restore_targets"]


def restore_targets(targets: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Any]]:
    """``(path, target)`` for every Stateful / Generator leaf of a nested dict of targets."""
    if is_stateful(targets) or isinstance(targets, torch.Generator):
        return [(prefix, targets)]
    if isinstance(targets, Mapping):
        out: list[tuple[tuple[Any, ...], Any]] = []
        for k, v in targets.items():
            out.extend(restore_targets(v, (*prefix, k)))
        return out
    raise ArgumentTypeError(
        f"restore target {format_path(prefix) or '<root>'}",
        targets,
        "an object with load_state_dict() (a module, optimizer, scheduler, tk.RNGState()), a torch.Generator, "
        "or a dict of them",
    )

"""``map_location``: where loaded tensors go, with one meaning for ``load``, ``restore`` and ``load_into``.

Example:
    >>> import torch
    >>> place = placer({"cuda:1": "cpu"})
    >>> place(torch.ones(1), "cuda:1").device
    device(type='cpu')
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from torchkeep.errors import ArgumentTypeError, DeviceUnavailableError, InvalidArgumentError

__all__ = ["MapLocation", "Placer", "checked_placer", "fixed_device", "placer"]

MapLocation = str | torch.device | Mapping[str, Any] | Callable[[torch.Tensor, str], torch.Tensor] | None
Placer = Callable[[torch.Tensor, str | None], torch.Tensor]
_ACCEPTED = (
    "a device, a string such as 'cpu', a dict such as {'cuda:1': 'cuda:0'} or a callable fn(tensor, saved_device)"
)


def placer(map_location: MapLocation) -> Placer | None:
    """Turn a ``map_location`` into ``place(tensor, original_device)`` (None: leave on CPU).

    ``None`` sends each tensor to the device it was saved from.
    """
    if map_location is None:
        return lambda t, dev: t if dev is None else t.to(dev)
    if isinstance(map_location, (str, torch.device)):
        try:
            target = torch.device(map_location)
        except RuntimeError:
            raise InvalidArgumentError(
                "map_location", map_location, "not a device; pass 'cpu', 'cuda:0' or a torch.device"
            ) from None
        return None if target.type == "cpu" else _ToDevice(target)
    if isinstance(map_location, Mapping):
        table = {str(k): v for k, v in map_location.items()}
        return lambda t, dev: t.to(table.get(dev or "cpu", dev or "cpu"))
    if callable(map_location):
        return lambda t, dev: map_location(t, dev or "cpu")
    raise ArgumentTypeError("map_location", map_location, _ACCEPTED)


class _ToDevice:
    """``map_location`` naming one device: every tensor goes there (readers may read straight to it)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, t: torch.Tensor, dev: str | None) -> torch.Tensor:
        return t.to(self.device)


def fixed_device(place: Placer | None) -> torch.device | None:
    """The one device a placer sends every tensor to (``map_location="cuda:0"``), else ``None``.

    Example:
        >>> fixed_device(placer("cuda:1")), fixed_device(placer({"cuda:1": "cpu"}))
        (device(type='cuda', index=1), None)
    """
    return getattr(place, "device", None)


def checked_placer(path: str | Path, map_location: MapLocation) -> Placer | None:
    """:func:`placer` whose device failures raise :class:`~torchkeep.errors.DeviceUnavailableError` naming ``path``."""
    place = placer(map_location)
    if place is None:
        return None

    def run(t: torch.Tensor, dev: str | None) -> torch.Tensor:
        try:
            return place(t, dev)
        except (RuntimeError, AssertionError) as e:
            raise DeviceUnavailableError(path, dev or "cpu", map_location, str(e).splitlines()[0]) from None

    if (device := fixed_device(place)) is not None:
        run.device = device  # type: ignore[attr-defined]
    return run

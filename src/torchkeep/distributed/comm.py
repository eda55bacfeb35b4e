"""The few collectives the distributed checkpoint needs, carrying JSON (never pickle) between ranks.

Everything works without a process group too: then there is one rank, 0 of 1, and every
collective returns at once.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_gather_json", "barrier", "is_distributed", "rank", "world_size"]

Group = Any  # dist.ProcessGroup | None


def is_distributed() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank(group: Group = None) -> int:
    """This process's rank in ``group`` (0 without a process group)."""
    return dist.get_rank(group) if is_distributed() else 0


def world_size(group: Group = None) -> int:
    """The number of ranks in ``group`` (1 without a process group)."""
    return dist.get_world_size(group) if is_distributed() else 1


def _device(group: Group) -> torch.device:
    """Where collective buffers live: the CPU when the group has a CPU backend (gloo), else the accelerator."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def all_gather_json(obj: Any, group: Group = None) -> list[Any]:
    """Every rank's ``obj`` (JSON-serialisable), in rank order, on every rank.

    Unlike ``all_gather_object`` nothing is unpickled: the bytes are JSON in a uint8 tensor.

    Example:
        >>> all_gather_json({"a": 1})  # without a process group: this rank only
        [{'a': 1}]
    """
    if not is_distributed() or world_size(group) == 1:
        return [json.loads(json.dumps(obj))]
    device = _device(group)
    raw = json.dumps(obj, separators=(",", ":")).encode()
    n = world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(n)]
    dist.all_gather(sizes, torch.tensor([len(raw)], dtype=torch.int64, device=device), group=group)
    longest = max(int(s.item()) for s in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8, device=device)
    if raw:
        mine[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device)
    bufs = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(n)]
    dist.all_gather(bufs, mine, group=group)
    return [json.loads(bytes(b[: int(s.item())].cpu().numpy())) for b, s in zip(bufs, sizes, strict=True)]


def barrier(group: Group = None) -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_distributed() and world_size(group) > 1:
        dist.barrier(group=group)

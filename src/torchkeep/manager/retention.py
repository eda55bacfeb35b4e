"""Retention policies: pure functions from checkpoint records to the positions to keep.

A record is anything with ``step`` (int or None), ``metrics`` (a mapping) and ``created``
(Unix seconds), such as :class:`~torchkeep.manager.CheckpointInfo`. Records are passed in
save order, oldest first; a policy returns the set of positions it keeps. Nothing here
touches files: the manager deletes what no policy keeps, after the new checkpoint is committed.

Example:
    >>> from types import SimpleNamespace as R
    >>> recs = [R(step=s, metrics={"acc": a}, created=float(s)) for s, a in [(0, .5), (1, .9), (2, .7), (3, .6)]]
    >>> sorted(AnyOf(LatestN(1), BestN(1, "acc", "max")).keep(recs))
    [1, 3]
"""

from __future__ import annotations

import math
import time as _time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torchkeep.errors import InvalidArgumentError

__all__ = [
    "AnyOf",
    "BestN",
    "EveryN",
    "KeepAll",
    "LatestN",
    "Policy",
    "Record",
    "Within",
    "best_index",
    "metric_value",
    "policy_of",
]


class Record(Protocol):
    step: int | None
    metrics: Mapping[str, Any]
    created: float


class Policy(Protocol):
    def keep(self, records: Sequence[Record]) -> set[int]: ...


def metric_value(record: Record, monitor: str) -> float | None:
    """The monitored metric as a float, or ``None`` when absent, not a number, or NaN (never best)."""
    v = record.metrics.get(monitor) if record.metrics else None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return None if math.isnan(v) else v


def _ranked(records: Sequence[Record], monitor: str, mode: str) -> list[int]:
    """Positions with a usable metric, best first; ties go to the newer record."""
    if mode not in ("min", "max"):
        raise InvalidArgumentError(
            "mode", mode, "pass 'max' (a higher monitor value is better) or 'min' (lower is better, e.g. a loss)"
        )
    scored = [(v, i) for i, r in enumerate(records) if (v := metric_value(r, monitor)) is not None]
    sign = -1.0 if mode == "max" else 1.0
    scored.sort(key=lambda vi: (sign * vi[0], -vi[1]))
    return [i for _, i in scored]


def best_index(records: Sequence[Record], monitor: str, mode: str = "max") -> int | None:
    """Position of the best record by ``monitor`` (``None`` when none has a usable value).

    Example:
        >>> from types import SimpleNamespace as R
        >>> best_index([R(metrics={"loss": 2.0}), R(metrics={"loss": float("nan")}), R(metrics={"loss": 1.0})], "loss", "min")
        2
    """
    ranked = _ranked(records, monitor, mode)
    return ranked[0] if ranked else None


def ranked(records: Sequence[Record], monitor: str, mode: str = "max") -> list[int]:
    """Positions of records with a usable ``monitor`` value, best first (newer wins ties)."""
    return _ranked(records, monitor, mode)


@dataclass(frozen=True)
class KeepAll:
    """Keeps everything (the manager's policy when no ``keep_*`` option is given)."""

    def keep(self, records: Sequence[Record]) -> set[int]:
        return set(range(len(records)))


@dataclass(frozen=True)
class LatestN:
    """Keeps the ``n`` most recently saved records."""

    n: int

    def keep(self, records: Sequence[Record]) -> set[int]:
        return set(range(max(0, len(records) - self.n), len(records))) if self.n > 0 else set()


@dataclass(frozen=True)
class BestN:
    """Keeps the ``n`` best records by ``monitor`` (``mode`` ``"max"`` or ``"min"``); NaN or missing never counts."""

    n: int
    monitor: str
    mode: str = "max"

    def keep(self, records: Sequence[Record]) -> set[int]:
        return set(_ranked(records, self.monitor, self.mode)[: max(0, self.n)])


@dataclass(frozen=True)
class EveryN:
    """Keeps records whose step is a multiple of ``n`` (records without a step are not kept)."""

    n: int

    def keep(self, records: Sequence[Record]) -> set[int]:
        if self.n <= 0:
            return set()
        return {i for i, r in enumerate(records) if r.step is not None and r.step % self.n == 0}


@dataclass(frozen=True)
class Within:
    """Keeps records created at most ``seconds`` before ``now`` (Unix seconds)."""

    seconds: float
    now: float

    def keep(self, records: Sequence[Record]) -> set[int]:
        return {i for i, r in enumerate(records) if self.now - r.created <= self.seconds}


@dataclass(frozen=True)
class AnyOf:
    """Keeps a record when any of ``policies`` keeps it."""

    policies: tuple[Any, ...]

    def __init__(self, *policies: Any) -> None:
        object.__setattr__(self, "policies", tuple(policies))

    def keep(self, records: Sequence[Record]) -> set[int]:
        kept: set[int] = set()
        for p in self.policies:
            kept |= p.keep(records)
        return kept


def policy_of(
    *,
    keep_last: int | None = None,
    keep_best: int | None = None,
    monitor: str | None = None,
    mode: str = "min",
    keep_every: int | None = None,
    keep_within: float | None = None,
) -> Policy:
    """The policy of a manager's ``keep_*`` options: any rule keeps, the newest always stays, no rule
    keeps everything. Pure: ``CheckpointManager`` and ``torchkeep prune``'s read-only dry run share it.

    Example:
        >>> type(policy_of()).__name__, type(policy_of(keep_last=2)).__name__
        ('KeepAll', 'AnyOf')
    """
    rules: list[Any] = []
    if keep_last is not None:
        rules.append(LatestN(keep_last))
    if keep_best is not None and monitor:
        rules.append(BestN(keep_best, monitor, mode))
    if keep_every is not None:
        rules.append(EveryN(keep_every))
    if keep_within is not None:
        rules.append(Within(float(keep_within), _time.time()))
    if not rules:
        return KeepAll()
    return AnyOf(LatestN(1), *rules)

"""Retention policies alone: pure, table-driven, over fake records."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from torchkeep.manager.retention import AnyOf, BestN, EveryN, KeepAll, LatestN, Within, best_index

NAN = math.nan


def recs(*rows: tuple) -> list[SimpleNamespace]:
    """Records from ``(step, acc, created)`` rows, in save order."""
    return [SimpleNamespace(step=s, metrics={} if a is None else {"acc": a}, created=c) for s, a, c in rows]


R = recs((0, 0.5, 100.0), (1, 0.9, 110.0), (2, NAN, 120.0), (3, 0.7, 130.0), (4, None, 140.0), (5, 0.9, 150.0))


@pytest.mark.parametrize(
    ("policy", "kept_steps"),
    [
        (KeepAll(), {0, 1, 2, 3, 4, 5}),
        (LatestN(0), set()),
        (LatestN(2), {4, 5}),
        (LatestN(10), {0, 1, 2, 3, 4, 5}),
        (BestN(1, "acc", "max"), {5}),  # tie 0.9: the newer wins
        (BestN(2, "acc", "max"), {1, 5}),
        (BestN(2, "acc", "min"), {0, 3}),
        (BestN(10, "acc", "max"), {0, 1, 3, 5}),  # NaN and missing never kept by BestN
        (BestN(1, "loss", "min"), set()),
        (EveryN(2), {0, 2, 4}),
        (EveryN(0), set()),
        (Within(25.0, now=150.0), {3, 4, 5}),
        (Within(0.0, now=150.0), {5}),
        (AnyOf(LatestN(1), BestN(1, "acc", "min")), {0, 5}),
        (AnyOf(EveryN(3), Within(10, now=150.0)), {0, 3, 4, 5}),
        (AnyOf(), set()),
    ],
)
def test_policies(policy, kept_steps: set[int]) -> None:
    assert {R[i].step for i in policy.keep(R)} == kept_steps


@pytest.mark.parametrize(
    ("rows", "mode", "want"),
    [
        ([], "max", None),
        ([(0, NAN, 0.0)], "max", None),
        ([(0, NAN, 0.0), (1, 0.1, 1.0)], "max", 1),
        ([(0, 0.3, 0.0), (1, 0.1, 1.0), (2, NAN, 2.0)], "min", 1),
        ([(0, 0.3, 0.0), (1, math.inf, 1.0)], "max", 1),
        ([(0, True, 0.0), (1, 0.2, 1.0)], "max", 1),  # a bool is not a metric value
    ],
)
def test_best_index(rows: list[tuple], mode: str, want: int | None) -> None:
    assert best_index(recs(*rows), "acc", mode) == want


def test_bad_mode() -> None:
    with pytest.raises(ValueError, match="mode"):
        BestN(1, "acc", "up").keep(R)


def test_policies_do_not_mutate() -> None:
    before = [(r.step, dict(r.metrics), r.created) for r in R]
    AnyOf(LatestN(2), BestN(2, "acc"), EveryN(2), Within(5, 150.0)).keep(R)
    assert [(r.step, dict(r.metrics), r.created) for r in R] == before


def test_an_unknown_mode_is_a_typed_value_error() -> None:
    import torchkeep as tk

    with pytest.raises(tk.errors.InvalidArgumentError, match=r"mode='best': pass 'max'") as info:
        best_index(R, "acc", "best")
    assert isinstance(info.value, ValueError) and info.value.argument == "mode"

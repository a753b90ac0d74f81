"""The benchmark's ladder: each system climbs the offered rates until one is not
sustained, then bisection narrows down its highest sustained rate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from bench import run as bench_run
from bench.run import Level, climb


class FakeStack:
    """Sustains every rate up to each system's capacity, none above."""

    def __init__(self, capacity: dict[str, float]) -> None:
        self.capacity = capacity
        self.offered: list[tuple[str, float]] = []

    def measure(
        self, system: str, rate: float, duration: float, drive: Callable[[float, float], Level]
    ) -> Level:
        self.offered.append((system, rate))
        n = int(rate * duration)
        ok = rate <= self.capacity[system]
        return Level(system, rate, duration, n, n, 0, [0.01 if ok else 5.0] * n)


@pytest.fixture(autouse=True)
def no_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_run.time, "sleep", lambda _seconds: None)


def _climb(stack: FakeStack, refine: int) -> dict[str, list[Level]]:
    systems: dict[str, Any] = {name: None for name in stack.capacity}
    return climb(stack, systems, [25, 50, 75, 100], 15, lambda _line: None, refine=refine)  # type: ignore[arg-type]


def test_bisection_finds_the_highest_sustained_rate_between_the_steps() -> None:
    stack = FakeStack({"bare chord": 70, "saga": 40})
    levels = _climb(stack, refine=3)
    best = {name: max(lv.rate for lv in found if lv.sustained) for name, found in levels.items()}
    # The ladder alone says 50 and 25 (a ratio of 50%); three rounds: 68 and 38 (56%).
    assert best == {"bare chord": 68, "saga": 38}
    assert [lv.rate for lv in levels["saga"]] == sorted(lv.rate for lv in levels["saga"])


def test_without_refinement_only_the_ladder_is_offered() -> None:
    stack = FakeStack({"bare chord": 70, "saga": 40})
    _climb(stack, refine=0)
    assert stack.offered == [
        ("bare chord", 25),
        ("saga", 25),
        ("bare chord", 50),
        ("saga", 50),
        ("bare chord", 75),
    ]


def test_a_system_that_sustains_nothing_is_not_bisected() -> None:
    stack = FakeStack({"bare chord": 70, "saga": 10})
    levels = _climb(stack, refine=2)
    assert [lv.rate for lv in levels["saga"]] == [25]

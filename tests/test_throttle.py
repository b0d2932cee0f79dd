"""A recurring failure logs at most one line per interval, and every occurrence is
counted in the line that reports it: none is lost from the count, none floods."""

from __future__ import annotations

from amiworker.logs import Throttle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_one_line_per_interval_reports_everything_since_the_last() -> None:
    clock = Clock()
    throttle = Throttle(interval=10.0, clock=clock.monotonic)
    assert throttle.count() == 1  # the first occurrence is reported at once
    assert [throttle.count() for _ in range(5)] == [0] * 5
    clock.now += 4.0
    assert throttle.count(3) == 0
    clock.now += 6.0  # an interval after the first line
    assert throttle.count() == 9  # 5 + 3 + this one
    assert throttle.count() == 0
    clock.now += 60.0
    assert throttle.count(2) == 3


def test_the_first_occurrence_is_reported_whatever_the_clock() -> None:
    clock = Clock()
    clock.now = 0.5  # a monotonic clock that started a moment ago (a fresh boot)
    assert Throttle(interval=10.0, clock=clock.monotonic).count(4) == 4


def test_what_was_counted_after_the_last_line_is_due_an_interval_after_it() -> None:
    """For the line that says a failure stopped between two lines: it comes no more
    often than they do, and only if there is something to say."""
    clock = Clock()
    throttle = Throttle(interval=10.0, clock=clock.monotonic)
    assert throttle.overdue() == 0  # nothing counted
    assert throttle.count() == 1
    assert throttle.count(2) == 0
    clock.now += 9.0
    assert throttle.overdue() == 0  # within the interval
    clock.now += 1.0
    assert throttle.overdue() == 2
    assert throttle.overdue() == 0
    clock.now += 60.0
    assert throttle.overdue() == 0  # nothing since
    assert throttle.count() == 1  # a new failure is said at once, as the first was

"""Wall time for timestamps, trio's clock for durations, behind one small Protocol."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol

import trio


class Clock(Protocol):
    def now(self) -> datetime:
        """Aware UTC wall time, for `created_at`."""
        ...

    def monotonic(self) -> float:
        """Seconds for durations and rates; must only be called inside trio.run."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        # trio's clock, so that tests on a virtual clock see virtual durations.
        return trio.current_time()


class FixedClock:
    """A clock whose wall time stands still (tests, reproducible catalogs)."""

    def __init__(self, when: datetime) -> None:
        self.when = when

    def now(self) -> datetime:
        return self.when

    def monotonic(self) -> float:
        return trio.current_time()

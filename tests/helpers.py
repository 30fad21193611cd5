"""Shared builders for the headless tests: records, a movable clock, fake collectors, and
independent SQL that the store's rollup-backed queries are checked against."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from collectors.base import PollContext, SourceError
from store.db import Store
from store.queries import Totals
from store.records import NANO_PER_USD, Batch, UsageBucket, nano_to_usd, to_epoch

T0 = datetime(2025, 3, 15, 12, 0, tzinfo=UTC)
"""A fixed, hour-aligned UTC instant that tests build their data around."""


def nano(usd: str | int | Decimal) -> int:
    """Exact USD to integer nano-dollars (test data is always a whole number of nanos)."""
    value = Decimal(usd) * NANO_PER_USD
    assert value == value.to_integral_value(), value
    return int(value)


def at(minutes: float = 0, base: datetime = T0) -> datetime:
    """``base`` plus some minutes."""
    return base + timedelta(minutes=minutes)


def bucket(
    start: datetime,
    *,
    source: str = "src",
    provider: str = "openai",
    model: str = "gpt-4o",
    cost: str | int | Decimal | None = 0,
    requests: int = 1,
    priced: bool | None = None,
    width_s: int = 60,
    **kwargs: Any,
) -> UsageBucket:
    """A usage bucket with a cost already set (``cost=None`` makes it unpriced)."""
    is_priced = cost is not None if priced is None else priced
    return UsageBucket(
        source=source,
        provider=provider,
        model=model,
        start=start,
        width_s=width_s,
        requests=requests,
        cost_nano=0 if cost is None else nano(cost),
        priced=is_priced,
        price_ref=f"test {provider}/{model}" if is_priced else f"unpriced {provider}/{model}",
        **kwargs,
    )


def fine_totals(store: Store, start: datetime, end: datetime) -> Totals:
    """Totals of ``[start, end)`` summed straight from the fine ``usage`` table (no rollup)."""
    row = store.query(
        "SELECT SUM(cost_nano), SUM(requests),"
        " SUM(input_uncached + cache_read + cache_write_5m + cache_write_1h),"
        " SUM(cache_read), SUM(cache_write_5m + cache_write_1h), SUM(output),"
        " SUM(CASE WHEN priced THEN 0 ELSE input_uncached + cache_read + cache_write_5m"
        "   + cache_write_1h + output END),"
        " SUM(CASE WHEN priced THEN 0 ELSE requests END)"
        " FROM usage WHERE start >= ? AND start < ?",
        (to_epoch(start), to_epoch(end)),
    )[0]
    values = [v or 0 for v in row]
    return Totals(nano_to_usd(values[0]), *values[1:])


USAGE_HOUR_COLUMNS = (
    "start, source, provider, model, project, api_key, workspace, tag, service_tier, batch,"
    " context_window, priced, input_uncached, cache_read, cache_write_5m, cache_write_1h,"
    " output, requests, web_searches, cost_nano"
)


def usage_hour_rows(store: Store) -> list[tuple[Any, ...]]:
    """The ``usage_hour`` table as sorted tuples."""
    return sorted(tuple(r) for r in store.query(f"SELECT {USAGE_HOUR_COLUMNS} FROM usage_hour"))


def usage_hour_expected(store: Store) -> list[tuple[Any, ...]]:
    """What ``usage_hour`` must hold, recomputed from the fine table."""
    keys = (
        "source, provider, model, project, api_key, workspace, tag, service_tier, batch,"
        " context_window, priced"
    )
    sums = ", ".join(
        f"SUM({c})"
        for c in (
            "input_uncached",
            "cache_read",
            "cache_write_5m",
            "cache_write_1h",
            "output",
            "requests",
            "web_searches",
            "cost_nano",
        )
    )
    rows = store.query(
        f"SELECT (start / 3600) * 3600 AS h, {keys}, {sums} FROM usage GROUP BY h, {keys}"
    )
    return sorted(tuple(r) for r in rows)


class Clock:
    """A clock a test can freeze and move."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        """Move forward and return the new time."""
        self.now += timedelta(seconds=seconds)
        return self.now


PollFn = Callable[[PollContext], Awaitable[Batch]]


@dataclass
class FakeCollector:
    """A plain class implementing the collector protocol; its poll is a replaceable function.

    ``outcomes`` is consumed one per poll: a :class:`Batch` is returned, an exception raised;
    once empty, ``default`` (an empty batch unless set) is returned.
    """

    name: str = "fake"
    kind: str = "fake"
    interval_s: float = 60.0
    calls: int = 0
    calls_per_poll: int = 1
    outcomes: list[Any] = field(default_factory=list)
    """Batches to return and exceptions to raise, one per poll."""
    default: Batch | None = None
    contexts: list[PollContext] = field(default_factory=list)
    closed: int = 0
    polls: int = 0
    active: int = 0
    max_active: int = 0
    delay_s: float = 0.0
    on_poll: Callable[[FakeCollector], None] | None = None

    async def poll(self, ctx: PollContext) -> Batch:
        self.contexts.append(ctx)
        self.polls += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            self.calls += self.calls_per_poll
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if self.on_poll is not None:
                self.on_poll(self)
            if self.outcomes:
                outcome = self.outcomes.pop(0)
                if isinstance(outcome, BaseException):
                    raise outcome
                assert isinstance(outcome, Batch)
                return outcome
            return self.default if self.default is not None else Batch()
        finally:
            self.active -= 1

    async def aclose(self) -> None:
        self.closed += 1


def auth_error() -> SourceError:
    """A refused key, as a collector reports it."""
    return SourceError("HTTP 401: invalid admin key", auth=True)

"""Shared builders for the headless tests: records, a movable clock, fake collectors, and
independent SQL that the store's rollup-backed queries are checked against."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from tokentop.collectors.base import PollContext, SourceError
from tokentop.store.db import Store
from tokentop.store.queries import Totals
from tokentop.store.records import NANO_PER_USD, Batch, UsageBucket, nano_to_usd, to_epoch

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


USAGE_FLAT = (
    "(SELECT u.start AS start, u.width AS width, s.source AS source, s.provider AS provider,"
    " s.model AS model, s.project AS project, s.api_key AS api_key, s.workspace AS workspace,"
    " s.tag AS tag, s.service_tier AS service_tier, s.batch AS batch,"
    " s.context_window AS context_window, u.input_uncached AS input_uncached,"
    " u.cache_read AS cache_read, u.cache_write_5m AS cache_write_5m,"
    " u.cache_write_1h AS cache_write_1h, u.output AS output, u.requests AS requests,"
    " u.web_searches AS web_searches, u.cost_nano AS cost_nano, u.priced AS priced,"
    " p.ref AS price_ref FROM usage AS u JOIN series AS s ON s.id = u.series_id"
    " JOIN price AS p ON p.id = u.price_id)"
)
"""The fine ``usage`` rows with their series' columns, as one table (the version 1 layout)."""

USAGE_HOUR_COLUMNS = (
    "start, source, provider, model, project, api_key, workspace, tag, service_tier, batch,"
    " context_window, priced, input_uncached, cache_read, cache_write_5m, cache_write_1h,"
    " output, requests, web_searches, cost_nano"
)
_SUMS = (
    "input_uncached",
    "cache_read",
    "cache_write_5m",
    "cache_write_1h",
    "output",
    "requests",
    "web_searches",
    "cost_nano",
)


def _rollup_rows(store: Store, table: str) -> list[tuple[Any, ...]]:
    flat = (
        "(SELECT r.start AS start, s.source AS source, s.provider AS provider, s.model AS model,"
        " s.project AS project, s.api_key AS api_key, s.workspace AS workspace, s.tag AS tag,"
        " s.service_tier AS service_tier, s.batch AS batch, s.context_window AS context_window,"
        f" r.priced AS priced, {', '.join(f'r.{c} AS {c}' for c in _SUMS)}"
        f" FROM {table} AS r JOIN series AS s ON s.id = r.series_id)"
    )
    return sorted(tuple(r) for r in store.query(f"SELECT {USAGE_HOUR_COLUMNS} FROM {flat}"))


def _rollup_expected(store: Store, period: int) -> list[tuple[Any, ...]]:
    keys = (
        "source, provider, model, project, api_key, workspace, tag, service_tier, batch,"
        " context_window, priced"
    )
    sums = ", ".join(f"SUM({c})" for c in _SUMS)
    rows = store.query(
        f"SELECT (start / {period}) * {period} AS p, {keys}, {sums} FROM {USAGE_FLAT}"
        f" GROUP BY p, {keys}"
    )
    return sorted(tuple(r) for r in rows)


def usage_hour_rows(store: Store) -> list[tuple[Any, ...]]:
    """The ``usage_hour`` table as sorted tuples (series columns in place of ``series_id``)."""
    return _rollup_rows(store, "usage_hour")


def usage_hour_expected(store: Store) -> list[tuple[Any, ...]]:
    """What ``usage_hour`` must hold, recomputed from the fine table."""
    return _rollup_expected(store, 3600)


def usage_day_rows(store: Store) -> list[tuple[Any, ...]]:
    """The ``usage_day`` table as sorted tuples (series columns in place of ``series_id``)."""
    return _rollup_rows(store, "usage_day")


def usage_day_expected(store: Store) -> list[tuple[Any, ...]]:
    """What ``usage_day`` must hold (UTC days), recomputed from the fine table."""
    return _rollup_expected(store, 86400)


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

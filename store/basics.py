"""The store's units and names, without its record types: money and time conversions, and the
dimensions a view groups by.

:mod:`tokentop.store.records` re-exports all of it. It lives apart so that what only needs these
(``tokentop status``, argument parsing) does not pay for building the record classes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal

NANO_PER_USD = 1_000_000_000

GROUPS: tuple[str, ...] = ("model", "project", "api_key", "tag")
"""Dimensions the Cost per query pane, ``report`` and ``export`` can group by."""


def usd_to_nano(value: Decimal) -> int:
    """Exact USD (Decimal) to integer nano-dollars, rounding half to even."""
    return int((value * NANO_PER_USD).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def nano_to_usd(value: int) -> Decimal:
    """Integer nano-dollars to exact USD."""
    return Decimal(value) / NANO_PER_USD


def to_epoch(when: datetime) -> int:
    """UTC-aware datetime to integer Unix seconds; naive datetimes are refused."""
    if when.tzinfo is None:
        raise ValueError(f"naive datetime {when!r}: tokentop keeps time in UTC")
    return int(when.timestamp())


def from_epoch(seconds: float) -> datetime:
    """Unix seconds to a UTC-aware datetime."""
    return datetime.fromtimestamp(seconds, tz=UTC)

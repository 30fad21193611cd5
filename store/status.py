"""The figures of ``tokentop status``, read with the standard library alone.

A status bar runs this every few seconds, so it must answer fast: this module opens the file
read-only with :mod:`sqlite3` and sums the same tables :mod:`tokentop.store.queries` does (whole
hours and days from the rollups, the current hour from the fine table), without importing the
store's writer (sqlite-utils) or anything else.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path

from tokentop.store.basics import from_epoch, nano_to_usd, to_epoch
from tokentop.store.readonly import connect_readonly

HOUR = 3600
DAY = 86400


@dataclass(frozen=True, slots=True)
class StatusFigures:
    """What the status line shows."""

    now: datetime
    today: Decimal
    month: Decimal
    burn_15m: Decimal
    """$/h over the last 15 minutes."""
    burn_60m: Decimal
    """$/h over the last hour."""
    latest_poll: datetime | None
    """The newest successful poll of any source."""
    firing: tuple[tuple[str, str], ...] = ()
    """(rule, severity) of the alerts firing, as the collector last evaluated them."""
    unpriced_tokens_today: int = 0

    def age_s(self) -> float | None:
        """Seconds since the newest successful poll."""
        return None if self.latest_poll is None else (self.now - self.latest_poll).total_seconds()


def _sum(conn: sqlite3.Connection, sql: str, params: tuple[int, ...]) -> int:
    row = conn.execute(sql, params).fetchone()
    return int(row[0] or 0) if row else 0


def split_window(lo: int, hi: int) -> list[tuple[str, int, int]]:
    """``[lo, hi)`` (Unix seconds) as (table, lo, hi) pieces: ``usage_day`` for whole UTC days,
    ``usage_hour`` for whole hours, ``usage`` (one-minute buckets) for the ragged edges.

    The rollups are kept in step with every write, the open hour and day included, so the pieces
    sum to what the fine table alone would give.
    """
    h1, h2 = -(-lo // HOUR) * HOUR, hi // HOUR * HOUR
    if h2 <= h1:
        return [("usage", lo, hi)]
    d1, d2 = -(-h1 // DAY) * DAY, h2 // DAY * DAY
    middle = [("usage_hour", h1, h2)]
    if d2 - d1 >= DAY:
        middle = [("usage_hour", h1, d1), ("usage_day", d1, d2), ("usage_hour", d2, h2)]
    pieces = [("usage", lo, h1), *middle, ("usage", h2, hi)]
    return [p for p in pieces if p[1] < p[2]]


def _cost(conn: sqlite3.Connection, lo: int, hi: int) -> int:
    """Nano-dollars of usage starting in ``[lo, hi)``."""
    total = 0
    for table, a, b in split_window(lo, hi):
        total += _sum(
            conn, f"SELECT SUM(cost_nano) FROM {table} WHERE start >= ? AND start < ?", (a, b)
        )
    return total


def read_status(path: Path, now: datetime) -> StatusFigures:
    """Today's and this month's spend (UTC), the burn, freshness and firing alerts.

    Raises:
        sqlite3.Error: the file is not a tokentop database (or cannot be read).
    """
    conn = connect_readonly(path, timeout=5)
    try:
        t = to_epoch(now)
        end = t + 1
        day = t // DAY * DAY
        start_of_month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        month = to_epoch(start_of_month)
        today = _cost(conn, day, end)
        month_cost = _cost(conn, month, end)
        burn15 = _cost(conn, t - 900, end)
        burn60 = _cost(conn, t - HOUR, end)
        unpriced = _sum(
            conn,
            "SELECT SUM(input_uncached + cache_read + cache_write_5m + cache_write_1h + output)"
            " FROM usage_hour WHERE start >= ? AND start < ? AND priced = 0",
            (day, end),
        )
        row = conn.execute("SELECT MAX(last_success) FROM source").fetchone()
        latest = from_epoch(row[0]) if row and row[0] is not None else None
        firing: tuple[tuple[str, str], ...] = ()
        has_alerts = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alert_state'"
        ).fetchone()
        if has_alerts:
            firing = tuple(
                (r[0], r[1])
                for r in conn.execute(
                    "SELECT rule, severity FROM alert_state WHERE state = 'firing'"
                    " ORDER BY severity = 'critical' DESC, fired_at, rule"
                )
            )
    finally:
        conn.close()
    return StatusFigures(
        now=now,
        today=nano_to_usd(today),
        month=nano_to_usd(month_cost),
        burn_15m=nano_to_usd(burn15) * 4,
        burn_60m=nano_to_usd(burn60),
        latest_poll=latest,
        firing=firing,
        unpriced_tokens_today=unpriced,
    )

"""The figures alert rules, ``tokentop check`` and ``tokentop status`` are evaluated on.

Usage figures are summed from the daily and hourly rollups for whole days and hours and from the
fine table for the ragged edges (:func:`tokentop.store.status.split_window`), narrowed by a
*scope*: a mapping of usage columns (``provider``, ``model``, ``project``, ``api_key``, ``tag``)
to a substring each must contain, applied to the small ``series`` table. Windows are half-open,
``[start, end)``, on bucket start times, as everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from tokentop.store.db import DAY, HOUR, Store
from tokentop.store.records import from_epoch, nano_to_usd, to_epoch
from tokentop.store.status import split_window

SCOPE_COLUMNS = ("provider", "model", "project", "api_key", "tag")
"""Usage columns a scope can narrow."""


def _scope_sql(scope: Mapping[str, str], prefix: str = "") -> tuple[str, list[Any]]:
    """`` WHERE`` clause (empty for no scope) over the ``series`` table (``prefix="s."`` when it
    is aliased ``s``): every scoped column contains its text (``instr``: exact, no wildcards)."""
    unknown = set(scope) - set(SCOPE_COLUMNS)
    if unknown:
        raise ValueError(f"cannot scope usage by {sorted(unknown)}")
    clauses = [f"instr({prefix}{c}, ?) > 0" for c in SCOPE_COLUMNS if scope.get(c)]
    params: list[Any] = [scope[c] for c in SCOPE_COLUMNS if scope.get(c)]
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _series_filter(scope: Mapping[str, str]) -> tuple[str, list[Any]]:
    """`` AND series_id IN (...)`` for a usage table, or nothing without a scope. The series
    table is small and the subquery is run once per statement, not per row."""
    where, params = _scope_sql(scope)
    if not where:
        return "", []
    return f" AND series_id IN (SELECT id FROM series{where})", params


@dataclass(frozen=True, slots=True)
class Spend:
    """Cost and requests of a window."""

    cost: Decimal = Decimal(0)
    """Cost of the priced usage."""
    requests: int = 0
    priced_requests: int = 0
    unpriced_tokens: int = 0

    @property
    def cost_per_request(self) -> Decimal | None:
        """Cost over priced requests; ``None`` without any."""
        return self.cost / self.priced_requests if self.priced_requests else None


_SPEND = (
    "SUM(cost_nano), SUM(requests), SUM(CASE WHEN priced = 0 THEN 0 ELSE requests END),"
    " SUM(CASE WHEN priced = 0 THEN input_uncached + cache_read + cache_write_5m"
    " + cache_write_1h + output ELSE 0 END)"
)


def _pieces(
    start: datetime, end: datetime, scope: Mapping[str, str], select: str, group: str = ""
) -> tuple[str, list[Any]]:
    """One ``UNION ALL`` of ``select`` over the rollups and the fine table for the window.

    No join with ``series``: sums need only ``series_id`` (grouped by it where asked), so a
    window reads its rows once, through the tables' ``start``-first keys.
    """
    filt, fparams = _series_filter(scope)
    pieces: list[str] = []
    params: list[Any] = []
    for table, lo, hi in split_window(to_epoch(start), to_epoch(end)):
        pieces.append(f"SELECT {select} FROM {table} WHERE start >= ? AND start < ?{filt}{group}")
        params += [lo, hi, *fparams]
    return " UNION ALL ".join(pieces), params


def _add(rows: list[Any], offset: int = 0) -> Spend:
    sums = [sum(r[offset + i] or 0 for r in rows) for i in range(4)]
    return Spend(nano_to_usd(sums[0]), sums[1], sums[2], sums[3])


def spend(store: Store, start: datetime, end: datetime, scope: Mapping[str, str]) -> Spend:
    """Cost and requests in ``[start, end)`` within ``scope``."""
    sql, params = _pieces(start, end, scope, _SPEND)
    return _add(store.query(sql, params))


def _series_values(store: Store, column: str) -> dict[int, tuple[str, ...]]:
    rows = store.query(f"SELECT id, {column} FROM series")
    return {r[0]: tuple(r[1:]) for r in rows}


def spend_by(
    store: Store, start: datetime, end: datetime, group: str, scope: Mapping[str, str]
) -> dict[str, Spend]:
    """:func:`spend` per value of ``group`` (``model``, ``project``, ``api_key`` or ``tag``)."""
    if group not in ("model", "project", "api_key", "tag"):
        raise ValueError(f"cannot group by {group!r}")
    sql, params = _pieces(start, end, scope, f"series_id, {_SPEND}", " GROUP BY series_id")
    names = _series_values(store, group)
    by: dict[str, list[Any]] = {}
    for r in store.query(sql, params):
        by.setdefault(names.get(r[0], ("",))[0], []).append(r)
    return {k: _add(rows, 1) for k, rows in by.items()}


def unpriced_tokens(
    store: Store, start: datetime, end: datetime, scope: Mapping[str, str]
) -> dict[tuple[str, str], int]:
    """Tokens of unpriced models in the window, by (provider, model)."""
    tokens = "SUM(input_uncached + cache_read + cache_write_5m + cache_write_1h + output)"
    sql, params = _pieces(
        start, end, scope, f"series_id, {tokens}", " AND priced = 0 GROUP BY series_id"
    )
    names = _series_values(store, "provider, model")
    out: dict[tuple[str, str], int] = {}
    for r in store.query(sql, params):
        provider, model = names.get(r[0], ("", ""))
        out[(provider, model)] = out.get((provider, model), 0) + (r[1] or 0)
    return {k: v for k, v in out.items() if v}


def oldest_usage(store: Store) -> datetime | None:
    """Start of the oldest usage bucket stored (one seek: ``usage``'s key starts with it)."""
    rows = store.query("SELECT start FROM usage ORDER BY start LIMIT 1")
    return from_epoch(rows[0][0]) if rows else None


def first_seen(
    store: Store, dimension: str, since: datetime, scope: Mapping[str, str]
) -> dict[str, datetime]:
    """Values of ``dimension`` (``model``, ``api_key``, ``project``) whose first usage in the
    database is at or after ``since``, with that first time.

    The daily rollup gives every series' first day; only the series first seen on or after the
    day of ``since`` are looked up in the hourly rollup and then in the fine table, so the cost
    stays a few hundred rows whatever the history.
    """
    if dimension not in ("model", "api_key", "project"):
        raise ValueError(f"cannot watch {dimension!r} for first use")
    where, wparams = _scope_sql(scope, "s.")
    where = where.replace(" WHERE ", " AND ", 1)
    day = to_epoch(since) // DAY * DAY
    # Series (of the scope) by their dimension's value, with each value's first day.
    rows = store.query(
        f"SELECT s.{dimension}, MIN(d.first) FROM (SELECT series_id, MIN(start) AS first"
        " FROM usage_day GROUP BY series_id) AS d JOIN series AS s ON s.id = d.series_id"
        f" WHERE 1{where} GROUP BY s.{dimension}",
        wparams,
    )
    candidates = [r[0] for r in rows if r[1] is not None and r[1] >= day]
    found: dict[str, datetime] = {}
    for value in candidates:
        ids = [
            r[0]
            for r in store.query(
                f"SELECT id FROM series AS s WHERE s.{dimension} = ?{where}",
                [value, *wparams],
            )
        ]
        marks = ",".join("?" * len(ids))
        hour = store.query(
            f"SELECT MIN(start) FROM usage_hour WHERE start >= ? AND series_id IN ({marks})",
            [day, *ids],
        )[0][0]
        if hour is None:
            continue
        first = store.query(
            f"SELECT MIN(start) FROM usage WHERE start >= ? AND start < ?"
            f" AND series_id IN ({marks})",
            [hour, hour + HOUR, *ids],
        )[0][0]
        when = from_epoch(first if first is not None else hour)
        if when >= since:
            found[str(value)] = when
    return found


def gpu_idle_cost(store: Store, start: datetime, end: datetime) -> Decimal:
    """Cost of idle GPU time in ``[start, end)`` (samples by their time)."""
    lo, hi = to_epoch(start), to_epoch(end)
    h1, h2 = -(-lo // HOUR) * HOUR, hi // HOUR * HOUR
    if h2 - h1 >= 3 * HOUR:
        rows = store.query(
            "SELECT (SELECT SUM(idle_cost_nano) FROM gpu WHERE (ts >= ? AND ts < ?)"
            " OR (ts >= ? AND ts < ?)),"
            " (SELECT SUM(idle_cost_nano) FROM gpu_hour WHERE start >= ? AND start < ?)",
            (lo * 1000, h1 * 1000, h2 * 1000, hi * 1000, h1, h2),
        )
        total = (rows[0][0] or 0) + (rows[0][1] or 0)
    else:
        rows = store.query(
            "SELECT SUM(idle_cost_nano) FROM gpu WHERE ts >= ? AND ts < ?",
            (lo * 1000, hi * 1000),
        )
        total = rows[0][0] or 0
    return nano_to_usd(total)


def has_gpu_data(store: Store, since: datetime) -> bool:
    """Whether any GPU sample is newer than ``since``."""
    return bool(store.query("SELECT 1 FROM gpu WHERE ts >= ? LIMIT 1", (to_epoch(since) * 1000,)))


def latest_poll(store: Store) -> datetime | None:
    """The newest successful poll of any source (what "the database is fresh" is measured by)."""
    rows = store.query("SELECT MAX(last_success) FROM source")
    return from_epoch(rows[0][0]) if rows and rows[0][0] is not None else None


def period_start(now: datetime, period: str) -> tuple[datetime, datetime]:
    """The UTC ``day`` or ``month`` around ``now``: (start, end)."""
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day, day + timedelta(days=1)
    month = day.replace(day=1)
    return month, (month + timedelta(days=32)).replace(day=1)

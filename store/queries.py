"""The queries the panes, ``report`` and ``export`` need. Panes never write SQL themselves.

Every window is half-open, ``[start, end)``, on bucket start times. Windows of three hours or more
are summed from the rollups for their whole UTC days and whole hours and from the fine tables for
the ragged edges, so a 30-day query reads about a thousand rows, not millions, and gives the same
answer.

Without a filter, figures summed over series read rollups already summed over them: totals, burn
rates and the spend chart the per-origin tables (``usage_total*``: a few rows a minute, however
many series), the model tables (``usage_model_*``) and the group tables (``usage_group_*``) their
whole hours and days, so a refresh costs about the same at 40 series as at 4,000. A filter picks
series, so filtered figures read the per-series tables. Behind the retention horizon one-minute
buckets have been folded into hours (and hours into days): a window reaching there is exact to
the hour (or day) at its start, and :func:`resolution` says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from tokentop.store.db import (
    DAY,
    HOUR,
    HOURS_BEFORE,
    MINUTES_BEFORE,
    SERIES_COLUMNS,
    SUMMED,
    USAGE_SUMS,
    Store,
)
from tokentop.store.filters import filter_sql
from tokentop.store.records import GROUPS as records_groups
from tokentop.store.records import (
    SourceHealth,
    from_epoch,
    nano_to_usd,
    to_epoch,
)

_USAGE_COLUMNS = ", ".join(
    [
        "u.start AS start",
        *(f"s.{c} AS {c}" for c in SERIES_COLUMNS),
        "u.priced AS priced",
        *(f"u.{c} AS {c}" for c in USAGE_SUMS),
    ]
)
"""What :func:`usage_rows` exposes: a usage row with its series' columns."""
_USAGE_TABLES = {"fine": "usage", "hour": "usage_hour", "day": "usage_day"}
GROUPS = records_groups  # re-exported: panes and the CLI name them from here


def _parts(
    lo: int, hi: int, rollup: bool = True, days: bool = True, min_hours: int = 3
) -> list[tuple[str, int, int]]:
    """Split ``[lo, hi)`` seconds into (level, lo, hi) pieces; level ``fine``, ``hour`` or ``day``.

    ``rollup=False`` keeps to the fine table; ``days=False`` to the fine and hourly tables.
    Rollups serve windows that hold at least ``min_hours`` whole hours.
    """
    h1 = -(-lo // HOUR) * HOUR
    h2 = hi // HOUR * HOUR
    if not rollup or h2 - h1 < min_hours * HOUR:
        return [("fine", lo, hi)]
    d1 = -(-h1 // DAY) * DAY
    d2 = h2 // DAY * DAY
    middle = [("hour", h1, h2)]
    if days and d2 - d1 >= DAY:
        middle = [("hour", h1, d1), ("day", d1, d2), ("hour", d2, h2)]
    parts = [("fine", lo, h1), *middle, ("fine", h2, hi)]
    return [p for p in parts if p[1] < p[2]]


def _filter_sql(text: str, columns: tuple[str, ...]) -> tuple[str, list[Any]]:
    # Substrings and ``model:x`` terms, shared with the requests table (store.filters).
    return filter_sql(text, columns)


METER_KIND = "meter"
"""The health ``kind`` of the per-request meter's writers (proxy, httpx meter, pytest plugin)."""
# The meter's records carry their exchange's source ("meter" unless a writer names another),
# while its health row is named for the writer ("proxy", "pytest"): both are meter sources.
_METER_SOURCES = f"SELECT name FROM source WHERE kind = '{METER_KIND}' UNION SELECT '{METER_KIND}'"
_COVERED_PROVIDERS = f"SELECT DISTINCT provider FROM origin WHERE source NOT IN ({_METER_SOURCES})"
_SCOPES = {
    # A dollar is counted once: the admin APIs (and the demo, which stands in for them) report
    # the whole organisation, so the meter's records of a provider they cover are already in
    # their totals. Metered usage counts only for providers that no other source covers.
    "counted": f"(source NOT IN ({_METER_SOURCES}) OR provider NOT IN ({_COVERED_PROVIDERS}))",
    # The metered part of the counted totals ("of which metered"), attributed by tag or test.
    "metered": f"(source IN ({_METER_SOURCES}) AND provider IN ({_COVERED_PROVIDERS}))",
    "all": "1",
}
SCOPES = tuple(_SCOPES)
"""``counted`` (the default: each dollar once), ``metered`` (the meter's overlap with the admin
sources) or ``all`` (every source's rows, overlaps added: for audits only)."""


def usage_rows(
    start: datetime,
    end: datetime,
    text: str = "",
    rollup: bool = True,
    days: bool = True,
    scope: str = "counted",
) -> tuple[str, list[Any]]:
    """A subquery of usage rows in the window (fine and rolled-up parts), and its parameters.

    Its columns: ``start``, ``source``, ``provider``, ``model``, every usage dimension,
    ``priced`` and the sums. ``rollup=False`` reads only the fine table, for groupings finer than
    an hour; ``days=False`` no daily rows, for groupings finer than a UTC day. ``scope`` says
    which sources' rows: see :data:`SCOPES`.
    """
    where, fparams = _filter_sql(text, ("provider", "model", "project", "tag", "api_key"))
    # Filter the (small) series table once, not every usage row.
    where = f" AND u.series_id IN (SELECT id FROM series WHERE {_SCOPES[scope]}{where})"
    pieces: list[str] = []
    params: list[Any] = []
    for level, lo, hi in _parts(to_epoch(start), to_epoch(end), rollup, days):
        # LEFT JOIN: usage stays the outer loop (its key starts with ``start``).
        pieces.append(
            f"SELECT {_USAGE_COLUMNS} FROM {_USAGE_TABLES[level]} AS u"
            " LEFT JOIN series AS s ON s.id = u.series_id"
            f" WHERE u.start >= ? AND u.start < ?{where}"
        )
        params += [lo, hi, *fparams]
    return " UNION ALL ".join(pieces), params


_TOKENS = "input_uncached + cache_read + cache_write_5m + cache_write_1h + output"
_PER_SERIES_SUMMED = ", ".join(
    [
        *(f"SUM(u.{c}) AS {c}" for c in USAGE_SUMS),
        f"SUM(CASE WHEN u.priced THEN 0 ELSE u.{_TOKENS.replace(' + ', ' + u.')} END)"
        " AS unpriced_tokens",
        "SUM(CASE WHEN u.priced THEN 0 ELSE u.requests END) AS unpriced_requests",
    ]
)
"""Buckets summed as the rollups summed over series have them (:data:`SUMMED`)."""


def _per_series(key: str, origins: str) -> str:
    """The buckets of ``[?, ?)`` summed per series (``g``, sorted once: cheaper than joining
    every bucket to its series), then joined to it for ``key`` (``s.model``, ``s.project``)."""
    sums = ", ".join(f"g.{c}" for c in SUMMED)
    return (
        f"SELECT {key}, {sums} FROM (SELECT u.series_id AS series_id, {_PER_SERIES_SUMMED}"
        f" FROM usage AS u WHERE u.start >= ? AND u.start < ? AND u.origin_id IN ({origins})"
        " GROUP BY u.series_id) AS g JOIN series AS s ON s.id = g.series_id"
    )


_SUMMED = ", ".join(f"x.{c} AS {c}" for c in SUMMED)


def _origins(scope: str) -> str:
    return f"SELECT id FROM origin WHERE {_SCOPES[scope]}"


def total_rows(
    start: datetime,
    end: datetime,
    scope: str = "counted",
    rollup: bool = True,
    days: bool = True,
) -> tuple[str, list[Any]]:
    """A subquery of usage summed over series per origin (a source at a provider) in the
    window, and its parameters: columns ``start``, ``origin_id`` and :data:`SUMMED`.

    It reads as many rows at 40 series as at 4,000 (per start, hour or UTC day, a few per
    origin); ``rollup`` and ``days`` as :func:`usage_rows`.
    """
    tables = {"fine": "usage_total", "hour": "usage_total_hour", "day": "usage_total_day"}
    pieces: list[str] = []
    params: list[Any] = []
    for level, lo, hi in _parts(to_epoch(start), to_epoch(end), rollup, days, min_hours=1):
        pieces.append(
            f"SELECT x.start AS start, x.origin_id AS origin_id, {_SUMMED}"
            f" FROM {tables[level]} AS x"
            f" WHERE x.start >= ? AND x.start < ? AND x.origin_id IN ({_origins(scope)})"
        )
        params += [lo, hi]
    return " UNION ALL ".join(pieces), params


def _by_model_rows(start: datetime, end: datetime, scope: str) -> tuple[str, list[Any]]:
    """A subquery of usage by model (columns ``stream_id`` and :data:`SUMMED`): whole hours and
    days from the model rollups, the ragged edges (and windows without a whole hour) from the
    buckets."""
    pieces: list[str] = []
    params: list[Any] = []
    origins = _origins(scope)
    for level, lo, hi in _parts(to_epoch(start), to_epoch(end), min_hours=1):
        if level == "fine":
            pieces.append(_per_series("s.stream_id AS stream_id", origins))
        else:
            pieces.append(
                f"SELECT x.stream_id AS stream_id, {_SUMMED} FROM usage_model_{level} AS x"
                f" WHERE x.start >= ? AND x.start < ?"
                f" AND x.stream_id IN (SELECT id FROM stream WHERE origin_id IN ({origins}))"
            )
        params += [lo, hi]
    return " UNION ALL ".join(pieces), params


_BY_MODEL = (
    "SELECT o.provider, t.model, {sums} FROM ({sub}) AS g JOIN stream AS t ON t.id = g.stream_id"
    " JOIN origin AS o ON o.id = t.origin_id GROUP BY o.provider, t.model"
)
"""Sums by (provider, model) of :func:`_by_model_rows` (``{sums}`` over its columns)."""


def _by_group_rows(group: str, start: datetime, end: datetime, scope: str) -> tuple[str, list[Any]]:
    """A subquery of usage by one of :data:`GROUP_DIMENSIONS` (columns ``value`` and
    :data:`SUMMED`), as :func:`_by_model_rows` from the group rollups."""
    pieces: list[str] = []
    params: list[Any] = []
    origins = _origins(scope)
    for level, lo, hi in _parts(to_epoch(start), to_epoch(end), min_hours=1):
        if level == "fine":
            pieces.append(_per_series(f"s.{group} AS value", origins))
            params += [lo, hi]
        else:
            pieces.append(
                f"SELECT x.value AS value, {_SUMMED} FROM usage_group_{level} AS x"
                f" WHERE x.dim = ? AND x.start >= ? AND x.start < ? AND x.origin_id IN ({origins})"
            )
            params += [group, lo, hi]
    return " UNION ALL ".join(pieces), params


@dataclass(frozen=True, slots=True)
class Resolution:
    """The finest data behind a window: one-minute buckets, or, where retention has folded
    them, hours (then UTC days)."""

    step: str = "1m"
    """``1m``, ``1h`` or ``1d``: what the window's start is exact to."""
    minutes_since: datetime | None = None
    """Where one-minute data begins (``None``: nothing folded yet)."""
    hours_since: datetime | None = None
    """Where hourly data begins (``None``: no hour folded into a day yet)."""

    @property
    def note(self) -> str:
        """One line for a pane or a report; ``""`` at full resolution."""
        if self.step == "1m":
            return ""
        since = self.minutes_since if self.step == "1h" else self.hours_since
        unit = "hourly" if self.step == "1h" else "daily"
        when = f"{since:%Y-%m-%d %H:%M} UTC" if since is not None else "the horizon"
        return f"{unit} data before {when}: the window's start is exact to the {self.step[1:]}"


def resolution(store: Store, start: datetime) -> Resolution:
    """The resolution of the data behind a window starting at ``start`` (see
    :mod:`tokentop.store.retention`)."""
    found = {
        r[0]: int(r[1])
        for r in store.query(
            "SELECT key, value FROM meta WHERE key IN (?, ?)", (MINUTES_BEFORE, HOURS_BEFORE)
        )
    }
    minutes, hours = found.get(MINUTES_BEFORE), found.get(HOURS_BEFORE)
    at = to_epoch(start)
    step = "1d" if hours is not None and at < hours else "1h"
    if minutes is None or at >= minutes:
        step = "1m"
    return Resolution(
        step,
        None if minutes is None else from_epoch(minutes),
        None if hours is None else from_epoch(hours),
    )


def _minutes_horizon(store: Store) -> int:
    """Where one-minute data (and GPU samples) begins, Unix seconds; 0 before any compaction."""
    rows = store.query("SELECT value FROM meta WHERE key = ?", (MINUTES_BEFORE,))
    return int(rows[0][0]) if rows else 0


def _timed_rows(
    table: str,
    columns: str,
    start: datetime,
    end: datetime,
    rollup: bool = True,
    horizon: int = 0,
) -> tuple[str, list[Any]]:
    """Like :func:`usage_rows` for the millisecond tables (``gpu``, ``inference``); before
    ``horizon`` (see :func:`_minutes_horizon`) the ragged edges come from the hourly rows."""
    pieces: list[str] = []
    params: list[Any] = []
    for level, lo, hi in _parts(to_epoch(start), to_epoch(end), rollup, days=False):
        if level == "hour":
            pieces.append(
                f"SELECT start * 1000 AS ts, {columns} FROM {table}_hour"
                " WHERE start >= ? AND start < ?"
            )
            params += [lo, hi]
        else:
            # Behind the retention horizon the samples are gone: the hourly rows hold them,
            # each starting at its first sample's time.
            cut = min(max(lo, horizon), hi)
            if lo < cut:
                pieces.append(
                    f"SELECT start * 1000 AS ts, {columns} FROM {table}_hour"
                    " WHERE start >= ? AND start < ?"
                )
                params += [lo, cut]
            if cut < hi:
                pieces.append(f"SELECT ts, {columns} FROM {table} WHERE ts >= ? AND ts < ?")
                params += [cut * 1000, hi * 1000]
    return " UNION ALL ".join(pieces) or f"SELECT 0 AS ts, {columns} FROM {table} WHERE 0", params


@dataclass(frozen=True, slots=True)
class Totals:
    """Usage totals of a window."""

    cost: Decimal = Decimal(0)
    """Cost of the priced usage."""
    requests: int = 0
    input_total: int = 0
    cache_read: int = 0
    cache_write: int = 0
    output: int = 0
    unpriced_tokens: int = 0
    unpriced_requests: int = 0

    @property
    def cost_per_request(self) -> Decimal | None:
        """Cost of a request, over priced requests; ``None`` without any."""
        priced = self.requests - self.unpriced_requests
        return self.cost / priced if priced > 0 else None


_TOTAL_SELECT = (
    "SUM(cost_nano), SUM(requests),"
    " SUM(input_uncached + cache_read + cache_write_5m + cache_write_1h), SUM(cache_read),"
    " SUM(cache_write_5m + cache_write_1h), SUM(output),"
    " SUM(CASE WHEN priced = 0 THEN input_uncached + cache_read + cache_write_5m"
    " + cache_write_1h + output ELSE 0 END),"
    " SUM(CASE WHEN priced = 0 THEN requests ELSE 0 END)"
)


_SUMMED_TOTAL = (
    "SUM(cost_nano), SUM(requests),"
    " SUM(input_uncached + cache_read + cache_write_5m + cache_write_1h), SUM(cache_read),"
    " SUM(cache_write_5m + cache_write_1h), SUM(output), SUM(unpriced_tokens),"
    " SUM(unpriced_requests)"
)
"""As :data:`_TOTAL_SELECT`, over rows of :data:`SUMMED` (a group is priced when neither of
the last two is above zero)."""


def _totals(row: Any, offset: int = 0) -> Totals:
    values = [row[offset + i] or 0 for i in range(8)]
    return Totals(nano_to_usd(values[0]), *values[1:])


def totals(
    store: Store, start: datetime, end: datetime, text: str = "", scope: str = "counted"
) -> Totals:
    """Usage totals in ``[start, end)`` (of the sources ``scope`` names, each dollar once)."""
    if text:
        sub, params = usage_rows(start, end, text, scope=scope)
        return _totals(store.query(f"SELECT {_TOTAL_SELECT} FROM ({sub})", params)[0])
    sub, params = total_rows(start, end, scope)
    return _totals(store.query(f"SELECT {_SUMMED_TOTAL} FROM ({sub})", params)[0])


@dataclass(frozen=True, slots=True)
class SpendSummary:
    """What the Spend pane shows."""

    now: datetime
    hour: Decimal
    today: Decimal
    month: Decimal
    burn_per_hour: dict[int, Decimal]
    """$/h over the last 5, 15 and 60 minutes."""
    projected_today: Decimal
    projected_month: Decimal
    newest_data: datetime | None
    """End of the newest usage bucket stored (what 'fresh' is measured against)."""
    unpriced_tokens_today: int = 0
    requests_today: int = 0
    spike: bool = False
    """The 5-minute burn is over three times the 60-minute burn, there is at least an hour of
    history before the 60-minute window to compare with, and the burn is at least
    ``spike_floor`` $/h (a few cents in a test run are not a spike)."""
    budget_daily: Decimal | None = None
    budget_monthly: Decimal | None = None

    @property
    def runway_hours(self) -> float | None:
        """Hours until the daily budget is spent at the 60-minute burn rate."""
        burn = self.burn_per_hour.get(60, Decimal(0))
        if self.budget_daily is None or burn <= 0:
            return None
        return max(0.0, float((self.budget_daily - self.today) / burn))


PROJECTIONS = {
    "today": "day at 60-min burn",
    "month": "month at month-to-date average",
}
"""How each projection is made, as the Spend pane and the report label it."""


def spend_summary(
    store: Store,
    now: datetime,
    text: str = "",
    budget_daily: Decimal | None = None,
    budget_monthly: Decimal | None = None,
    spike_floor: Decimal = Decimal(1),
) -> SpendSummary:
    """Spend this hour, today, this month (UTC), burn rates and projections.

    The projections have one method each (:data:`PROJECTIONS`): the day at the 60-minute burn,
    the month at the month-to-date average rate."""
    now = now.astimezone(UTC)
    hour_start = now.replace(minute=0, second=0, microsecond=0)
    day_start = hour_start.replace(hour=0)
    month_start = day_start.replace(day=1)
    next_month = (month_start + timedelta(days=32)).replace(day=1)
    end = now + timedelta(seconds=1)
    today = totals(store, day_start, end, text)
    month = totals(store, month_start, end, text).cost
    hour = totals(store, hour_start, end, text).cost
    burn = {}
    for minutes in (5, 15, 60):
        cost = totals(store, now - timedelta(minutes=minutes), end, text).cost
        burn[minutes] = cost * 60 / minutes
    hours_left_day = Decimal((day_start + timedelta(days=1) - now).total_seconds()) / HOUR
    hours_left_month = Decimal((next_month - now).total_seconds()) / HOUR
    elapsed_month_h = Decimal((now - month_start).total_seconds()) / HOUR
    month_rate = month / elapsed_month_h if elapsed_month_h > 0 else burn[60]
    newest = newest_usage(store, now)
    oldest = store.query("SELECT MIN(start) FROM usage")[0][0]
    history = oldest is not None and oldest <= to_epoch(now) - 2 * HOUR
    spike = history and burn[5] >= spike_floor and burn[5] > 3 * burn[60]
    return SpendSummary(
        now=now,
        hour=hour,
        today=today.cost,
        month=month,
        burn_per_hour=burn,
        projected_today=today.cost + burn[60] * hours_left_day,
        projected_month=month + month_rate * hours_left_month,
        newest_data=newest,
        unpriced_tokens_today=today.unpriced_tokens,
        requests_today=today.requests,
        spike=spike,
        budget_daily=budget_daily,
        budget_monthly=budget_monthly,
    )


def series_step(start: datetime, end: datetime, points: int = 120) -> int:
    """A chart step in seconds (a round number of minutes or hours) giving at most ``points``."""
    span = max(60, int((end - start).total_seconds()))
    for step in (60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400):
        if span / step <= points:
            return step
    return 86400


def spend_series(
    store: Store, start: datetime, end: datetime, step: int, text: str = ""
) -> list[tuple[datetime, Decimal]]:
    """Cost per step over the window, zero-filled, oldest first."""
    lo = to_epoch(start) // step * step
    hi = to_epoch(end)
    # Rollups can serve only steps made of their whole periods.
    rollup, days = step % HOUR == 0, step % DAY == 0
    if text:
        sub, params = usage_rows(from_epoch(lo), end, text, rollup=rollup, days=days)
    else:
        sub, params = total_rows(from_epoch(lo), end, rollup=rollup, days=days)
    rows = store.query(
        f"SELECT (start / {step}) * {step} AS t, SUM(cost_nano) FROM ({sub}) GROUP BY t", params
    )
    by_t = {r[0]: r[1] or 0 for r in rows}
    return [(from_epoch(t), nano_to_usd(by_t.get(t, 0))) for t in range(lo, hi, step)]


@dataclass(frozen=True, slots=True)
class CostRow:
    """One group's usage in a window, with the previous window of equal length."""

    key: str
    provider: str
    totals: Totals
    previous: Totals
    priced: bool
    price_refs: tuple[str, ...] = ()
    others: int = 0
    """For the row that sums the groups beyond a ``limit`` (key :data:`OTHERS`): how many."""

    @property
    def cache_hit_rate(self) -> float | None:
        """Share of input tokens read from cache."""
        t = self.totals
        return t.cache_read / t.input_total if t.input_total else None

    @property
    def change(self) -> float | None:
        """Relative change of $/request against the previous window."""
        now, before = self.totals.cost_per_request, self.previous.cost_per_request
        if now is None or before is None or before == 0:
            return None
        return float((now - before) / before)


OTHERS = "others"
"""The key of the row that sums the groups beyond a table's ``limit``."""


def _add(a: Totals, b: Totals) -> Totals:
    return Totals(*(getattr(a, f) + getattr(b, f) for f in Totals.__slots__))


Grouped = dict[tuple[str, str], tuple[Totals, bool]]
"""Totals per group (``(provider, key)``) and whether all of it was priced."""
Memo = dict[tuple[datetime, datetime, str, str], Grouped]
"""Grouped totals already read in one refresh (see :func:`cost_by`'s ``memo``)."""


def _grouped(
    store: Store,
    start: datetime,
    end: datetime,
    group: str,
    text: str,
    memo: Memo | None = None,
) -> Grouped:
    """Totals per group (``(provider, key)``; provider ``""`` for groups other than the
    model) and whether all of it was priced."""
    if memo is not None:
        asked = (start, end, group, text)
        if asked not in memo:
            memo[asked] = _grouped(store, start, end, group, text)
        return memo[asked]
    out: Grouped = {}
    if text:  # a filter picks series: the per-series tables
        key = "provider, model" if group == "model" else f"'' AS provider, {group}"
        key_cols = "provider, model" if group == "model" else f"provider, {group}"
        sub, params = usage_rows(start, end, text)
        rows = store.query(
            f"SELECT {key}, {_TOTAL_SELECT}, MIN(priced) FROM ({sub}) GROUP BY {key_cols}", params
        )
        for r in rows:
            k, t, priced = (r[0], r[1]), _totals(r, 2), bool(r[10])
            if k in out:  # non-model groups merge across providers
                t, priced = _add(out[k][0], t), out[k][1] and priced
            out[k] = (t, priced)
        return out
    if group == "model":
        sub, params = _by_model_rows(start, end, "counted")
        sql = _BY_MODEL.format(sums=_SUMMED_TOTAL, sub=sub)
    else:
        sub, params = _by_group_rows(group, start, end, "counted")
        sql = f"SELECT '', value, {_SUMMED_TOTAL} FROM ({sub}) GROUP BY value"
    for r in store.query(sql, params):
        t = _totals(r, 2)
        out[(r[0], r[1])] = (t, not t.unpriced_tokens and not t.unpriced_requests)
    return out


def cost_by(
    store: Store,
    start: datetime,
    end: datetime,
    group: str = "model",
    text: str = "",
    limit: int | None = None,
    memo: Memo | None = None,
) -> list[CostRow]:
    """Usage grouped by ``model`` (with provider), ``project``, ``api_key`` or ``tag``,
    dearest first, each with the previous window of the same length.

    ``memo``: a dict shared by the queries of one refresh, so that the Model mix of the same
    window does not read the same rows again.

    ``limit``: at most that many groups, and one more row (key :data:`OTHERS`, provider ``""``)
    that sums the rest in both windows, so a pane shows what fits and the totals still add up.
    """
    if group not in GROUPS:
        raise ValueError(f"cannot group by {group!r}; choose one of {', '.join(GROUPS)}")
    length = end - start
    current = _grouped(store, start, end, group, text, memo)
    before = _grouped(store, start - length, start, group, text, memo)
    rows = [
        CostRow(
            key=k[1],
            provider=k[0],
            totals=t,
            previous=before.get(k, (Totals(), True))[0],
            priced=priced,
        )
        for k, (t, priced) in current.items()
    ]
    rows.sort(key=lambda r: (-r.totals.cost, -r.totals.requests, r.key))
    if limit is None or len(rows) <= limit:
        return rows
    shown, rest = rows[: max(0, limit)], rows[max(0, limit) :]
    kept = {(r.provider, r.key) for r in shown}
    total, previous = Totals(), Totals()
    for r in rest:
        total = _add(total, r.totals)
    for k, (t, _priced) in before.items():
        if k not in kept:
            previous = _add(previous, t)
    others = CostRow(
        key=OTHERS,
        provider="",
        totals=total,
        previous=previous,
        priced=all(r.priced for r in rest),
        others=len(rest),
    )
    return [*shown, others]


@dataclass(frozen=True, slots=True)
class MixRow:
    """A model's share of spend and of requests."""

    provider: str
    model: str
    cost: Decimal
    requests: int
    cost_share: float
    request_share: float
    priced: bool
    others: int = 0
    """For the row that sums the models beyond a ``limit`` (model :data:`OTHERS`): how many."""


def model_mix(
    store: Store,
    start: datetime,
    end: datetime,
    text: str = "",
    limit: int | None = None,
    memo: Memo | None = None,
) -> list[MixRow]:
    """Share of spend and requests per model in the window, dearest first; ``limit`` and
    ``memo`` as :func:`cost_by`."""
    groups = _grouped(store, start, end, "model", text, memo)
    total_cost = sum(t.cost for t, _ in groups.values())
    total_req = sum(t.requests for t, _ in groups.values())

    def row(provider: str, model: str, t: Totals, priced: bool, others: int = 0) -> MixRow:
        return MixRow(
            provider=provider,
            model=model,
            cost=t.cost,
            requests=t.requests,
            cost_share=float(t.cost / total_cost) if total_cost else 0.0,
            request_share=t.requests / total_req if total_req else 0.0,
            priced=priced,
            others=others,
        )

    mix = [row(k[0], k[1], t, priced) for k, (t, priced) in groups.items()]
    mix.sort(key=lambda m: (-m.cost, -m.requests, m.model))
    if limit is None or len(mix) <= limit:
        return mix
    shown, rest = mix[: max(0, limit)], mix[max(0, limit) :]
    total = Totals()
    for m in rest:
        total = _add(total, groups[(m.provider, m.model)][0])
    return [*shown, row("", OTHERS, total, all(m.priced for m in rest), len(rest))]


def unpriced(store: Store, start: datetime, end: datetime, text: str = "") -> dict[str, int]:
    """Tokens of unpriced models in the window, by ``provider/model``."""
    if text:
        sub, params = usage_rows(start, end, text)
        rows = store.query(
            f"SELECT provider, model, SUM(input_uncached + cache_read + cache_write_5m"
            f" + cache_write_1h + output) FROM ({sub}) WHERE priced = 0 GROUP BY provider, model",
            params,
        )
    else:
        sub, params = _by_model_rows(start, end, "counted")
        sums = "SUM(g.unpriced_tokens), SUM(g.unpriced_requests)"
        rows = [
            r for r in store.query(_BY_MODEL.format(sums=sums, sub=sub), params) if r[2] or r[3]
        ]
    return {f"{r[0]}/{r[1]}" if r[0] else r[1]: r[2] or 0 for r in rows}


def price_refs(store: Store, start: datetime, end: datetime) -> list[str]:
    """The distinct price references behind the usage of a window (fine table only)."""
    rows = store.query(
        "SELECT ref FROM price WHERE id IN"
        " (SELECT DISTINCT price_id FROM usage WHERE start >= ? AND start < ?) ORDER BY ref",
        (to_epoch(start), to_epoch(end)),
    )
    return [r[0] for r in rows if r[0]]


@dataclass(frozen=True, slots=True)
class PriceRefUsage:
    """The usage one price reference (one rule: list, a tier's price, a flagged fallback)
    priced in a window."""

    price_ref: str
    tokens: int
    requests: int
    cost: Decimal
    priced: bool


def usage_by_price_ref(store: Store, start: datetime, end: datetime) -> list[PriceRefUsage]:
    """Tokens, requests and cost of a window by the price reference that priced them (fine
    table only, as :func:`price_refs`), dearest first."""
    rows = store.query(
        "SELECT p.ref, g.tokens, g.requests, g.cost, g.priced FROM (SELECT price_id,"
        " SUM(input_uncached + cache_read + cache_write_5m + cache_write_1h + output) AS tokens,"
        " SUM(requests) AS requests, SUM(cost_nano) AS cost, MIN(priced) AS priced FROM usage"
        " WHERE start >= ? AND start < ? GROUP BY price_id) AS g"
        " JOIN price AS p ON p.id = g.price_id WHERE p.ref != ''",
        (to_epoch(start), to_epoch(end)),
    )
    out = [
        PriceRefUsage(r[0], r[1] or 0, r[2] or 0, nano_to_usd(r[3] or 0), bool(r[4])) for r in rows
    ]
    out.sort(key=lambda u: (-u.cost, u.price_ref))
    return out


@dataclass(frozen=True, slots=True)
class ProviderDay:
    """Estimated (tokens x prices) beside billed cost for one provider and UTC day."""

    provider: str
    day: datetime
    estimated: Decimal
    billed: Decimal | None

    @property
    def gap(self) -> Decimal | None:
        """Billed minus estimated; ``None`` until the provider has billed the day."""
        return None if self.billed is None else self.billed - self.estimated


_BILLING_PROVIDERS = (
    "WITH RECURSIVE p(provider) AS (SELECT MIN(provider) FROM billed UNION ALL"
    " SELECT (SELECT MIN(provider) FROM billed WHERE provider > p.provider) FROM p"
    " WHERE p.provider IS NOT NULL) SELECT provider FROM p WHERE provider IS NOT NULL"
)
"""Every provider that has billed anything: one index seek each (``billed`` grows by a few
dozen rows a day, forever), not a scan."""


def billed_vs_estimated(store: Store, start: datetime, end: datetime) -> list[ProviderDay]:
    """Per provider and UTC day the window touches: estimate, billed cost and the gap.

    Providers bill whole UTC days, so both sides cover each of those days whole, not only the
    part inside the window: a bill is never compared with a few hours of its day."""
    lo = to_epoch(start) // 86400 * 86400
    hi = -(-to_epoch(end) // 86400) * 86400
    sub, params = total_rows(from_epoch(lo), from_epoch(hi))
    est = store.query(
        f"SELECT o.provider, (x.start / 86400) * 86400 AS d, SUM(x.cost_nano) FROM ({sub}) AS x"
        " JOIN origin AS o ON o.id = x.origin_id GROUP BY o.provider, d",
        params,
    )
    billed = store.query(
        "SELECT provider, day, SUM(amount_nano) FROM billed WHERE day >= ? AND day < ?"
        " GROUP BY provider, day",
        (lo, hi),
    )
    billed_by = {(r[0], r[1]): r[2] for r in billed}
    # Providers that bill at all are listed for every day, billed or not yet.
    billed_providers = {r[0] for r in store.query(_BILLING_PROVIDERS)}
    keys = {(r[0], r[1]) for r in est if r[0] in billed_providers} | set(billed_by)
    est_by = {(r[0], r[1]): r[2] or 0 for r in est}
    days = [
        ProviderDay(
            provider=p,
            day=from_epoch(d),
            estimated=nano_to_usd(est_by.get((p, d), 0)),
            billed=nano_to_usd(billed_by[(p, d)]) if (p, d) in billed_by else None,
        )
        for p, d in keys
    ]
    days.sort(key=lambda x: (x.provider, x.day))
    return days


def total_sources(store: Store, start: datetime, end: datetime) -> dict[str, dict[str, list[str]]]:
    """Per provider with usage in the window: the sources its totals come from (``counted``)
    and the metered sources whose records are inside those totals, not added (``metered``)."""
    out: dict[str, dict[str, list[str]]] = {}
    for scope in ("counted", "metered"):
        sub, params = total_rows(start, end, scope=scope)
        rows = store.query(
            f"SELECT DISTINCT o.provider, o.source FROM ({sub}) AS x"
            " JOIN origin AS o ON o.id = x.origin_id ORDER BY o.provider, o.source",
            params,
        )
        for provider, source in rows:
            entry = out.setdefault(provider, {"counted": [], "metered": []})
            entry[scope].append(source)
    return out


def billed_total(store: Store, start: datetime, end: datetime) -> Decimal | None:
    """Billed cost of every UTC day the window touches (providers bill whole days);
    ``None`` when none is stored."""
    row = store.query(
        "SELECT SUM(amount_nano), COUNT(*) FROM billed WHERE day >= ? AND day < ?",
        (to_epoch(start) // 86400 * 86400, to_epoch(end)),
    )[0]
    return None if not row[1] else nano_to_usd(row[0] or 0)


@dataclass(frozen=True, slots=True)
class GpuDevice:
    """One GPU over a window, with its newest reading."""

    source: str
    device: str
    name: str
    index: int
    cost: Decimal
    idle_cost: Decimal
    seconds: float
    util_pct: float | None
    power_w: float | None
    mem_used_bytes: int | None
    mem_total_bytes: int | None
    temp_c: int | None
    usd_per_hour: Decimal | None
    last_seen: datetime | None
    cost_ref: str = ""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One inference endpoint over a window."""

    source: str
    endpoint: str
    kind: str
    requests: int
    prompt_tokens: int
    generation_tokens: int
    seconds: float

    @property
    def per_second(self) -> float | None:
        """Inferences per second over the time observed."""
        return self.requests / self.seconds if self.seconds > 0 else None


@dataclass(frozen=True, slots=True)
class GpuOverview:
    """GPU cost per inference over a window."""

    devices: list[GpuDevice] = field(default_factory=list)
    endpoints: list[Endpoint] = field(default_factory=list)
    cost: Decimal = Decimal(0)
    idle_cost: Decimal = Decimal(0)
    inferences: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    newest: datetime | None = None

    @property
    def cost_per_inference(self) -> Decimal | None:
        """Fully loaded: all GPU cost (idle included) over inferences served."""
        return self.cost / self.inferences if self.inferences else None

    @property
    def cost_per_1m_tokens(self) -> Decimal | None:
        """GPU cost per million tokens (prompt and generated)."""
        tokens = self.prompt_tokens + self.generation_tokens
        return self.cost * 1_000_000 / tokens if tokens else None

    @classmethod
    def of(
        cls,
        devices: list[GpuDevice],
        endpoints: list[Endpoint],
        *,
        until: datetime | None = None,
    ) -> GpuOverview:
        """The overview of ``devices`` and ``endpoints``: their sums, and as ``newest`` the
        latest device sample, no later than ``until`` when given."""
        newest = max((d.last_seen for d in devices if d.last_seen), default=None)
        if newest is not None and until is not None:
            newest = min(newest, until)
        return cls(
            devices=devices,
            endpoints=endpoints,
            cost=sum((d.cost for d in devices), Decimal(0)),
            idle_cost=sum((d.idle_cost for d in devices), Decimal(0)),
            inferences=sum(e.requests for e in endpoints),
            prompt_tokens=sum(e.prompt_tokens for e in endpoints),
            generation_tokens=sum(e.generation_tokens for e in endpoints),
            newest=newest,
        )


def gpu_overview(store: Store, start: datetime, end: datetime) -> GpuOverview:
    """Per-GPU and per-endpoint cost, inferences and the fully loaded $/inference."""
    horizon = _minutes_horizon(store)
    sub, params = _timed_rows(
        "gpu",
        "source, device, name, interval_ms, cost_nano, idle_cost_nano",
        start,
        end,
        horizon=horizon,
    )
    sums = store.query(
        f"SELECT source, device, name, SUM(interval_ms), SUM(cost_nano), SUM(idle_cost_nano)"
        f" FROM ({sub}) GROUP BY source, device",
        params,
    )
    latest = store.query(
        "SELECT g.* FROM gpu g JOIN (SELECT source, device, MAX(ts) AS ts FROM gpu"
        " WHERE ts >= ? AND ts < ? GROUP BY source, device) m"
        " ON g.source = m.source AND g.device = m.device AND g.ts = m.ts",
        (max(to_epoch(start), to_epoch(end) - 3 * HOUR) * 1000, to_epoch(end) * 1000),
    )
    latest_by = {(r["source"], r["device"]): r for r in latest}
    devices = []
    for r in sums:
        last = latest_by.get((r[0], r[1]))
        rate = None
        if last is not None and last["interval_ms"]:
            rate = nano_to_usd(last["cost_nano"]) * 3_600_000 / last["interval_ms"]
        devices.append(
            GpuDevice(
                source=r[0],
                device=r[1],
                name=r[2],
                index=last["idx"] if last is not None else 0,
                cost=nano_to_usd(r[4] or 0),
                idle_cost=nano_to_usd(r[5] or 0),
                seconds=(r[3] or 0) / 1000,
                util_pct=last["util_pct"] if last is not None else None,
                power_w=last["power_mw"] / 1000
                if last is not None and last["power_mw"] is not None
                else None,
                mem_used_bytes=last["mem_used_bytes"] if last is not None else None,
                mem_total_bytes=last["mem_total_bytes"] if last is not None else None,
                temp_c=last["temp_c"] if last is not None else None,
                usd_per_hour=rate,
                last_seen=from_epoch(last["ts"] / 1000) if last is not None else None,
                cost_ref=last["cost_ref"] if last is not None else "",
            )
        )
    devices.sort(key=lambda d: (d.source, d.index, d.device))
    sub, params = _timed_rows(
        "inference",
        "source, endpoint, kind, interval_ms, requests, prompt_tokens, generation_tokens",
        start,
        end,
        horizon=horizon,
    )
    rows = store.query(
        f"SELECT source, endpoint, MAX(kind), SUM(requests), SUM(prompt_tokens),"
        f" SUM(generation_tokens), SUM(interval_ms) FROM ({sub}) GROUP BY source, endpoint",
        params,
    )
    endpoints = [
        Endpoint(r[0], r[1], r[2] or "", r[3] or 0, r[4] or 0, r[5] or 0, (r[6] or 0) / 1000)
        for r in rows
    ]
    return GpuOverview.of(devices, endpoints)


def gpu_series(
    store: Store, start: datetime, end: datetime, step: int
) -> list[tuple[datetime, Decimal | None]]:
    """$/inference per step (``None`` where nothing was served), oldest first."""
    lo = to_epoch(start) // step * step
    hi = to_epoch(end)
    begin = from_epoch(lo)
    whole_hours = step % HOUR == 0
    horizon = _minutes_horizon(store)
    gsub, gparams = _timed_rows("gpu", "source, cost_nano", begin, end, whole_hours, horizon)
    isub, iparams = _timed_rows("inference", "source, requests", begin, end, whole_hours, horizon)
    cost = store.query(
        f"SELECT (ts / {step * 1000}) * {step} AS t, SUM(cost_nano) FROM ({gsub}) GROUP BY t",
        gparams,
    )
    reqs = store.query(
        f"SELECT (ts / {step * 1000}) * {step} AS t, SUM(requests) FROM ({isub}) GROUP BY t",
        iparams,
    )
    cost_by_t = {r[0]: r[1] or 0 for r in cost}
    req_by_t = {r[0]: r[1] or 0 for r in reqs}
    out: list[tuple[datetime, Decimal | None]] = []
    for t in range(lo, hi, step):
        n = req_by_t.get(t, 0)
        out.append((from_epoch(t), nano_to_usd(cost_by_t.get(t, 0)) / n if n else None))
    return out


def sources(store: Store, now: datetime) -> list[SourceHealth]:
    """Every source's recorded health, with its API calls in the last hour."""
    calls = {
        r[0]: r[1]
        for r in store.query(
            "SELECT name, SUM(calls) FROM source_calls WHERE minute >= ? GROUP BY name",
            (to_epoch(now) - HOUR,),
        )
    }

    def dt(value: int | None) -> datetime | None:
        return None if value is None else from_epoch(value)

    out = []
    for r in store.query("SELECT * FROM source ORDER BY name"):
        out.append(
            SourceHealth(
                name=r["name"],
                kind=r["kind"],
                state=r["state"],
                last_success=dt(r["last_success"]),
                last_error=r["last_error"],
                last_error_at=dt(r["last_error_at"]),
                lag_s=r["lag_s"],
                calls=r["calls"],
                calls_last_hour=calls.get(r["name"], 0),
                watermark=dt(r["watermark"]),
                detail=r["detail"],
                newest_data=dt(r["newest_data"]),
                # A file opened read-only may predate the column (schema version 2).
                interval_s=r["interval_s"] if "interval_s" in r.keys() else None,  # noqa: SIM118
            )
        )
    return out


def newest_complete_usage(store: Store, now: datetime) -> datetime | None:
    """End of the newest usage bucket that had closed by ``now`` (an open minute is not complete
    data: a collector that wrote it 30 s ago may have stopped since)."""
    rows = store.query(
        "SELECT start + width FROM usage WHERE start + width <= ? ORDER BY start DESC LIMIT 1",
        (to_epoch(now),),
    )
    return from_epoch(rows[0][0]) if rows and rows[0][0] is not None else None


def newest_usage(store: Store, now: datetime | None = None) -> datetime | None:
    """End of the newest usage bucket in the store; an open bucket counts as fresh to ``now``."""
    # Ordered by the primary key's first column: one index seek, not a scan.
    rows = store.query("SELECT start + width FROM usage ORDER BY start DESC LIMIT 1")
    value = rows[0][0] if rows else None
    if value is None:
        return None
    newest = from_epoch(value)
    return min(newest, now) if now is not None else newest

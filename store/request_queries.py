"""Queries over metered requests (the ``request`` table) for the Cost per query pane and sessions.

The per-request meter (proxy, httpx instrumentation, pytest plugin) stores one row per request,
so cost per request here is a distribution, not only a mean: the median and 95th percentile show
whether a feature is uniformly dear or dear in its tail. Percentiles are nearest-rank over the
priced requests (an unpriced request has no cost, not a zero cost) and are computed in SQL with
window functions, so a window of many requests is never loaded into Python.

Windows are half-open, ``[start, end)``; request timestamps are milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from tokentop.store.db import Store
from tokentop.store.filters import filter_sql
from tokentop.store.records import MeteredRequest, from_epoch, nano_to_usd

REQUEST_GROUPS = ("tag", "model", "provider")
"""What metered requests can be grouped by (a pytest test is a tag: its node id)."""


@dataclass(frozen=True, slots=True)
class RequestStats:
    """Metered requests of one group (or of the whole window) and what they cost."""

    key: str
    """The group's value (tag, model or provider); ``""`` for a whole window."""
    requests: int = 0
    priced_requests: int = 0
    estimated_requests: int = 0
    """Requests whose tokens were estimated (the response reported no usage)."""
    cost: Decimal = Decimal(0)
    """Cost of the priced requests."""
    p50: Decimal | None = None
    """Median cost of a priced request."""
    p95: Decimal | None = None
    """95th percentile cost of a priced request."""
    max: Decimal | None = None
    input_tokens: int = 0
    """All input: uncached, cache reads and cache writes."""
    cache_read: int = 0
    cache_write: int = 0
    output_tokens: int = 0
    web_searches: int = 0
    latency_ms: float | None = None
    """Mean latency of a request, to its last byte."""
    provider: str = ""
    """For model groups: the model's provider."""

    @property
    def unpriced_requests(self) -> int:
        """Requests of models without a price."""
        return self.requests - self.priced_requests

    @property
    def cost_per_request(self) -> Decimal | None:
        """Mean cost of a priced request; ``None`` without any."""
        return self.cost / self.priced_requests if self.priced_requests else None

    @property
    def input_per_request(self) -> float | None:
        """Mean input tokens of a request."""
        return self.input_tokens / self.requests if self.requests else None

    @property
    def output_per_request(self) -> float | None:
        """Mean output tokens of a request."""
        return self.output_tokens / self.requests if self.requests else None

    @property
    def cache_hit_rate(self) -> float | None:
        """Share of input tokens read from the cache; ``None`` without input."""
        return self.cache_read / self.input_tokens if self.input_tokens else None


def _where(start: datetime, end: datetime, tag: str | None, text: str) -> tuple[str, list[Any]]:
    sql = "ts >= ? AND ts < ?"
    params: list[Any] = [_ms(start), _ms(end)]
    if tag:
        if "*" in tag:
            sql += " AND tag GLOB ?"
        else:
            sql += " AND tag = ?"
        params.append(tag)
    if text:
        where, fparams = filter_sql(text, ("tag", "model", "provider"))
        sql += where
        params += fparams
    return sql, params


def _ms(when: datetime) -> int:
    if when.tzinfo is None:
        raise ValueError(f"naive datetime {when!r}: tokentop keeps time in UTC")
    return round(when.timestamp() * 1000)


_SUMS = (
    "COUNT(*), SUM(priced), SUM(estimated),"
    " SUM(CASE WHEN priced = 1 THEN cost_nano ELSE 0 END),"
    " SUM(input_uncached + cache_read + cache_write_5m + cache_write_1h), SUM(cache_read),"
    " SUM(cache_write_5m + cache_write_1h), SUM(output), SUM(web_searches), AVG(latency_ms),"
    " MAX(CASE WHEN priced = 1 THEN cost_nano END)"
)


def _percentiles(
    store: Store, where: str, params: list[Any], group: str | None
) -> dict[str, tuple[int | None, int | None]]:
    """Nearest-rank p50 and p95 cost (nano) of priced requests, per group value."""
    part = f"PARTITION BY {group}" if group else ""
    key = group if group else "''"
    rows = store.query(
        f"SELECT k, n, rn, cost_nano FROM (SELECT {key} AS k, cost_nano,"
        f" ROW_NUMBER() OVER ({part} ORDER BY cost_nano) AS rn,"
        f" COUNT(*) OVER ({part}) AS n FROM request WHERE {where} AND priced = 1)"
        " WHERE rn = (n * 50 + 99) / 100 OR rn = (n * 95 + 99) / 100",
        params,
    )
    out: dict[str, tuple[int | None, int | None]] = {}
    for r in rows:
        p50, p95 = out.get(r[0], (None, None))
        n, rn = r[1], r[2]
        if rn == (n * 50 + 99) // 100:
            p50 = r[3]
        if rn == (n * 95 + 99) // 100:
            p95 = r[3]
        out[r[0]] = (p50, p95)
    return out


def _stats(key: str, row: Any, offset: int, pct: tuple[int | None, int | None]) -> RequestStats:
    v = [row[offset + i] for i in range(11)]

    def usd(nano: int | None) -> Decimal | None:
        return None if nano is None else nano_to_usd(nano)

    return RequestStats(
        key=key,
        requests=v[0] or 0,
        priced_requests=v[1] or 0,
        estimated_requests=v[2] or 0,
        cost=nano_to_usd(v[3] or 0),
        p50=usd(pct[0]),
        p95=usd(pct[1]),
        max=usd(v[10]),
        input_tokens=v[4] or 0,
        cache_read=v[5] or 0,
        cache_write=v[6] or 0,
        output_tokens=v[7] or 0,
        web_searches=v[8] or 0,
        latency_ms=None if v[9] is None else float(v[9]),
    )


def request_stats(
    store: Store, start: datetime, end: datetime, *, tag: str | None = None, text: str = ""
) -> RequestStats:
    """Metered requests in ``[start, end)``: count, cost, p50/p95 $/request, tokens.

    Args:
        tag: only requests with this tag (``*`` makes it a glob, e.g. ``tests/test_api.py::*``).
        text: only requests whose tag, model or provider contains it.
    """
    where, params = _where(start, end, tag, text)
    row = store.query(f"SELECT {_SUMS} FROM request WHERE {where}", params)[0]
    pct = _percentiles(store, where, params, None).get("", (None, None))
    return _stats("", row, 0, pct)


def request_stats_by(
    store: Store,
    start: datetime,
    end: datetime,
    group: str = "tag",
    *,
    tag: str | None = None,
    text: str = "",
    limit: int = 100,
) -> list[RequestStats]:
    """Metered requests grouped by ``tag`` (a test's node id under the pytest plugin), ``model``
    or ``provider``, dearest first."""
    if group not in REQUEST_GROUPS:
        raise ValueError(f"cannot group by {group!r}; choose one of {', '.join(REQUEST_GROUPS)}")
    where, params = _where(start, end, tag, text)
    extra = ", MAX(provider)" if group == "model" else ", ''"
    rows = store.query(
        f"SELECT {group}, {_SUMS}{extra} FROM request WHERE {where} GROUP BY {group}"
        " ORDER BY SUM(CASE WHEN priced = 1 THEN cost_nano ELSE 0 END) DESC, COUNT(*) DESC,"
        f" {group} LIMIT ?",
        [*params, limit],
    )
    pct = _percentiles(store, where, params, group)
    out = []
    for r in rows:
        stats = _stats(r[0], r, 1, pct.get(r[0], (None, None)))
        out.append(_with_provider(stats, r[12] or ""))
    return out


def _with_provider(stats: RequestStats, provider: str) -> RequestStats:
    if not provider:
        return stats
    fields = {name: getattr(stats, name) for name in RequestStats.__slots__}
    fields["provider"] = provider
    return RequestStats(**fields)


def latest_requests(
    store: Store,
    limit: int = 20,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    tag: str | None = None,
) -> list[MeteredRequest]:
    """The newest metered requests, newest first."""
    clauses: list[str] = []
    params: list[Any] = []
    if start is not None:
        clauses.append("ts >= ?")
        params.append(_ms(start))
    if end is not None:
        clauses.append("ts < ?")
        params.append(_ms(end))
    if tag:
        clauses.append("tag GLOB ?" if "*" in tag else "tag = ?")
        params.append(tag)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = store.query(
        f"SELECT * FROM request {where} ORDER BY ts DESC, request_id DESC LIMIT ?",
        [*params, limit],
    )
    return [
        MeteredRequest(
            ts=from_epoch(r["ts"] / 1000),
            provider=r["provider"],
            model=r["model"],
            source=r["source"],
            request_id=r["request_id"],
            input_uncached=r["input_uncached"],
            cache_read=r["cache_read"],
            cache_write_5m=r["cache_write_5m"],
            cache_write_1h=r["cache_write_1h"],
            output=r["output"],
            web_searches=r["web_searches"],
            cost_nano=r["cost_nano"],
            priced=bool(r["priced"]),
            price_ref=r["price_ref"],
            latency_ms=r["latency_ms"],
            status=r["status"],
            tag=r["tag"],
            estimated=bool(r["estimated"]),
        )
        for r in rows
    ]

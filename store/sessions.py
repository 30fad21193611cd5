"""Sessions: named time windows of metered requests, their snapshots and the diff of two.

A developer starts a session, exercises a feature (through the proxy, the httpx meter or the
pytest plugin), stops it, and later compares it with another session: "this change made each
query 30 % dearer". A session is a time window plus an optional tag filter; nothing is copied, so
a snapshot is always computed from the ``request`` table (and the GPU tables for self-hosted cost).

The ``meter_session`` table is created on first use (``CREATE TABLE IF NOT EXISTS``), so
databases made before sessions existed need no migration.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from tokentop.store import queries
from tokentop.store.db import Store
from tokentop.store.records import from_epoch
from tokentop.store.request_queries import RequestStats, request_stats, request_stats_by

SCHEMA = """
CREATE TABLE IF NOT EXISTS meter_session (
    name TEXT PRIMARY KEY,
    tag TEXT NOT NULL DEFAULT '',
    started INTEGER NOT NULL,
    stopped INTEGER
)
"""
"""Times are milliseconds since the epoch; ``stopped`` is NULL while the session is open."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,99}$")


class SessionError(ValueError):
    """A session that does not exist, already exists or cannot be stopped; one line."""


@dataclass(frozen=True, slots=True)
class Session:
    """A named window of metered requests."""

    name: str
    started: datetime
    stopped: datetime | None = None
    """``None`` while open."""
    tag: str = ""
    """Only requests with this tag (``*`` globs); empty for all."""

    @property
    def is_open(self) -> bool:
        """Whether the session is still recording."""
        return self.stopped is None

    def end(self, now: datetime) -> datetime:
        """End of the window: when it stopped, or ``now`` while open."""
        return self.stopped if self.stopped is not None else now


def ensure_schema(store: Store) -> None:
    """Create the ``session`` table if it is missing."""
    with store.transaction() as conn:
        conn.execute(SCHEMA)


def _exists(store: Store) -> bool:
    rows = store.query(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meter_session'"
    )
    return bool(rows)


def _ms(when: datetime) -> int:
    if when.tzinfo is None:
        raise ValueError(f"naive datetime {when!r}: tokentop keeps time in UTC")
    return round(when.timestamp() * 1000)


def _session(row: Any) -> Session:
    return Session(
        name=row["name"],
        started=from_epoch(row["started"] / 1000),
        stopped=None if row["stopped"] is None else from_epoch(row["stopped"] / 1000),
        tag=row["tag"],
    )


def start_session(store: Store, name: str, now: datetime, tag: str = "") -> Session:
    """Open a session called ``name`` at ``now``."""
    if not _NAME.match(name):
        raise SessionError(
            f"bad session name {name!r} (letters, digits and . _ : @ / + -, at most 100)"
        )
    ensure_schema(store)
    with store.transaction() as conn:
        if conn.execute("SELECT 1 FROM meter_session WHERE name = ?", (name,)).fetchone():
            raise SessionError(f"session {name!r} already exists")
        conn.execute(
            "INSERT INTO meter_session (name, tag, started, stopped) VALUES (?, ?, ?, NULL)",
            (name, tag, _ms(now)),
        )
    return Session(name=name, started=from_epoch(_ms(now) / 1000), tag=tag)


def stop_session(store: Store, now: datetime, name: str | None = None) -> Session:
    """Close the session ``name``, or the only open one when no name is given."""
    open_ = [s for s in list_sessions(store) if s.is_open]
    if name is None:
        if not open_:
            raise SessionError("no open session to stop")
        if len(open_) > 1:
            names = ", ".join(s.name for s in open_)
            raise SessionError(f"several sessions are open ({names}); name the one to stop")
        session = open_[0]
    else:
        session = get_session(store, name)
        if not session.is_open:
            raise SessionError(f"session {name!r} is already stopped")
    stopped = max(_ms(now), _ms(session.started))
    with store.transaction() as conn:
        conn.execute("UPDATE meter_session SET stopped = ? WHERE name = ?", (stopped, session.name))
    return Session(session.name, session.started, from_epoch(stopped / 1000), session.tag)


def list_sessions(store: Store) -> list[Session]:
    """Every session, oldest first."""
    if not _exists(store):
        return []
    return [_session(r) for r in store.query("SELECT * FROM meter_session ORDER BY started, name")]


def get_session(store: Store, name: str) -> Session:
    """The session called ``name``; :class:`SessionError` when there is none."""
    rows = (
        store.query("SELECT * FROM meter_session WHERE name = ?", (name,)) if _exists(store) else []
    )
    if not rows:
        raise SessionError(f"unknown session {name!r} (see `tokentop session list`)")
    return _session(rows[0])


@dataclass(frozen=True, slots=True)
class ModelShare:
    """One model's part of a session."""

    provider: str
    model: str
    requests: int
    cost: Decimal
    request_share: float
    cost_share: float | None
    priced: bool


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a session measured."""

    session: Session
    start: datetime
    end: datetime
    stats: RequestStats
    models: list[ModelShare] = field(default_factory=list)
    gpu_cost: Decimal = Decimal(0)
    gpu_inferences: int = 0

    @property
    def gpu_cost_per_inference(self) -> Decimal | None:
        """GPU cost over inferences served in the window, if any were."""
        return self.gpu_cost / self.gpu_inferences if self.gpu_inferences else None


def _window(session: Session, now: datetime) -> tuple[datetime, datetime, datetime]:
    start, end = session.started, session.end(now)
    # Windows are half-open; a request in the stop millisecond still belongs to the session.
    return start, end, from_epoch((_ms(end) + 1) / 1000)


def session_stats(store: Store, session: Session, now: datetime) -> RequestStats:
    """The session's request figures alone (cheaper than a :func:`snapshot`)."""
    start, _end, end_q = _window(session, now)
    return request_stats(store, start, end_q, tag=session.tag or None)


def snapshot(store: Store, session: Session, now: datetime) -> Snapshot:
    """The session's figures, computed from the metered requests in its window."""
    start, end, end_q = _window(session, now)
    tag = session.tag or None
    stats = request_stats(store, start, end_q, tag=tag)
    by_model = request_stats_by(store, start, end_q, "model", tag=tag, limit=1000)
    models = [
        ModelShare(
            provider=m.provider,
            model=m.key,
            requests=m.requests,
            cost=m.cost,
            request_share=m.requests / stats.requests if stats.requests else 0.0,
            cost_share=float(m.cost / stats.cost) if stats.cost else None,
            priced=m.unpriced_requests == 0,
        )
        for m in by_model
    ]
    gpu = queries.gpu_overview(store, start, end_q)
    return Snapshot(
        session=session,
        start=start,
        end=end,
        stats=stats,
        models=models,
        gpu_cost=gpu.cost,
        gpu_inferences=gpu.inferences,
    )


def _usd(value: Decimal | None) -> float | None:
    return None if value is None else float(round(value, 9))


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def snapshot_dict(snap: Snapshot) -> dict[str, Any]:
    """A snapshot as JSON-ready data (``tokentop session show --json``)."""
    s = snap.stats
    return {
        "session": snap.session.name,
        "tag": snap.session.tag,
        "open": snap.session.is_open,
        "start": snap.start.isoformat(),
        "end": snap.end.isoformat(),
        "requests": s.requests,
        "priced_requests": s.priced_requests,
        "unpriced_requests": s.unpriced_requests,
        "estimated_requests": s.estimated_requests,
        "cost_usd": _usd(s.cost),
        "cost_per_request_usd": _usd(s.cost_per_request),
        "p50_cost_per_request_usd": _usd(s.p50),
        "p95_cost_per_request_usd": _usd(s.p95),
        "input_tokens": s.input_tokens,
        "output_tokens": s.output_tokens,
        "cache_read_tokens": s.cache_read,
        "cache_write_tokens": s.cache_write,
        "input_tokens_per_request": _round(s.input_per_request, 2),
        "output_tokens_per_request": _round(s.output_per_request, 2),
        "cache_hit_rate": _round(s.cache_hit_rate),
        "web_searches": s.web_searches,
        "mean_latency_ms": _round(s.latency_ms, 2),
        "models": [
            {
                "provider": m.provider,
                "model": m.model,
                "requests": m.requests,
                "cost_usd": _usd(m.cost) if m.priced else None,
                "request_share": _round(m.request_share),
                "cost_share": _round(m.cost_share),
                "priced": m.priced,
            }
            for m in snap.models
        ],
        "gpu": {
            "cost_usd": _usd(snap.gpu_cost),
            "inferences": snap.gpu_inferences,
            "cost_per_inference_usd": _usd(snap.gpu_cost_per_inference),
        },
    }


@dataclass(frozen=True, slots=True)
class Change:
    """One figure of two snapshots and how it moved."""

    metric: str
    label: str
    a: float | None
    b: float | None
    change_pct: float | None
    """``(b - a) / a`` in percent; ``None`` when ``a`` is zero or either is missing."""


_DIFF_METRICS: tuple[tuple[str, str], ...] = (
    ("cost_per_request_usd", "$/request"),
    ("p50_cost_per_request_usd", "p50 $/request"),
    ("p95_cost_per_request_usd", "p95 $/request"),
    ("requests", "requests"),
    ("cost_usd", "cost $"),
    ("input_tokens_per_request", "input tokens/request"),
    ("output_tokens_per_request", "output tokens/request"),
    ("cache_hit_rate", "cache hit rate"),
    ("estimated_requests", "estimated requests"),
    ("mean_latency_ms", "latency ms"),
)


def diff(a: Snapshot, b: Snapshot) -> list[Change]:
    """How each figure changed from ``a`` to ``b`` (GPU $/inference included when either has
    GPU data)."""
    da, db = snapshot_dict(a), snapshot_dict(b)
    metrics = list(_DIFF_METRICS)
    if a.gpu_inferences or b.gpu_inferences or a.gpu_cost or b.gpu_cost:
        da["gpu_cost_per_inference_usd"] = da["gpu"]["cost_per_inference_usd"]
        db["gpu_cost_per_inference_usd"] = db["gpu"]["cost_per_inference_usd"]
        metrics.append(("gpu_cost_per_inference_usd", "GPU $/inference"))
    out = []
    for metric, label in metrics:
        va, vb = da[metric], db[metric]
        pct = None
        if va is not None and vb is not None and va != 0:
            pct = round((vb - va) / abs(va) * 100, 2)
        out.append(Change(metric, label, va, vb, pct))
    return out

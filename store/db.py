"""The SQLite store: schema, idempotent batch writes, hourly rollups and source health.

One writer process and any number of readers share a file in WAL mode. Every batch is written in
one transaction. Usage buckets are keyed on every dimension; a poll that says it re-read a window
(:class:`~store.records.UsageWindow`) replaces that window, so re-polling never counts twice.
Each fine-grained table has an hourly rollup kept in step on every write, so that long windows are
summed from a few thousand rows instead of millions.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from store.records import (
    USAGE_DIMENSIONS,
    Batch,
    BilledCost,
    GpuSample,
    InferenceSample,
    MeteredRequest,
    SourceHealth,
    UsageBucket,
    from_epoch,
    to_epoch,
)

SCHEMA_VERSION = 1
HOUR = 3600

_DIMS = ", ".join(USAGE_DIMENSIONS)
_DIM_COLUMNS = ",\n    ".join(f"{d} TEXT NOT NULL DEFAULT ''" for d in USAGE_DIMENSIONS)
_USAGE_SUMS = (
    "input_uncached",
    "cache_read",
    "cache_write_5m",
    "cache_write_1h",
    "output",
    "requests",
    "web_searches",
    "cost_nano",
)
_SUM_COLUMNS = ",\n    ".join(f"{c} INTEGER NOT NULL DEFAULT 0" for c in _USAGE_SUMS)

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

CREATE TABLE IF NOT EXISTS usage (
    start INTEGER NOT NULL,
    source TEXT NOT NULL,
    width INTEGER NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    {_DIM_COLUMNS},
    {_SUM_COLUMNS},
    priced INTEGER NOT NULL,
    price_ref TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (start, source, width, provider, model, {_DIMS})
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS usage_hour (
    start INTEGER NOT NULL,
    source TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    {_DIM_COLUMNS},
    priced INTEGER NOT NULL,
    {_SUM_COLUMNS},
    PRIMARY KEY (start, source, provider, model, {_DIMS}, priced)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS billed (
    day INTEGER NOT NULL,
    source TEXT NOT NULL,
    provider TEXT NOT NULL,
    project TEXT NOT NULL DEFAULT '',
    line_item TEXT NOT NULL DEFAULT '',
    workspace TEXT NOT NULL DEFAULT '',
    amount_nano INTEGER NOT NULL,
    currency TEXT NOT NULL DEFAULT 'usd',
    PRIMARY KEY (day, source, project, line_item, workspace)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS gpu (
    ts INTEGER NOT NULL,
    source TEXT NOT NULL,
    device TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '',
    idx INTEGER NOT NULL DEFAULT 0,
    interval_ms INTEGER NOT NULL DEFAULT 0,
    util_pct REAL,
    mem_used_bytes INTEGER,
    mem_total_bytes INTEGER,
    power_mw INTEGER,
    energy_mj INTEGER,
    temp_c INTEGER,
    cost_nano INTEGER NOT NULL DEFAULT 0,
    idle_cost_nano INTEGER NOT NULL DEFAULT 0,
    cost_ref TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (ts, source, device)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS gpu_hour (
    start INTEGER NOT NULL,
    source TEXT NOT NULL,
    device TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '',
    interval_ms INTEGER NOT NULL DEFAULT 0,
    cost_nano INTEGER NOT NULL DEFAULT 0,
    idle_cost_nano INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (start, source, device, name)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS inference (
    ts INTEGER NOT NULL,
    source TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    kind TEXT NOT NULL DEFAULT '',
    interval_ms INTEGER NOT NULL DEFAULT 0,
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    generation_tokens INTEGER NOT NULL DEFAULT 0,
    devices TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (ts, source, endpoint)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS inference_hour (
    start INTEGER NOT NULL,
    source TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    kind TEXT NOT NULL DEFAULT '',
    interval_ms INTEGER NOT NULL DEFAULT 0,
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    generation_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (start, source, endpoint, kind)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS request (
    ts INTEGER NOT NULL,
    source TEXT NOT NULL,
    request_id TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    input_uncached INTEGER NOT NULL DEFAULT 0,
    cache_read INTEGER NOT NULL DEFAULT 0,
    cache_write_5m INTEGER NOT NULL DEFAULT 0,
    cache_write_1h INTEGER NOT NULL DEFAULT 0,
    output INTEGER NOT NULL DEFAULT 0,
    web_searches INTEGER NOT NULL DEFAULT 0,
    cost_nano INTEGER NOT NULL DEFAULT 0,
    priced INTEGER NOT NULL,
    price_ref TEXT NOT NULL DEFAULT '',
    latency_ms REAL NOT NULL DEFAULT 0,
    status INTEGER NOT NULL DEFAULT 200,
    tag TEXT NOT NULL DEFAULT '',
    estimated INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (ts, source, request_id)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS source (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT 'starting',
    last_success INTEGER,
    last_error TEXT NOT NULL DEFAULT '',
    last_error_at INTEGER,
    lag_s REAL,
    calls INTEGER NOT NULL DEFAULT 0,
    watermark INTEGER,
    detail TEXT NOT NULL DEFAULT '',
    newest_data INTEGER,
    updated_at INTEGER
);

CREATE TABLE IF NOT EXISTS source_calls (
    minute INTEGER NOT NULL,
    name TEXT NOT NULL,
    calls INTEGER NOT NULL,
    PRIMARY KEY (minute, name)
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class Rollup:
    """How a fine table rolls up into its hourly table."""

    fine: str
    hour: str
    time_col: str
    time_scale: int
    """Fine-table time units per second (1 for seconds, 1000 for milliseconds)."""
    keys: tuple[str, ...]
    sums: tuple[str, ...]


USAGE_ROLLUP = Rollup(
    "usage",
    "usage_hour",
    "start",
    1,
    ("source", "provider", "model", *USAGE_DIMENSIONS, "priced"),
    _USAGE_SUMS,
)
GPU_ROLLUP = Rollup(
    "gpu",
    "gpu_hour",
    "ts",
    1000,
    ("source", "device", "name"),
    ("interval_ms", "cost_nano", "idle_cost_nano"),
)
INFERENCE_ROLLUP = Rollup(
    "inference",
    "inference_hour",
    "ts",
    1000,
    ("source", "endpoint", "kind"),
    ("interval_ms", "requests", "prompt_tokens", "generation_tokens"),
)


def _ms(when: datetime) -> int:
    if when.tzinfo is None:
        raise ValueError(f"naive datetime {when!r}: tokentop keeps time in UTC")
    return round(when.timestamp() * 1000)


class Store:
    """A tokentop database file.

    Safe to share between threads of one process (calls are serialised) and between processes
    (WAL: one writer, many readers). Open with ``readonly=True`` to guarantee a viewer never
    writes.

    Args:
        path: the database file; its folder is created when missing.
        readonly: open without write access (the file must exist).
    """

    def __init__(self, path: Path | str, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if readonly:
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=10)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
        conn.isolation_level = None
        self.conn = conn
        self.db = sqlite_utils.Database(conn)
        self._lock = threading.RLock()
        conn.execute("PRAGMA busy_timeout = 10000")
        if not readonly:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            self._migrate()

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _migrate(self) -> None:
        with self.transaction():
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self.conn.execute(statement)
            self.conn.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``), rolled back on any error."""
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        """Run a read query and return its rows (each row indexable by name)."""
        with self._lock:
            cursor = self.conn.cursor()
            cursor.row_factory = sqlite3.Row
            return cursor.execute(sql, params).fetchall()

    def get_meta(self, key: str) -> str | None:
        """A value from the ``meta`` table."""
        rows = self.query("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0]["value"]) if rows else None

    def set_meta(self, key: str, value: str) -> None:
        """Set a value in the ``meta`` table."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO meta(key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def write_batch(self, batch: Batch) -> None:
        """Write everything one poll produced, in one transaction."""
        with self.transaction() as conn:
            self._write_usage(conn, batch)
            self._write_billed(conn, batch)
            self._write_timed(conn, GPU_ROLLUP, [_gpu_row(s) for s in batch.gpu])
            self._write_timed(conn, INFERENCE_ROLLUP, [_inference_row(s) for s in batch.inference])
            self._write_requests(conn, batch.requests)

    def write_usage(self, buckets: Iterable[UsageBucket]) -> None:
        """Upsert usage buckets (each replaces the bucket with the same key)."""
        self.write_batch(Batch(usage=tuple(buckets)))

    def _write_usage(self, conn: sqlite3.Connection, batch: Batch) -> None:
        touched: dict[str, tuple[int, int]] = {}

        def touch(source: str, lo: int, hi: int) -> None:
            old = touched.get(source)
            touched[source] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))

        for window in batch.windows:
            lo, hi = to_epoch(window.start), to_epoch(window.end)
            conn.execute(
                "DELETE FROM usage WHERE start >= ? AND start < ? AND source = ? AND width = ?",
                (lo, hi, window.source, window.width_s),
            )
            touch(window.source, lo, hi - 1)
        if batch.usage:
            columns = (
                "start",
                "source",
                "width",
                "provider",
                "model",
                *USAGE_DIMENSIONS,
                *_USAGE_SUMS,
                "priced",
                "price_ref",
            )
            rows = []
            for b in batch.usage:
                start = to_epoch(b.start)
                rows.append(
                    (
                        start,
                        b.source,
                        b.width_s,
                        b.provider,
                        b.model,
                        b.project,
                        b.api_key,
                        b.workspace,
                        b.tag,
                        b.service_tier,
                        b.batch,
                        b.context_window,
                        b.input_uncached,
                        b.cache_read,
                        b.cache_write_5m,
                        b.cache_write_1h,
                        b.output,
                        b.requests,
                        b.web_searches,
                        b.cost_nano,
                        int(b.priced),
                        b.price_ref,
                    )
                )
                touch(b.source, start, start)
            conn.executemany(
                f"INSERT OR REPLACE INTO usage ({', '.join(columns)}) "
                f"VALUES ({', '.join('?' * len(columns))})",
                rows,
            )
        for source, (lo, hi) in touched.items():
            _refresh_rollup(conn, USAGE_ROLLUP, source, lo, hi)

    def _write_billed(self, conn: sqlite3.Connection, batch: Batch) -> None:
        for source, start, end in batch.billed_days:
            conn.execute(
                "DELETE FROM billed WHERE day >= ? AND day < ? AND source = ?",
                (to_epoch(start), to_epoch(end), source),
            )
        conn.executemany(
            "INSERT OR REPLACE INTO billed (day, source, provider, project, line_item, workspace,"
            " amount_nano, currency) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [_billed_row(b) for b in batch.billed],
        )

    def _write_timed(
        self, conn: sqlite3.Connection, rollup: Rollup, rows: list[dict[str, Any]]
    ) -> None:
        if not rows:
            return
        columns = list(rows[0])
        conn.executemany(
            f"INSERT OR REPLACE INTO {rollup.fine} ({', '.join(columns)}) "
            f"VALUES ({', '.join('?' * len(columns))})",
            [tuple(r.values()) for r in rows],
        )
        spans: dict[str, tuple[int, int]] = {}
        for r in rows:
            t = r[rollup.time_col] // rollup.time_scale
            old = spans.get(r["source"])
            spans[r["source"]] = (t, t) if old is None else (min(old[0], t), max(old[1], t))
        for source, (lo, hi) in spans.items():
            _refresh_rollup(conn, rollup, source, lo, hi)

    def _write_requests(self, conn: sqlite3.Connection, requests: Sequence[MeteredRequest]) -> None:
        """Store metered requests, and rebuild the one-minute usage buckets of their minutes.

        Metered requests appear in every usage query (report, panes) as the source's
        one-minute buckets, tagged; the buckets are derived from the request rows, so writing the
        same request twice (same ``request_id``) changes nothing.
        """
        if not requests:
            return
        conn.executemany(
            "INSERT OR REPLACE INTO request (ts, source, request_id, provider, model,"
            " input_uncached, cache_read, cache_write_5m, cache_write_1h, output, web_searches,"
            " cost_nano, priced, price_ref, latency_ms, status, tag, estimated)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    _ms(r.ts),
                    r.source,
                    r.request_id or f"{_ms(r.ts)}-{i}",
                    r.provider,
                    r.model,
                    r.input_uncached,
                    r.cache_read,
                    r.cache_write_5m,
                    r.cache_write_1h,
                    r.output,
                    r.web_searches,
                    r.cost_nano,
                    int(r.priced),
                    r.price_ref,
                    r.latency_ms,
                    r.status,
                    r.tag,
                    int(r.estimated),
                )
                for i, r in enumerate(requests)
            ],
        )
        spans: dict[str, tuple[int, int]] = {}
        for r in requests:
            minute = _ms(r.ts) // 60_000 * 60
            old = spans.get(r.source)
            spans[r.source] = (
                (minute, minute) if old is None else (min(old[0], minute), max(old[1], minute))
            )
        for source, (lo, hi) in spans.items():
            conn.execute(
                "DELETE FROM usage WHERE start >= ? AND start <= ? AND source = ? AND width = 60",
                (lo, hi, source),
            )
            conn.execute(
                "INSERT INTO usage (start, source, width, provider, model, tag, input_uncached,"
                " cache_read, cache_write_5m, cache_write_1h, output, requests, web_searches,"
                " cost_nano, priced, price_ref)"
                " SELECT (ts / 60000) * 60 AS m, source, 60, provider, model, tag,"
                " SUM(input_uncached), SUM(cache_read), SUM(cache_write_5m), SUM(cache_write_1h),"
                " SUM(output), COUNT(*), SUM(web_searches), SUM(cost_nano), MIN(priced),"
                " MAX(price_ref) FROM request WHERE ts >= ? AND ts < ? AND source = ?"
                " GROUP BY m, source, provider, model, tag",
                (lo * 1000, (hi + 60) * 1000, source),
            )
            _refresh_rollup(conn, USAGE_ROLLUP, source, lo, hi)

    def rebuild_rollups(self) -> None:
        """Recompute every hourly rollup from the fine tables (after a bulk load)."""
        with self.transaction() as conn:
            for rollup in (USAGE_ROLLUP, GPU_ROLLUP, INFERENCE_ROLLUP):
                conn.execute(f"DELETE FROM {rollup.hour}")
                conn.execute(_rollup_insert(rollup, where=""))

    def get_watermark(self, source: str) -> datetime | None:
        """The watermark a source stored, or ``None`` before its first complete poll."""
        rows = self.query("SELECT watermark FROM source WHERE name = ?", (source,))
        if not rows or rows[0]["watermark"] is None:
            return None
        return from_epoch(rows[0]["watermark"])

    def record_health(self, health: SourceHealth, *, calls_delta: int = 0, now: datetime) -> None:
        """Upsert a source's health; ``calls_delta`` API calls are added to its counters."""

        def ts(value: datetime | None) -> int | None:
            return None if value is None else to_epoch(value)

        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO source (name, kind, state, last_success, last_error, last_error_at,"
                " lag_s, calls, watermark, detail, newest_data, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET kind = excluded.kind, state = excluded.state,"
                " last_success = coalesce(excluded.last_success, source.last_success),"
                " last_error = excluded.last_error,"
                " last_error_at = coalesce(excluded.last_error_at, source.last_error_at),"
                " lag_s = excluded.lag_s, calls = source.calls + ?,"
                " watermark = coalesce(excluded.watermark, source.watermark),"
                " detail = excluded.detail,"
                " newest_data = coalesce(excluded.newest_data, source.newest_data),"
                " updated_at = excluded.updated_at",
                (
                    health.name,
                    health.kind,
                    health.state,
                    ts(health.last_success),
                    health.last_error,
                    ts(health.last_error_at),
                    health.lag_s,
                    calls_delta,
                    ts(health.watermark),
                    health.detail,
                    ts(health.newest_data),
                    ts(now),
                    calls_delta,
                ),
            )
            if calls_delta:
                minute = to_epoch(now) // 60 * 60
                conn.execute(
                    "INSERT INTO source_calls (minute, name, calls) VALUES (?, ?, ?)"
                    " ON CONFLICT(minute, name) DO UPDATE SET calls = calls + excluded.calls",
                    (minute, health.name, calls_delta),
                )
                conn.execute("DELETE FROM source_calls WHERE minute < ?", (minute - 2 * HOUR,))


def _rollup_insert(rollup: Rollup, where: str) -> str:
    hour_expr = f"({rollup.time_col} / {rollup.time_scale * HOUR}) * {HOUR}"
    keys = ", ".join(rollup.keys)
    sums = ", ".join(f"SUM({c})" for c in rollup.sums)
    return (
        f"INSERT INTO {rollup.hour} (start, {keys}, {', '.join(rollup.sums)}) "
        f"SELECT {hour_expr} AS h, {keys}, {sums} FROM {rollup.fine} {where} "
        f"GROUP BY h, {keys}"
    )


def _refresh_rollup(
    conn: sqlite3.Connection, rollup: Rollup, source: str, lo: int, hi: int
) -> None:
    """Recompute the hours ``[lo, hi]`` (seconds) of one source's rollup."""
    h_lo = lo // HOUR * HOUR
    h_hi = hi // HOUR * HOUR + HOUR
    conn.execute(
        f"DELETE FROM {rollup.hour} WHERE start >= ? AND start < ? AND source = ?",
        (h_lo, h_hi, source),
    )
    scale = rollup.time_scale
    conn.execute(
        _rollup_insert(
            rollup,
            where=f"WHERE {rollup.time_col} >= {h_lo * scale} AND {rollup.time_col} < "
            f"{h_hi * scale} AND source = ?",
        ),
        (source,),
    )


def _billed_row(b: BilledCost) -> tuple[Any, ...]:
    return (
        to_epoch(b.day),
        b.source,
        b.provider,
        b.project,
        b.line_item,
        b.workspace,
        b.amount_nano,
        b.currency,
    )


def _gpu_row(s: GpuSample) -> dict[str, Any]:
    return {
        "ts": _ms(s.ts),
        "source": s.source,
        "device": s.device,
        "name": s.name,
        "idx": s.index,
        "interval_ms": round(s.interval_s * 1000),
        "util_pct": s.util_pct,
        "mem_used_bytes": s.mem_used_bytes,
        "mem_total_bytes": s.mem_total_bytes,
        "power_mw": s.power_mw,
        "energy_mj": s.energy_mj,
        "temp_c": s.temp_c,
        "cost_nano": s.cost_nano,
        "idle_cost_nano": s.idle_cost_nano,
        "cost_ref": s.cost_ref,
    }


def _inference_row(s: InferenceSample) -> dict[str, Any]:
    return {
        "ts": _ms(s.ts),
        "source": s.source,
        "endpoint": s.endpoint,
        "kind": s.kind,
        "interval_ms": round(s.interval_s * 1000),
        "requests": s.requests,
        "prompt_tokens": s.prompt_tokens,
        "generation_tokens": s.generation_tokens,
        "devices": ",".join(s.devices),
    }

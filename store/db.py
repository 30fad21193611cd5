"""The SQLite store: schema, idempotent batch writes, usage rollups and source health.

One writer process and any number of readers share a file in WAL mode. Every batch is written in
one transaction. A usage bucket's dimensions (source, provider, model, project, ...) are stored
once, as a row of the small ``series`` table; ``usage`` is keyed on ``(start, series_id, width)``.
A poll that says it re-read a window (:class:`~tokentop.store.records.UsageWindow`) replaces that
window, so re-polling never counts twice. Usage is rolled up by hour and by UTC day, GPU and
inference samples by hour, all kept in step on every write, so that long windows are summed from a
few thousand rows instead of millions.
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

from tokentop.store.records import (
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

SCHEMA_VERSION = 2
"""1: one wide ``usage`` table keyed on every dimension. 2: ``series`` ids, ``usage_day``."""
HOUR = 3600
DAY = 86400

SERIES_COLUMNS: tuple[str, ...] = ("source", "provider", "model", *USAGE_DIMENSIONS)
"""What identifies a series (and what ``usage_rows`` exposes of it), in this order."""
_SERIES = ", ".join(SERIES_COLUMNS)
_DIM_COLUMNS = ",\n    ".join(f"{d} TEXT NOT NULL DEFAULT ''" for d in USAGE_DIMENSIONS)
USAGE_SUMS: tuple[str, ...] = (
    "input_uncached",
    "cache_read",
    "cache_write_5m",
    "cache_write_1h",
    "output",
    "requests",
    "web_searches",
    "cost_nano",
)
"""The summed columns of ``usage`` and of its rollups."""
_SUMS = ", ".join(USAGE_SUMS)
_SUM_COLUMNS = ",\n    ".join(f"{c} INTEGER NOT NULL DEFAULT 0" for c in USAGE_SUMS)


def _usage_rollup_ddl(table: str) -> str:
    return f"""
CREATE TABLE IF NOT EXISTS {table} (
    start INTEGER NOT NULL,
    series_id INTEGER NOT NULL,
    priced INTEGER NOT NULL,
    {_SUM_COLUMNS},
    PRIMARY KEY (start, series_id, priced)
) WITHOUT ROWID;
"""


SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    {_DIM_COLUMNS},
    UNIQUE ({_SERIES})
);

CREATE TABLE IF NOT EXISTS usage (
    start INTEGER NOT NULL,
    series_id INTEGER NOT NULL,
    width INTEGER NOT NULL,
    {_SUM_COLUMNS},
    priced INTEGER NOT NULL,
    price_ref TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (start, series_id, width)
) WITHOUT ROWID;
{_usage_rollup_ddl("usage_hour")}
{_usage_rollup_ddl("usage_day")}

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
    """How a fine millisecond table (``gpu``, ``inference``) rolls up into its hourly table."""

    fine: str
    hour: str
    time_col: str
    time_scale: int
    """Fine-table time units per second (1 for seconds, 1000 for milliseconds)."""
    keys: tuple[str, ...]
    sums: tuple[str, ...]


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


class StoreError(ValueError):
    """The database file cannot be used as it is (e.g. an older schema opened read-only)."""


_SERIES_INSERT = (
    f"INSERT INTO series ({_SERIES}) VALUES ({', '.join('?' * len(SERIES_COLUMNS))})"
    " ON CONFLICT DO NOTHING"
)
_SERIES_SELECT = f"SELECT id FROM series WHERE {' AND '.join(f'{c} = ?' for c in SERIES_COLUMNS)}"
_USAGE_INSERT = (
    f"INSERT OR REPLACE INTO usage (start, series_id, width, {_SUMS}, priced, price_ref)"
    f" VALUES ({', '.join('?' * (len(USAGE_SUMS) + 5))})"
)
_OF_SOURCE = "series_id IN (SELECT id FROM series WHERE source = ?)"
"""A source's series (the series table is small; its unique index starts with ``source``)."""


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
        self._series: dict[tuple[Any, ...], int] = {}
        """Series ids by :data:`SERIES_COLUMNS` values; ids never change once assigned."""
        try:
            conn.execute("PRAGMA busy_timeout = 10000")
            if readonly:
                self._check_version()
            else:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
                self._migrate()
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _schema_version(self) -> int | None:
        """The file's schema version; ``None`` for a new file."""
        conn = self.conn
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone():
            return None
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return None if row is None else int(row[0])

    def _is_v1(self) -> bool:
        """Whether the file holds version 1's wide ``usage`` table (dimensions as columns)."""
        columns = {r[1] for r in self.conn.execute("PRAGMA table_info(usage)")}
        return "source" in columns

    def _check_version(self) -> None:
        version = self._schema_version()
        if version is not None and version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: database schema version {version} is newer than this tokentop"
                f" understands ({SCHEMA_VERSION}); upgrade tokentop"
            )
        if self.readonly and self._is_v1():
            raise StoreError(
                f"{self.path}: database schema version {version or 1} needs upgrading to"
                f" {SCHEMA_VERSION}; run any writer command once (e.g. `tokentop collect --once`)"
            )

    def _migrate(self) -> None:
        """Create the schema, or bring an older file up to date, in one transaction."""
        with self.transaction() as conn:
            self._check_version()  # inside the write lock: another writer may have migrated
            legacy = self._is_v1()
            if legacy:
                conn.execute("ALTER TABLE usage RENAME TO usage_v1")
                conn.execute("DROP TABLE IF EXISTS usage_hour")
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            if legacy:
                _migrate_v1_usage(conn)
            conn.execute(
                "INSERT INTO meta(key, value) VALUES ('schema_version', ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
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
                # Series ids assigned in this transaction are gone with it.
                self._series.clear()
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

    def _series_id(self, conn: sqlite3.Connection, key: tuple[Any, ...]) -> int:
        """The id of a series (:data:`SERIES_COLUMNS` values), assigned on first sight.

        Another process may assign ids to the same file: insert-if-missing, then read back.
        """
        sid = self._series.get(key)
        if sid is None:
            conn.execute(_SERIES_INSERT, key)
            row = conn.execute(_SERIES_SELECT, key).fetchone()
            if row is None:  # pragma: no cover - the insert either stored it or found it
                raise StoreError(f"series {key!r} could not be stored")
            sid = self._series[key] = int(row[0])
        return sid

    def _write_usage(self, conn: sqlite3.Connection, batch: Batch) -> None:
        touched: dict[str, tuple[int, int]] = {}

        def touch(source: str, lo: int, hi: int) -> None:
            old = touched.get(source)
            touched[source] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))

        for window in batch.windows:
            lo, hi = to_epoch(window.start), to_epoch(window.end)
            conn.execute(
                f"DELETE FROM usage WHERE start >= ? AND start < ? AND width = ? AND {_OF_SOURCE}",
                (lo, hi, window.width_s, window.source),
            )
            touch(window.source, lo, hi - 1)
        if batch.usage:
            ids = self._series
            rows = []
            spans: dict[str, list[int]] = {}
            for b in batch.usage:
                key = (
                    b.source,
                    b.provider,
                    b.model,
                    b.project,
                    b.api_key,
                    b.workspace,
                    b.tag,
                    b.service_tier,
                    b.batch,
                    b.context_window,
                )
                sid = ids.get(key)
                if sid is None:
                    sid = self._series_id(conn, key)
                start = to_epoch(b.start)
                rows.append(
                    (
                        start,
                        sid,
                        b.width_s,
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
                span = spans.get(b.source)
                if span is None:
                    spans[b.source] = [start, start]
                elif start < span[0]:
                    span[0] = start
                elif start > span[1]:
                    span[1] = start
            conn.executemany(_USAGE_INSERT, rows)
            for source, (lo, hi) in spans.items():
                touch(source, lo, hi)
        for source, (lo, hi) in touched.items():
            _refresh_usage_rollups(conn, source, lo, hi)

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
            minutes = conn.execute(
                "SELECT (ts / 60000) * 60 AS m, provider, model, tag, SUM(input_uncached),"
                " SUM(cache_read), SUM(cache_write_5m), SUM(cache_write_1h), SUM(output),"
                " COUNT(*), SUM(web_searches), SUM(cost_nano), MIN(priced), MAX(price_ref)"
                " FROM request WHERE ts >= ? AND ts < ? AND source = ?"
                " GROUP BY m, provider, model, tag",
                (lo * 1000, (hi + 60) * 1000, source),
            ).fetchall()
            conn.execute(
                "DELETE FROM usage WHERE start >= ? AND start <= ? AND width = 60"
                f" AND {_OF_SOURCE}",
                (lo, hi, source),
            )
            conn.executemany(
                _USAGE_INSERT,
                [
                    (
                        m[0],
                        self._series_id(conn, (source, m[1], m[2], "", "", "", m[3], "", "", "")),
                        60,
                        *m[4:],
                    )
                    for m in minutes
                ],
            )
            _refresh_usage_rollups(conn, source, lo, hi)

    def rebuild_rollups(self) -> None:
        """Recompute every rollup from the fine tables (after a bulk load)."""
        with self.transaction() as conn:
            _rebuild_usage_rollups(conn)
            for rollup in (GPU_ROLLUP, INFERENCE_ROLLUP):
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


def _usage_rollup_insert(table: str, period: int, where: str) -> str:
    """Sum ``usage`` into hours (``usage_hour``) or ``usage_hour`` into UTC days (``usage_day``)."""
    source = "usage" if table == "usage_hour" else "usage_hour"
    sums = ", ".join(f"SUM({c})" for c in USAGE_SUMS)
    return (
        f"INSERT INTO {table} (start, series_id, priced, {_SUMS})"
        f" SELECT (start / {period}) * {period} AS p, series_id, priced, {sums} FROM {source}"
        f" {where} GROUP BY p, series_id, priced"
    )


_USAGE_ROLLUPS = (("usage_hour", HOUR), ("usage_day", DAY))
"""Each built from the one before: hours from ``usage``, days from hours."""


def _refresh_usage_rollups(conn: sqlite3.Connection, source: str, lo: int, hi: int) -> None:
    """Recompute the hours, then the UTC days, of one source's usage in ``[lo, hi]`` (seconds)."""
    for table, period in _USAGE_ROLLUPS:
        p_lo = lo // period * period
        p_hi = hi // period * period + period
        conn.execute(
            f"DELETE FROM {table} WHERE start >= ? AND start < ? AND {_OF_SOURCE}",
            (p_lo, p_hi, source),
        )
        conn.execute(
            _usage_rollup_insert(table, period, f"WHERE start >= ? AND start < ? AND {_OF_SOURCE}"),
            (p_lo, p_hi, source),
        )


def _rebuild_usage_rollups(conn: sqlite3.Connection) -> None:
    for table, period in _USAGE_ROLLUPS:
        conn.execute(f"DELETE FROM {table}")
        conn.execute(_usage_rollup_insert(table, period, ""))


def _migrate_v1_usage(conn: sqlite3.Connection) -> None:
    """Move version 1's wide ``usage`` (renamed ``usage_v1``) into ``series`` and ``usage``."""
    conn.execute(
        f"INSERT OR IGNORE INTO series ({_SERIES})"
        f" SELECT DISTINCT {_SERIES} FROM usage_v1 ORDER BY {_SERIES}"
    )
    on = " AND ".join(f"s.{c} = v.{c}" for c in SERIES_COLUMNS)
    copied = conn.execute(
        f"INSERT INTO usage (start, series_id, width, {_SUMS}, priced, price_ref)"
        f" SELECT v.start, s.id, v.width, {', '.join(f'v.{c}' for c in USAGE_SUMS)},"
        f" v.priced, v.price_ref FROM usage_v1 AS v JOIN series AS s ON {on}"
    ).rowcount
    (stored,) = conn.execute("SELECT COUNT(*) FROM usage_v1").fetchone()
    if copied != stored:  # pragma: no cover - every row has exactly one series
        raise StoreError(f"migration copied {copied} of {stored} usage rows; nothing was changed")
    conn.execute("DROP TABLE usage_v1")
    _rebuild_usage_rollups(conn)


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
    """Recompute the hours ``[lo, hi]`` (seconds) of one source's GPU or inference rollup."""
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

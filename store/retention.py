"""Retention: one-minute data for weeks, hourly for about a year, daily forever.

Compaction folds, behind a horizon, many rows into few *in the tables that hold them*, so every
rollup stays a function of its base table and every query reads folded rows as it reads any:

- ``usage``: the buckets finer than an hour that start before the minutes horizon
  (``now - minutes_days``, a whole hour) become one bucket per series and hour, and those finer
  than a day before the hours horizon (a UTC midnight) one per series and day. A folded bucket
  starts at its first minute with data and is as wide as the data it holds (so a window that
  starts before the first minute of a history still counts all of it). An hour whose buckets
  were priced by different rules (``priced``, ``price_id``) is left as it is: folding it would
  lose which part was unpriced.
- GPU and inference samples (``gpu``, ``inference``) and metered requests (``request``) before
  the minutes horizon are deleted: their hours are in ``gpu_hour`` and ``inference_hour``, and
  the requests' minutes are usage buckets of their source, folded like the others. Behind the
  hours horizon an hourly GPU or inference row becomes one per device (endpoint) and day.
- Billed costs are daily already, and the daily rollups are kept forever.

Each step is one transaction over a bounded slice (at most ``max_rows`` buckets, at most a day),
so a writer waits for at most one step and readers (WAL) never wait. ``meta`` keeps the
horizons (:data:`~tokentop.store.db.MINUTES_BEFORE`, :data:`~tokentop.store.db.HOURS_BEFORE`),
which the store's writes and :func:`~tokentop.store.queries.resolution` read, and where the
next step starts.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tokentop.store.db import (
    DAY,
    GPU_ROLLUP,
    HOUR,
    HOURS_BEFORE,
    HOURS_CURSOR,
    INFERENCE_ROLLUP,
    MINUTES_BEFORE,
    MINUTES_CURSOR,
    USAGE_SUMS,
    Rollup,
    Store,
    refresh_usage_rollups,
)
from tokentop.store.records import from_epoch
from tokentop.store.retention_policy import Retention as Retention  # its home before; still here

MAX_ROWS = 50_000
"""Buckets one compaction step reads at most (a step holds the write lock while it runs)."""
_DEFAULT = Retention()


@dataclass(frozen=True, slots=True)
class Step:
    """One compaction step: a slice of time folded at one level, in one transaction."""

    level: str
    """``minutes`` (folded into hours) or ``hours`` (folded into days)."""
    start: datetime
    end: datetime
    rows_before: int
    """``usage`` rows in the slice before the step."""
    rows_after: int
    samples_deleted: int
    """GPU and inference samples and metered requests deleted (their hours are kept)."""
    seconds: float

    def describe(self) -> str:
        """One line for a log or the command line."""
        return (
            f"{self.level} {self.start:%Y-%m-%d %H:%M} .. {self.end:%Y-%m-%d %H:%M}: usage rows"
            f" {self.rows_before:,} -> {self.rows_after:,}, samples deleted"
            f" {self.samples_deleted:,} ({self.seconds * 1000:.0f} ms)"
        )


def _meta(conn: sqlite3.Connection) -> dict[str, int]:
    keys = (MINUTES_BEFORE, HOURS_BEFORE, MINUTES_CURSOR, HOURS_CURSOR)
    rows = conn.execute(
        f"SELECT key, value FROM meta WHERE key IN ({', '.join('?' * len(keys))})", keys
    ).fetchall()
    return {k: int(v) for k, v in rows}


def _set(conn: sqlite3.Connection, values: dict[str, int]) -> None:
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)"
        " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [(k, str(v)) for k, v in values.items()],
    )


def _first(conn: sqlite3.Connection, queries: list[tuple[str, tuple[Any, ...]]]) -> int | None:
    """The smallest of some ``MIN(...)`` queries (seconds), ``None`` when all are empty."""
    found = [row[0] for sql, params in queries if (row := conn.execute(sql, params).fetchone())]
    values = [int(v) for v in found if v is not None]
    return min(values) if values else None


def _fold_usage(conn: sqlite3.Connection, lo: int, hi: int, cell: int) -> None:
    """Fold the buckets narrower than ``cell`` in ``[lo, hi)`` into one per series and cell."""
    sums = ", ".join(USAGE_SUMS)
    conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS fold (cell INTEGER NOT NULL, series_id INTEGER NOT NULL,"
        " start INTEGER NOT NULL, origin_id INTEGER NOT NULL, width INTEGER NOT NULL,"
        f" {', '.join(f'{c} INTEGER NOT NULL' for c in USAGE_SUMS)}, priced INTEGER NOT NULL,"
        " price_id INTEGER NOT NULL, PRIMARY KEY (cell, series_id)) WITHOUT ROWID"
    )
    conn.execute("DELETE FROM temp.fold")
    conn.execute(
        f"INSERT INTO temp.fold (cell, series_id, start, origin_id, width, {sums}, priced,"
        f" price_id) SELECT (start / {cell}) * {cell} AS c, series_id, MIN(start),"
        f" MIN(origin_id), MAX(start + width) - MIN(start),"
        f" {', '.join(f'SUM({c})' for c in USAGE_SUMS)}, MIN(priced), MIN(price_id)"
        f" FROM usage WHERE start >= ? AND start < ? AND width < {cell}"
        " GROUP BY c, series_id"
        " HAVING COUNT(*) > 1 AND MIN(priced) = MAX(priced) AND MIN(price_id) = MAX(price_id)",
        (lo, hi),
    )
    # A bucket as wide as the cell with the same key (a provider's own hourly bucket) stays
    # as it is, and so do the buckets that would have been folded on top of it.
    conn.execute(
        "DELETE FROM temp.fold WHERE EXISTS (SELECT 1 FROM usage AS u WHERE u.start = fold.start"
        " AND u.origin_id = fold.origin_id AND u.series_id = fold.series_id"
        f" AND u.width = fold.width AND u.width >= {cell})"
    )
    conn.execute(
        f"DELETE FROM usage WHERE start >= ? AND start < ? AND width < {cell}"
        " AND EXISTS (SELECT 1 FROM temp.fold AS f"
        f" WHERE f.cell = (usage.start / {cell}) * {cell} AND f.series_id = usage.series_id)",
        (lo, hi),
    )
    conn.execute(
        f"INSERT INTO usage (start, origin_id, series_id, width, {sums}, priced, price_id)"
        f" SELECT start, origin_id, series_id, width, {sums}, priced, price_id FROM temp.fold"
    )


def _fold_hourly(conn: sqlite3.Connection, rollup: Rollup, lo: int, hi: int) -> None:
    """Fold the hourly rows of a GPU or inference rollup in one UTC day ``[lo, hi)`` into one
    per key, starting at its first hour."""
    keys = ", ".join(rollup.keys)
    rows = conn.execute(
        f"SELECT MIN(start), {keys}, {', '.join(f'SUM({c})' for c in rollup.sums)}"
        f" FROM {rollup.hour} WHERE start >= ? AND start < ? GROUP BY {keys}"
        " HAVING COUNT(*) > 1",
        (lo, hi),
    ).fetchall()
    match = " AND ".join(f"{k} = ?" for k in rollup.keys)
    conn.executemany(
        f"DELETE FROM {rollup.hour} WHERE start >= ? AND start < ? AND {match}",
        [(lo, hi, *r[1 : 1 + len(rollup.keys)]) for r in rows],
    )
    columns = ("start", *rollup.keys, *rollup.sums)
    conn.executemany(
        f"INSERT INTO {rollup.hour} ({', '.join(columns)})"
        f" VALUES ({', '.join('?' * len(columns))})",
        rows,
    )


def _delete_samples(conn: sqlite3.Connection, lo: int, hi: int) -> int:
    """Delete the GPU and inference samples and metered requests of ``[lo, hi)``.

    An hourly row first moves its start to its first sample's time (still in its hour), as a
    folded bucket starts at its first minute: a window that starts before a history still counts
    all of it."""
    for rollup in (GPU_ROLLUP, INFERENCE_ROLLUP):
        match = " AND ".join(f"f.{k} = {rollup.hour}.{k}" for k in rollup.keys)
        conn.execute(
            f"UPDATE {rollup.hour} SET start = coalesce((SELECT MIN(f.ts) / 1000"
            f" FROM {rollup.fine} AS f WHERE f.ts >= {rollup.hour}.start * 1000"
            f" AND f.ts < ({rollup.hour}.start + {HOUR}) * 1000 AND {match}), start)"
            f" WHERE start >= ? AND start < ? AND start % {HOUR} = 0",
            (lo, hi),
        )
    deleted = 0
    for table, column in (("gpu", "ts"), ("inference", "ts"), ("request", "ts")):
        deleted += conn.execute(
            f"DELETE FROM {table} WHERE {column} >= ? AND {column} < ?", (lo * 1000, hi * 1000)
        ).rowcount
    return deleted


def _count(conn: sqlite3.Connection, lo: int, hi: int) -> int:
    row = conn.execute("SELECT COUNT(*) FROM usage WHERE start >= ? AND start < ?", (lo, hi))
    return int(row.fetchone()[0])


def _advance(
    conn: sqlite3.Connection, meta: dict[str, int], cursor_key: str, before_key: str, to: int
) -> None:
    """Move a level's cursor to ``to``, and its horizon with it (a horizon never moves back)."""
    _set(conn, {cursor_key: to, before_key: max(meta.get(before_key, 0), to)})


def _folded(
    conn: sqlite3.Connection, level: str, lo: int, hi: int, before: int, deleted: int, began: float
) -> Step:
    """The step that folded ``[lo, hi)`` at ``level``, begun at ``began`` (``perf_counter``)."""
    return Step(
        level,
        from_epoch(lo),
        from_epoch(hi),
        before,
        _count(conn, lo, hi),
        deleted,
        time.perf_counter() - began,
    )


def compact_step(
    store: Store, now: datetime, retention: Retention = _DEFAULT, max_rows: int = MAX_ROWS
) -> Step | None:
    """Run one compaction step (one transaction); ``None`` when there is nothing left to do."""
    began = time.perf_counter()
    target_minutes, target_hours = retention.horizons(now)
    with store.transaction() as conn:
        meta = _meta(conn)
        cursor = meta.get(MINUTES_CURSOR, 0)
        if cursor < target_minutes:
            first = _first(
                conn,
                [
                    (
                        "SELECT MIN(start) FROM usage WHERE start >= ? AND start < ?"
                        f" AND width < {HOUR}",
                        (cursor, target_minutes),
                    ),
                    *(
                        (
                            f"SELECT MIN(ts) / 1000 FROM {table} WHERE ts >= ? AND ts < ?",
                            (cursor * 1000, target_minutes * 1000),
                        )
                        for table in ("gpu", "inference", "request")
                    ),
                ],
            )
            if first is None:  # nothing finer than an hour left before the horizon
                _advance(conn, meta, MINUTES_CURSOR, MINUTES_BEFORE, target_minutes)
                return Step("minutes", from_epoch(cursor), from_epoch(target_minutes), 0, 0, 0, 0)
            lo = max(cursor, first // HOUR * HOUR)
            in_day = _count(conn, lo, lo + DAY)
            hours = 24 if in_day <= max_rows else max(1, 24 * max_rows // in_day)
            hi = min(target_minutes, lo + hours * HOUR)
            before = _count(conn, lo, hi)
            _fold_usage(conn, lo, hi, HOUR)
            refresh_usage_rollups(conn, lo, hi)
            deleted = _delete_samples(conn, lo, hi)
            _advance(conn, meta, MINUTES_CURSOR, MINUTES_BEFORE, hi)
            return _folded(conn, "minutes", lo, hi, before, deleted, began)
        cursor = meta.get(HOURS_CURSOR, 0)
        if cursor >= target_hours:
            return None
        first = _first(
            conn,
            [
                (
                    "SELECT MIN(start) FROM usage WHERE start >= ? AND start < ?"
                    f" AND width < {DAY}",
                    (cursor, target_hours),
                ),
                *(
                    (
                        f"SELECT MIN(start) FROM {r.hour} WHERE start >= ? AND start < ?",
                        (cursor, target_hours),
                    )
                    for r in (GPU_ROLLUP, INFERENCE_ROLLUP)
                ),
            ],
        )
        if first is None:
            _advance(conn, meta, HOURS_CURSOR, HOURS_BEFORE, target_hours)
            return Step("hours", from_epoch(cursor), from_epoch(target_hours), 0, 0, 0, 0)
        lo = max(cursor, first // DAY * DAY)
        hi = min(target_hours, lo + DAY)
        before = _count(conn, lo, hi)
        _fold_usage(conn, lo, hi, DAY)
        refresh_usage_rollups(conn, lo, hi)
        for rollup in (GPU_ROLLUP, INFERENCE_ROLLUP):
            _fold_hourly(conn, rollup, lo, hi)
        deleted = _delete_samples(conn, lo, hi)
        _advance(conn, meta, HOURS_CURSOR, HOURS_BEFORE, hi)
        return _folded(conn, "hours", lo, hi, before, deleted, began)


def compact(
    store: Store,
    now: datetime,
    retention: Retention = _DEFAULT,
    *,
    max_rows: int = MAX_ROWS,
    on_step: Callable[[Step], None] | None = None,
) -> list[Step]:
    """Compact until nothing is left to do; returns the steps (each its own transaction)."""
    steps: list[Step] = []
    while (step := compact_step(store, now, retention, max_rows)) is not None:
        steps.append(step)
        if on_step is not None:
            on_step(step)
    return steps


@dataclass(frozen=True, slots=True)
class TableInfo:
    """Rows, bytes and time range of one table (or of one resolution of ``usage``)."""

    name: str
    rows: int
    bytes: int | None
    """Pages used, from SQLite's ``dbstat`` (``None`` where the build lacks it)."""
    first: datetime | None
    last: datetime | None


@dataclass(frozen=True, slots=True)
class DatabaseInfo:
    """What ``tokentop db info`` prints."""

    path: Path
    file_bytes: int
    free_bytes: int
    """Pages freed (by compaction) that new writes reuse before the file grows again."""
    tables: list[TableInfo]
    usage_by_width: list[TableInfo]
    """``usage`` per resolution kept: ``1m`` (one-minute buckets, since the minutes horizon),
    ``1h`` (one bucket per series and hour at most, up to it), ``1d`` (per series and day,
    before the hours horizon)."""
    minutes_before: datetime | None
    hours_before: datetime | None
    extra: dict[str, Any] = field(default_factory=dict)


_TIMED = {
    "usage": "start",
    "usage_hour": "start",
    "usage_day": "start",
    "usage_total": "start",
    "usage_total_hour": "start",
    "usage_total_day": "start",
    "usage_model_hour": "start",
    "usage_model_day": "start",
    "usage_group_hour": "start",
    "usage_group_day": "start",
    "billed": "day",
    "gpu": "ts",
    "gpu_hour": "start",
    "inference": "ts",
    "inference_hour": "start",
    "request": "ts",
}
"""Tables with a time column, and it (``ts`` in milliseconds)."""


def _when(value: Any, column: str) -> datetime | None:
    if value is None:
        return None
    return from_epoch(value / 1000 if column == "ts" else value)


def database_info(store: Store) -> DatabaseInfo:
    """Sizes and time ranges per table and per resolution (reads every row: seconds on a large
    file)."""
    sizes: dict[str, int] | None
    try:
        sizes = {
            r[0]: int(r[1])
            for r in store.query("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name")
        }
    except sqlite3.Error:
        sizes = None
    names = [
        r[0]
        for r in store.query(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            " ORDER BY name"
        )
    ]
    tables = []
    for name in names:
        column = _TIMED.get(name)
        if column is None:
            rows, first, last = store.query(f"SELECT COUNT(*), NULL, NULL FROM {name}")[0]
        else:
            rows, first, last = store.query(
                f"SELECT COUNT(*), MIN({column}), MAX({column}) FROM {name}"
            )[0]
        size = None if sizes is None else sizes.get(name, 0)
        tables.append(
            TableInfo(name, int(rows), size, _when(first, column or ""), _when(last, column or ""))
        )
    meta = {
        r[0]: int(r[1])
        for r in store.query(
            "SELECT key, value FROM meta WHERE key IN (?, ?)", (MINUTES_BEFORE, HOURS_BEFORE)
        )
    }
    minutes, hours = meta.get(MINUTES_BEFORE), meta.get(HOURS_BEFORE)
    by_width = [
        TableInfo(r[0], int(r[1]), None, _when(r[2], "start"), _when(r[3], "start"))
        for r in store.query(
            "SELECT CASE WHEN start >= ? THEN '1m' WHEN start >= ? THEN '1h' ELSE '1d' END AS w,"
            " COUNT(*), MIN(start), MAX(start) FROM usage GROUP BY w ORDER BY MIN(start) DESC",
            (minutes or 0, hours or 0),
        )
    ]
    page_size = int(store.query("PRAGMA page_size")[0][0])
    free = int(store.query("PRAGMA freelist_count")[0][0]) * page_size
    files = [store.path, store.path.with_name(store.path.name + "-wal")]
    file_bytes = sum(p.stat().st_size for p in files if p.exists())
    return DatabaseInfo(
        path=store.path,
        file_bytes=file_bytes,
        free_bytes=free,
        tables=tables,
        usage_by_width=by_width,
        minutes_before=None if minutes is None else from_epoch(minutes),
        hours_before=None if hours is None else from_epoch(hours),
    )

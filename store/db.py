"""The SQLite store: schema, idempotent batch writes, usage rollups and source health.

One writer process and any number of readers share a file in WAL mode. Every batch is written in
one transaction. A usage bucket's dimensions (source, provider, model, project, ...) are stored
once, as a row of the small ``series`` table, and its price reference once in ``price``;
``usage`` is keyed on ``(start, origin_id, series_id, width)`` (the origin, a function of the
series, clusters each minute's buckets by source and provider).
A poll that says it re-read a window (:class:`~tokentop.store.records.UsageWindow`) replaces that
window, so re-polling never counts twice. Usage is rolled up by hour and by UTC day, GPU and
inference samples by hour, all kept in step on every write, so that long windows are summed from a
few thousand rows instead of millions.

Totals over series are rolled up too, per bucket start, hour and UTC day, so that a figure summed
over every series reads as many rows whether the organisation has 40 series or 4,000:

- ``usage_model_hour`` and ``usage_model_day``: per *stream* (a source's model at a provider:
  ``stream`` and ``origin`` ids), for the Model mix and cost by model over long windows;
- ``usage_total*``: per *origin* (a source at a provider), for totals, burn rates and the spend
  chart. An origin is the unit the "counted" scope decides on (a metered provider that an admin
  source covers), so the scopes still apply to these totals, decided when they are read;
- ``usage_group_hour`` and ``usage_group_day``: per project, API key and tag (and origin), for
  the grouped tables over long windows.

They keep priced and unpriced usage in one row (:data:`SUMMED`: the unpriced tokens and requests
counted apart). A write that only adds buckets where its source had none (a backfill, a new
minute) adds their sums, taken in the loop that builds the rows, into the two rollups read
straight from ``usage`` (per series and hour, per origin and start); any other write recomputes
those over the hours it touched. Every other rollup is recomputed from those two.

Retention (:mod:`tokentop.store.retention`) folds one-minute buckets older than a horizon into one
bucket per series and hour (then hours into UTC days) *in* ``usage`` itself: a folded bucket
starts at its first minute with data and is as wide as the data it holds, so every rollup stays a
function of ``usage`` and a window counts a folded bucket by its start, as it does any bucket.
Writes that reach behind the horizon (``meta`` ``retention.minutes_before``) land in settled
cells: a window still replaces what it wholly covers, and a bucket whose minute is inside a
folded bucket of its series is left out (the folded figures stand; counting it again could count
it twice).
"""

from __future__ import annotations

import operator
import sqlite3
import stat
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import Any

import sqlite_utils

from tokentop.store.readonly import connect_readonly
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

SCHEMA_VERSION = 3
"""1: one wide ``usage`` table keyed on every dimension. 2: ``series`` ids, ``usage_day``
(later given ``source.interval_s``, a nullable column added in place: older versions read and
write such a file unchanged, so the version stays). 3: ``origin`` and ``stream`` ids
(``series.stream_id``), rollups summed over series (``usage_model*``, ``usage_total*``), per-group
rollups (``usage_group_*``) and retention (folded buckets, horizons in ``meta``)."""
HOUR = 3600
DAY = 86400
GROUP_DIMENSIONS: tuple[str, ...] = ("project", "api_key", "tag")
"""Dimensions with their own hourly and daily rollups (``usage_group_*``); the model has its own
tables (``usage_model*``)."""
MINUTES_BEFORE = "retention.minutes_before"
"""``meta`` key: usage finer than an hour, GPU and inference samples and metered requests that
start before this (Unix seconds, a whole hour) have been folded into hours (or dropped, their
hours kept). Absent until the first compaction."""
HOURS_BEFORE = "retention.hours_before"
"""``meta`` key: usage finer than a day and hourly GPU and inference rows before this (a UTC
midnight) have been folded into days."""
MINUTES_CURSOR = "retention.minutes_cursor"
"""``meta`` key: where the next minute-level compaction starts; a write behind the horizon moves
it back so that what it wrote is folded too."""
HOURS_CURSOR = "retention.hours_cursor"
"""``meta`` key: where the next hour-level compaction starts."""

SERIES_COLUMNS: tuple[str, ...] = ("source", "provider", "model", *USAGE_DIMENSIONS)
"""What identifies a series (and what ``usage_rows`` exposes of it), in this order."""
_SERIES = ", ".join(SERIES_COLUMNS)
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
SUMMED: tuple[str, ...] = (*USAGE_SUMS, "unpriced_tokens", "unpriced_requests")
"""The columns of the rollups summed over series (``usage_total*``, ``usage_model*``,
``usage_group_*``): priced and unpriced usage share a row, the unpriced part counted apart (a
``priced`` key column would make the per-start rollup a sort instead of an ordered scan)."""
_SUMMED_COLUMNS = ",\n    ".join(f"{c} INTEGER NOT NULL DEFAULT 0" for c in SUMMED)


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


def _summed_ddl(table: str, *keys: str) -> str:
    return f"""
CREATE TABLE IF NOT EXISTS {table} (
    start INTEGER NOT NULL,
    {"".join(f"{k} INTEGER NOT NULL, " for k in keys)}
    {_SUMMED_COLUMNS},
    PRIMARY KEY (start, {", ".join(keys)})
) WITHOUT ROWID;
"""


def _group_rollup_ddl(table: str) -> str:
    # Keyed on the dimension first: a grouped query reads one contiguous range.
    return f"""
CREATE TABLE IF NOT EXISTS {table} (
    dim TEXT NOT NULL,
    start INTEGER NOT NULL,
    value TEXT NOT NULL,
    origin_id INTEGER NOT NULL,
    {_SUMMED_COLUMNS},
    PRIMARY KEY (dim, start, value, origin_id)
) WITHOUT ROWID;
"""


def _create_rowid_tables(db: sqlite_utils.Database) -> None:
    """Create the small rowid tables that are missing, through sqlite-utils' table API."""
    meta = db.table("meta")
    if not meta.exists():
        meta.create({"key": str, "value": str}, pk="key", not_null=["value"])
    series = db.table("series")
    if not series.exists():
        series.create(
            {"id": int, **dict.fromkeys(SERIES_COLUMNS, str), "stream_id": int},
            pk="id",
            not_null=SERIES_COLUMNS,
            defaults=dict.fromkeys(USAGE_DIMENSIONS, ""),
        )
        # A series is its dimensions: one id each (writes rely on it: ON CONFLICT DO NOTHING).
        series.create_index(SERIES_COLUMNS, index_name="series_key", unique=True)
    elif "stream_id" not in series.columns_dict:  # version 2: filled in by the migration
        series.add_column("stream_id", int)
    # An origin is a source at a provider; a stream, an origin's model. Both are small and their
    # ids never change, like series ids.
    origin = db.table("origin")
    if not origin.exists():
        origin.create(
            {"id": int, "source": str, "provider": str},
            pk="id",
            not_null=["source", "provider"],
        )
        origin.create_index(["source", "provider"], index_name="origin_key", unique=True)
    price = db.table("price")
    if not price.exists():
        # The rule that priced a bucket, stored once: the text is most of a bucket's bytes.
        price.create({"id": int, "ref": str}, pk="id", not_null=["ref"])
        price.create_index(["ref"], index_name="price_ref", unique=True)
    stream = db.table("stream")
    if not stream.exists():
        stream.create(
            {"id": int, "origin_id": int, "model": str},
            pk="id",
            not_null=["origin_id", "model"],
        )
        stream.create_index(["origin_id", "model"], index_name="stream_key", unique=True)
    source = db.table("source")
    if not source.exists():
        source.create(
            {
                "name": str,
                "kind": str,
                "state": str,
                "last_success": int,
                "last_error": str,
                "last_error_at": int,
                "lag_s": float,
                "calls": int,
                "watermark": int,
                "detail": str,
                "newest_data": int,
                "updated_at": int,
                "interval_s": float,
            },
            pk="name",
            not_null=["kind", "state", "last_error", "calls", "detail"],
            defaults={"kind": "", "state": "starting", "last_error": "", "calls": 0, "detail": ""},
        )


WITHOUT_ROWID_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS usage (
    start INTEGER NOT NULL,
    origin_id INTEGER NOT NULL,
    series_id INTEGER NOT NULL,
    width INTEGER NOT NULL,
    {_SUM_COLUMNS},
    priced INTEGER NOT NULL,
    price_id INTEGER NOT NULL,
    PRIMARY KEY (start, origin_id, series_id, width)
) WITHOUT ROWID;
{_usage_rollup_ddl("usage_hour")}
{_usage_rollup_ddl("usage_day")}
{_summed_ddl("usage_total", "origin_id")}
{_summed_ddl("usage_total_hour", "origin_id")}
{_summed_ddl("usage_total_day", "origin_id")}
{_summed_ddl("usage_model_hour", "stream_id")}
{_summed_ddl("usage_model_day", "stream_id")}
{_group_rollup_ddl("usage_group_hour")}
{_group_rollup_ddl("usage_group_day")}

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
CREATE INDEX IF NOT EXISTS billed_provider ON billed (provider);

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

CREATE TABLE IF NOT EXISTS source_calls (
    minute INTEGER NOT NULL,
    name TEXT NOT NULL,
    calls INTEGER NOT NULL,
    PRIMARY KEY (minute, name)
) WITHOUT ROWID;
"""
"""The tables keyed on their primary key alone (clustered, no rowid), as SQL: sqlite-utils'
``Table.create`` cannot make a ``WITHOUT ROWID`` table, and its ``transform`` would quietly turn
one into a rowid table (a second copy of every key, in an index)."""


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


def _enable_wal(db: sqlite_utils.Database, tries: int = 40) -> None:
    """WAL mode, retried: many processes opening a new file at once can see "database is
    locked" from the journal-mode switch, which does not always wait on the busy timeout."""
    for attempt in range(tries):
        try:
            db.enable_wal()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == tries - 1:
                raise
            time.sleep(0.05 + 0.01 * attempt)


class StoreError(ValueError):
    """The database file cannot be used as it is (e.g. an older schema opened read-only)."""


def _connect(path: Path, readonly: bool) -> sqlite3.Connection:
    """Open ``path``: read-only (``mode=ro``, the file must exist) or for writing (its folder is
    created). A path that cannot hold a database raises :class:`StoreError` (one line)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:  # a parent that is a file, a loop, no permission on a folder
        raise StoreError(f"{path}: cannot use as a database: {_reason(path, exc)}") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise StoreError(f"{path}: is a folder, not a database file")
    if mode is not None and not stat.S_ISREG(mode):
        # /dev/null, a FIFO, a socket: SQLite would fail later, or lose every write.
        raise StoreError(f"{path}: is not a regular file, cannot hold a database")
    try:
        if readonly:
            if mode is None:
                raise StoreError(f"no database at {path}")
            return connect_readonly(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return sqlite3.connect(path, check_same_thread=False, timeout=10)
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(_cannot_use(path, exc, readonly)) from None


def _reason(path: Path, exc: OSError) -> str:
    if isinstance(exc, FileExistsError | NotADirectoryError):
        for parent in reversed(path.parents):  # the topmost one that is not a folder
            if parent.exists() and not parent.is_dir():
                return f"{parent} is not a folder"
        return "a parent is not a folder"
    return exc.strerror or str(exc)


def _cannot_use(path: Path, exc: OSError | sqlite3.Error, readonly: bool) -> str:
    """One line saying why ``path`` cannot be opened (or used) as a database."""
    if isinstance(exc, OSError):
        return f"{path}: cannot use as a database: {_reason(path, exc)}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    if "readonly" in text.replace("read-only", "readonly") and not readonly:
        return f"{path}: cannot write the database ({text}; check the permissions)"
    if "not a database" in text or "malformed" in text:
        return f"{path}: not a usable SQLite database ({text})"
    return f"{path}: cannot {'read' if readonly else 'open'} the database ({text})"


_SERIES_INSERT = (
    f"INSERT INTO series ({_SERIES}, stream_id)"
    f" VALUES ({', '.join('?' * (len(SERIES_COLUMNS) + 1))}) ON CONFLICT DO NOTHING"
)
_SERIES_SELECT = f"SELECT id FROM series WHERE {' AND '.join(f'{c} = ?' for c in SERIES_COLUMNS)}"
_USAGE_INSERT = (
    f"INSERT OR REPLACE INTO usage (start, origin_id, series_id, width, {_SUMS}, priced,"
    f" price_id) VALUES ({', '.join('?' * (len(USAGE_SUMS) + 6))})"
)
_REQUEST_INSERT = (
    "INSERT INTO request (ts, source, request_id, provider, model, input_uncached, cache_read,"
    " cache_write_5m, cache_write_1h, output, web_searches, cost_nano, priced, price_ref,"
    " latency_ms, status, tag, estimated)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_USAGE_APPEND = _USAGE_INSERT.replace("INSERT OR REPLACE", "INSERT", 1)
_OF_SOURCE = "series_id IN (SELECT id FROM series WHERE source = ?)"
"""A source's series (the series table is small; its unique index starts with ``source``)."""
_BUCKET_KEY = attrgetter("source", "provider", "model", *USAGE_DIMENSIONS)
"""A bucket's :data:`SERIES_COLUMNS` values, in one C call."""
_BUCKET_VALUES = attrgetter("width_s", *USAGE_SUMS)
"""A bucket's ``usage`` columns after ``series_id`` and before ``priced``."""
_SECOND = itemgetter(1)
_OF_ORIGINS = "origin_id IN (SELECT id FROM origin WHERE source = ?)"
"""A source's origins (``usage`` is clustered on ``(start, origin_id)``)."""
_CELL = f"(CASE WHEN start < ? THEN {DAY} ELSE {HOUR} END)"
"""The width of the compaction cell of a row behind the horizon (``?``: the hours horizon)."""


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
        conn = _connect(self.path, readonly)
        conn.isolation_level = None
        self.conn = conn
        # Neither sqlite-utils' default PRAGMA recursive_triggers nor its plugins' connection hooks:
        # the connection stays as set up here (autocommit, transactions opened by this class).
        self.db = sqlite_utils.Database(conn, recursive_triggers=False, execute_plugins=False)
        """The same connection, through sqlite-utils: schema creation, migrations and WAL."""
        self._lock = threading.RLock()
        self._series: dict[tuple[Any, ...], int] = {}
        """Series ids by :data:`SERIES_COLUMNS` values; ids never change once assigned."""
        self._streams: dict[tuple[str, str, str], tuple[int, int]] = {}
        """Stream and origin ids by (source, provider, model)."""
        self._origins: dict[int, tuple[int, int]] = {}
        """(origin, stream) ids by series id (``usage`` is clustered on the origin)."""
        self._origin_sources: dict[int, str] = {}
        """Source names by origin id."""
        self._prices: dict[str, int] = {}
        """Price reference ids by text."""
        self.left_out = 0
        """Buckets, requests and samples this connection did not write because they reached into
        cells that retention had already folded (see the module's docstring)."""
        try:
            conn.execute("PRAGMA busy_timeout = 10000")
            if readonly:
                self._check_version()
            else:
                _enable_wal(self.db)
                conn.execute("PRAGMA synchronous = NORMAL")
                self._migrate()
        except sqlite3.Error as exc:
            # Not a database, a truncated one, a device, a read-only file for a writer: one
            # line naming the file, never a traceback.
            conn.close()
            raise StoreError(_cannot_use(self.path, exc, readonly)) from None
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
        if self.readonly and version is None and not self._is_v1():
            # A reader never creates a schema: an empty file stays empty.
            raise StoreError(
                f"{self.path}: not a tokentop database (no tokentop tables; `tokentop collect`"
                " creates them)"
            )
        if version is not None and version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: database schema version {version} is newer than this tokentop"
                f" understands ({SCHEMA_VERSION}); upgrade tokentop"
            )
        older = version is not None and version < SCHEMA_VERSION
        if self.readonly and (older or self._is_v1()):
            raise StoreError(
                f"{self.path}: database schema version {version or 1} needs upgrading to"
                f" {SCHEMA_VERSION}; run any writer command once (e.g. `tokentop collect --once`)"
            )

    def _migrate(self) -> None:
        """Create the schema, or bring an older file up to date, in one transaction."""
        with self.transaction() as conn:
            self._check_version()  # inside the write lock: another writer may have migrated
            version = self._schema_version()
            legacy = self._is_v1()
            if legacy:
                conn.execute("ALTER TABLE usage RENAME TO usage_v1")
                conn.execute("DROP TABLE IF EXISTS usage_hour")
            columns = {r[1] for r in conn.execute("PRAGMA table_info(usage)")}
            v2 = not legacy and "price_ref" in columns
            if v2:
                conn.execute("ALTER TABLE usage RENAME TO usage_v2")
            _create_rowid_tables(self.db)
            source = self.db.table("source")
            if "interval_s" not in source.columns_dict:  # each source's poll interval
                source.add_column("interval_s", float)
            for statement in WITHOUT_ROWID_SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            # Early version 3 files kept a per-stream rollup at bucket resolution; the
            # rollups summed over series are now read from ``usage`` itself.
            conn.execute("DROP TABLE IF EXISTS usage_model")
            if legacy:
                _migrate_v1_usage(conn)
            if v2:
                _migrate_v2_usage(conn)
            if legacy or v2 or (version is not None and version < SCHEMA_VERSION):
                # Version 3's rollups summed over series are built once from ``usage``.
                _rebuild_usage_rollups(conn)
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
                self._streams.clear()
                self._origins.clear()
                self._origin_sources.clear()
                self._prices.clear()
                raise
            self.conn.execute("COMMIT")

    @contextmanager
    def read_snapshot(self) -> Iterator[Store]:
        """Queries inside see one consistent state of the file (one read transaction, ``BEGIN
        DEFERRED`` to ``COMMIT``): a write committed meanwhile by another connection does not
        show up between two of them. Holds this connection's lock, so other threads using it
        wait; nests (an inner one joins the outer)."""
        with self._lock:
            if self.conn.in_transaction:
                yield self
                return
            self.conn.execute("BEGIN DEFERRED")
            try:
                yield self
            finally:
                if self.conn.in_transaction:
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
            stream, origin = self._stream_id(conn, key[0], key[1], key[2])
            conn.execute(_SERIES_INSERT, (*key, stream))
            row = conn.execute(_SERIES_SELECT, key).fetchone()
            if row is None:  # pragma: no cover - the insert either stored it or found it
                raise StoreError(f"series {key!r} could not be stored")
            sid = self._series[key] = int(row[0])
            self._origins[sid] = (origin, stream)
        return sid

    def _stream_id(
        self, conn: sqlite3.Connection, source: str, provider: str, model: str
    ) -> tuple[int, int]:
        """The ids of a source's model at a provider and of its origin (the source at the
        provider), assigned on first sight, as :meth:`_series_id`."""
        key = (source, provider, model)
        ids = self._streams.get(key)
        if ids is None:
            conn.execute(
                "INSERT INTO origin (source, provider) VALUES (?, ?) ON CONFLICT DO NOTHING",
                (source, provider),
            )
            (oid,) = conn.execute(
                "SELECT id FROM origin WHERE source = ? AND provider = ?", (source, provider)
            ).fetchone()
            conn.execute(
                "INSERT INTO stream (origin_id, model) VALUES (?, ?) ON CONFLICT DO NOTHING",
                (oid, model),
            )
            (tid,) = conn.execute(
                "SELECT id FROM stream WHERE origin_id = ? AND model = ?", (oid, model)
            ).fetchone()
            self._streams[key] = ids = (int(tid), int(oid))
            self._origin_sources[int(oid)] = source
        return ids

    def _price_id(self, conn: sqlite3.Connection, ref: str) -> int:
        """The id of a price reference, assigned on first sight (as :meth:`_series_id`)."""
        pid = self._prices.get(ref)
        if pid is None:
            conn.execute("INSERT INTO price (ref) VALUES (?) ON CONFLICT DO NOTHING", (ref,))
            (pid,) = conn.execute("SELECT id FROM price WHERE ref = ?", (ref,)).fetchone()
            self._prices[ref] = pid = int(pid)
        return pid

    def _horizons(self, conn: sqlite3.Connection) -> tuple[int, int]:
        """(minutes, hours) retention horizons in Unix seconds; 0 before any compaction."""
        found = dict(
            conn.execute(
                "SELECT key, value FROM meta WHERE key IN (?, ?)", (MINUTES_BEFORE, HOURS_BEFORE)
            ).fetchall()
        )
        return int(found.get(MINUTES_BEFORE, 0)), int(found.get(HOURS_BEFORE, 0))

    def _reopen(self, conn: sqlite3.Connection, start: int, hours: int) -> None:
        """Something was written behind the horizons at ``start``: the next compaction goes
        back there to fold it."""
        keys = [(MINUTES_CURSOR, start // HOUR * HOUR)]
        if start < hours:
            keys.append((HOURS_CURSOR, start // DAY * DAY))
        for key, value in keys:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE"
                " SET value = min(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))",
                (key, str(value)),
            )

    def _write_usage(self, conn: sqlite3.Connection, batch: Batch) -> None:
        if not batch.windows and not batch.usage:
            return
        touched: dict[str, tuple[int, int]] = {}

        def touch(source: str, lo: int, hi: int) -> None:
            old = touched.get(source)
            touched[source] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))

        minutes, hours = self._horizons(conn)
        replaced: set[str] = set()
        """Sources some of whose stored buckets this write deletes or replaces."""
        for window in batch.windows:
            lo, hi = to_epoch(window.start), to_epoch(window.end)
            gone = conn.execute(
                f"DELETE FROM usage WHERE start >= ? AND start < ? AND width = ? AND {_OF_SOURCE}",
                (lo, hi, window.width_s, window.source),
            ).rowcount
            if lo < minutes:
                # Behind the horizon the window also replaces the folded buckets it wholly
                # covers: it re-read every minute they hold.
                gone += conn.execute(
                    "DELETE FROM usage WHERE start >= ? AND start + width <= ? AND start < ?"
                    f" AND width > ? AND width <= {_CELL} AND {_OF_SOURCE}",
                    (lo, hi, minutes, window.width_s, hours, window.source),
                ).rowcount
            if gone:
                replaced.add(window.source)
            touch(window.source, lo, hi - 1)
        fresh: dict[str, tuple[int, int, int]] = {}
        if batch.usage:
            rows, sums = self._usage_rows(conn, batch.usage)
            if minutes and min(r[0] for r in rows) < minutes:
                rows = self._settled_rows(conn, rows, minutes, hours)
                sums = _sums(rows)
            spans = self._spans(rows)
            for source, (lo, hi, n) in spans.items():
                touch(source, lo, hi)
                # Buckets appended to a range where the source had none: the rollups their
                # rows change are summed here from the rows themselves (below).
                if (
                    source not in replaced
                    and not conn.execute(
                        f"SELECT 1 FROM usage WHERE start >= ? AND start <= ? AND {_OF_ORIGINS}"
                        " LIMIT 1",
                        (lo, hi, source),
                    ).fetchone()
                ):
                    fresh[source] = (lo, hi, n)
            if len(fresh) == len(spans):
                # Nothing stored to replace: a plain insert, which also says whether two
                # buckets of the batch share a key (then the last one stands, as always).
                try:
                    conn.executemany(_USAGE_APPEND, rows)
                except sqlite3.IntegrityError:
                    conn.executemany(_USAGE_INSERT, rows)
                    fresh.clear()
            else:
                conn.executemany(_USAGE_INSERT, rows)
                for source, (lo, hi, n) in list(fresh.items()):
                    (stored,) = conn.execute(
                        "SELECT COUNT(*) FROM usage WHERE start >= ? AND start <= ?"
                        f" AND {_OF_ORIGINS}",
                        (lo, hi, source),
                    ).fetchone()
                    if stored != n:  # two buckets of the batch had one key
                        del fresh[source]
            if fresh:
                if len(fresh) < len(spans):
                    fresh_rows = [r for r in rows if self._origin_sources[r[1]] in fresh]
                    sums = _sums(fresh_rows)
                _add_sums(conn, sums)
        for source, (lo, hi) in touched.items():
            _refresh_usage_rollups(conn, source, lo, hi, appended=source in fresh)

    def _usage_rows(
        self, conn: sqlite3.Connection, usage: Sequence[UsageBucket]
    ) -> tuple[list[tuple[Any, ...]], _Sums]:
        """The ``usage`` rows of some buckets (:data:`_USAGE_INSERT`'s columns), ids assigned,
        and their sums per series and hour and per origin and start (see :func:`_add_sums`).

        This loop is most of the Python time of an ingest: one C call per group of columns,
        cached ids and times, ``priced`` bound as an int (binding a bool goes through sqlite3's
        adapter lookup, which cost more than the rest of the row), and the sums taken on the
        way rather than read back with two ``INSERT ... SELECT`` passes, which cost more than
        writing the rows.
        """
        get_series, get_ids = self._series.get, self._origins.__getitem__
        get_price = self._prices.get
        epochs: dict[datetime, int] = {}
        get_epoch = epochs.get
        rows: list[tuple[Any, ...]] = []
        add = rows.append
        hours: dict[tuple[int, int, int], list[int]] = {}
        starts: dict[tuple[int, int], list[int]] = {}
        for b in usage:
            key = _BUCKET_KEY(b)
            sid = get_series(key)
            if sid is None:
                sid = self._series_id(conn, key)
            when = b.start
            s = get_epoch(when)
            if s is None:
                if when.tzinfo is None:
                    raise ValueError(f"naive datetime {when!r}: tokentop keeps time in UTC")
                s = epochs[when] = int(when.timestamp())
            ref = b.price_ref
            pid = get_price(ref)
            if pid is None:
                pid = self._price_id(conn, ref)
            origin = get_ids(sid)[0]
            v = _BUCKET_VALUES(b)  # width, then the eight sums
            priced = b.priced + 0
            add((s, origin, sid, *v, priced, pid))
            k = (s - s % HOUR, sid, priced)
            a = hours.get(k)
            if a is None:
                hours[k] = list(v[1:])
            else:
                a[0] += v[1]
                a[1] += v[2]
                a[2] += v[3]
                a[3] += v[4]
                a[4] += v[5]
                a[5] += v[6]
                a[6] += v[7]
                a[7] += v[8]
            t = starts.get((s, origin))
            if t is None:
                t = starts[(s, origin)] = [0] * 10
            t[0] += v[1]
            t[1] += v[2]
            t[2] += v[3]
            t[3] += v[4]
            t[4] += v[5]
            t[5] += v[6]
            t[6] += v[7]
            t[7] += v[8]
            if not priced:
                t[8] += v[1] + v[2] + v[3] + v[4] + v[5]
                t[9] += v[6]
        return rows, (hours, starts)

    def _spans(self, rows: list[tuple[Any, ...]]) -> dict[str, tuple[int, int, int]]:
        """Per source: the first and last bucket start among ``rows``, and how many rows."""
        by_origin: dict[int, tuple[int, int, int]] = {}
        origins = set(map(_SECOND, rows))
        if len(origins) <= 4:  # one pass in C per origin
            for origin in origins:
                starts = [r[0] for r in rows if r[1] == origin]
                by_origin[origin] = (min(starts), max(starts), len(starts))
        else:
            for r in rows:
                old = by_origin.get(r[1])
                by_origin[r[1]] = (
                    (r[0], r[0], 1)
                    if old is None
                    else (min(old[0], r[0]), max(old[1], r[0]), old[2] + 1)
                )
        spans: dict[str, tuple[int, int, int]] = {}
        for origin, (lo, hi, n) in by_origin.items():
            source = self._origin_sources[origin]
            old = spans.get(source)
            spans[source] = (
                (lo, hi, n) if old is None else (min(old[0], lo), max(old[1], hi), old[2] + n)
            )
        return spans

    def _settled_rows(
        self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]], minutes: int, hours: int
    ) -> list[tuple[Any, ...]]:
        """``rows`` less those behind the horizon whose start lies inside a folded bucket of
        their series (other than the one with their own key, which they replace)."""
        old = [r for r in rows if r[0] < minutes]
        first = min(r[0] for r in old)
        lo = first // DAY * DAY if first < hours else first // HOUR * HOUR
        series = sorted({r[2] for r in old})
        folded: dict[int, list[tuple[int, int]]] = {}
        for i in range(0, len(series), 500):
            chunk = series[i : i + 500]
            for sid, start, width in conn.execute(
                "SELECT series_id, start, width FROM usage WHERE start >= ? AND start < ?"
                f" AND width > 60 AND series_id IN ({', '.join('?' * len(chunk))})",
                (lo, minutes, *chunk),
            ):
                folded.setdefault(sid, []).append((start, width))
        kept = []
        for r in rows:
            start = r[0]
            if start < minutes and any(
                a <= start < a + w and (a, w) != (start, r[3]) for a, w in folded.get(r[2], ())
            ):
                self.left_out += 1
                continue
            kept.append(r)
        written = [r[0] for r in kept if r[0] < minutes]
        if written:
            self._reopen(conn, min(written), hours)
        return kept

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
        minutes, hours = self._horizons(conn)
        if minutes and min(r[rollup.time_col] for r in rows) < minutes * rollup.time_scale:
            rows = self._settled_samples(conn, rollup, rows, minutes, hours)
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

    def _settled_samples(
        self,
        conn: sqlite3.Connection,
        rollup: Rollup,
        rows: list[dict[str, Any]],
        minutes: int,
        hours: int,
    ) -> list[dict[str, Any]]:
        """``rows`` less the samples behind the horizon in an hour (a day, behind the hours
        horizon) that the hourly table already holds for their source: the samples it was
        summed from are gone, so it cannot be recomputed with them."""

        def cell(t: int) -> int:
            return t // DAY * DAY if t < hours else t // HOUR * HOUR

        scale = rollup.time_scale
        old = [r for r in rows if r[rollup.time_col] < minutes * scale]
        lo = cell(min(r[rollup.time_col] for r in old) // scale)
        settled = {
            (r[0], cell(r[1]))
            for r in conn.execute(
                f"SELECT DISTINCT source, start FROM {rollup.hour} WHERE start >= ? AND start < ?",
                (lo, minutes),
            )
        }
        kept = []
        for r in rows:
            t = r[rollup.time_col] // scale
            if t < minutes and (r["source"], cell(t)) in settled:
                self.left_out += 1
                continue
            kept.append(r)
        written = [
            r[rollup.time_col] // scale for r in kept if r[rollup.time_col] < minutes * scale
        ]
        if written:
            self._reopen(conn, min(written), hours)
        return kept

    def _write_requests(self, conn: sqlite3.Connection, requests: Sequence[MeteredRequest]) -> None:
        """Store metered requests, and rebuild the one-minute usage buckets of their minutes.

        Metered requests appear in every usage query (report, panes) as the source's
        one-minute buckets, tagged; the buckets are derived from the request rows, so writing the
        same request twice (same ``request_id``) changes nothing.
        """
        if not requests:
            return
        minutes, _hours = self._horizons(conn)
        if minutes:
            # Requests are kept as long as minutes are; behind that their minutes are folded.
            kept = [r for r in requests if _ms(r.ts) >= minutes * 1000]
            self.left_out += len(requests) - len(kept)
            requests = kept
            if not requests:
                return
        rows = [
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
        ]
        # New requests (the usual case) add their sums to their minutes' buckets; summing a
        # minute again from its requests would cost a scan of every request in it per write,
        # which grows with the request rate. A request written again (the same id) replaces
        # the stored one, and its minutes are then summed again from the requests.
        before = conn.total_changes
        conn.executemany(_REQUEST_INSERT + " ON CONFLICT DO NOTHING", rows)
        appended = conn.total_changes - before == len(rows)
        if not appended:
            conn.executemany(_REQUEST_INSERT.replace("INSERT", "INSERT OR REPLACE", 1), rows)
        spans: dict[str, tuple[int, int]] = {}
        added: dict[tuple[int, str, str, str, str], list[Any]] = {}
        for row in rows:
            source = row[1]
            minute = row[0] // 60_000 * 60
            old = spans.get(source)
            spans[source] = (
                (minute, minute) if old is None else (min(old[0], minute), max(old[1], minute))
            )
            if appended:
                key = (minute, source, row[3], row[4], row[16])
                sums = added.get(key)
                if sums is None:
                    added[key] = [*row[5:10], 1, *row[10:14]]
                else:
                    for k, v in enumerate(row[5:10]):
                        sums[k] += v
                    sums[5] += 1
                    sums[6] += row[10]
                    sums[7] += row[11]
                    sums[8] = min(sums[8], row[12])
                    sums[9] = max(sums[9], row[13])
        if appended:
            self._add_minutes(conn, added)
        for source, (lo, hi) in spans.items():
            if appended:
                _refresh_usage_rollups(conn, source, lo, hi)
                continue
            by_minute = conn.execute(
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
                    (m[0], self._origins[sid][0], sid, 60, *m[4:13], self._price_id(conn, m[13]))
                    for m in by_minute
                    for sid in [
                        self._series_id(conn, (source, m[1], m[2], "", "", "", m[3], "", "", ""))
                    ]
                ],
            )
            _refresh_usage_rollups(conn, source, lo, hi)

    def _add_minutes(
        self, conn: sqlite3.Connection, added: dict[tuple[int, str, str, str, str], list[Any]]
    ) -> None:
        """Add the sums of requests just appended (none replaced) to their one-minute buckets:
        ``added`` maps (minute, source, provider, model, tag) to the bucket's sums, ``MIN
        (priced)`` and ``MAX(price_ref)``, as :meth:`_write_requests` sums a minute whole."""
        for (minute, source, provider, model, tag), sums in added.items():
            sid = self._series_id(conn, (source, provider, model, "", "", "", tag, "", "", ""))
            origin = self._origins[sid][0]
            row = conn.execute(
                f"SELECT {_SUMS}, priced, (SELECT ref FROM price WHERE id = price_id)"
                " FROM usage WHERE start = ? AND origin_id = ? AND series_id = ? AND width = 60",
                (minute, origin, sid),
            ).fetchone()
            if row is not None:
                sums = [a + b for a, b in zip(sums[:8], row[:8], strict=True)] + [
                    min(sums[8], row[8]),
                    max(sums[9], row[9] or ""),
                ]
            conn.execute(
                _USAGE_INSERT,
                (minute, origin, sid, 60, *sums[:9], self._price_id(conn, sums[9])),
            )

    def rebuild_rollups(self) -> None:
        """Recompute every rollup from the fine tables (after a bulk load).

        Behind the retention horizon the hourly GPU and inference tables are kept: the samples
        they were summed from are gone."""
        with self.transaction() as conn:
            _rebuild_usage_rollups(conn)
            minutes, _hours = self._horizons(conn)
            for rollup in (GPU_ROLLUP, INFERENCE_ROLLUP):
                conn.execute(f"DELETE FROM {rollup.hour} WHERE start >= ?", (minutes,))
                conn.execute(
                    _rollup_insert(
                        rollup, where=f"WHERE {rollup.time_col} >= {minutes * rollup.time_scale}"
                    )
                )

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
                " lag_s, calls, watermark, detail, newest_data, updated_at, interval_s)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET kind = excluded.kind, state = excluded.state,"
                " last_success = coalesce(excluded.last_success, source.last_success),"
                " last_error = excluded.last_error,"
                " last_error_at = coalesce(excluded.last_error_at, source.last_error_at),"
                " lag_s = excluded.lag_s, calls = source.calls + ?,"
                " watermark = coalesce(excluded.watermark, source.watermark),"
                " detail = excluded.detail,"
                " newest_data = coalesce(excluded.newest_data, source.newest_data),"
                " updated_at = excluded.updated_at,"
                " interval_s = coalesce(excluded.interval_s, source.interval_s)",
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
                    health.interval_s,
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


_SERIES_OF = "SELECT id FROM series WHERE source = ?"
_ORIGINS_OF = "SELECT id FROM origin WHERE source = ?"
_STREAMS_OF = f"SELECT id FROM stream WHERE origin_id IN ({_ORIGINS_OF})"
_OWNED = {"series_id": _SERIES_OF, "stream_id": _STREAMS_OF, "origin_id": _ORIGINS_OF}
"""One source's ids in each kind of table (the id tables are small)."""


_TOKENS = " + ".join(f"x.{c}" for c in USAGE_SUMS[:5])
_BY_PRICED = (
    *(f"x.{c}" for c in USAGE_SUMS),
    f"CASE WHEN x.priced THEN 0 ELSE {_TOKENS} END",
    "CASE WHEN x.priced THEN 0 ELSE x.requests END",
)
""":data:`SUMMED` from a table keyed on ``priced`` (per series)."""
_AS_SUMMED = tuple(f"x.{c}" for c in SUMMED)
""":data:`SUMMED` from a table that has them."""


@dataclass(frozen=True, slots=True)
class _Step:
    """One usage rollup: ``table`` summed from ``source`` (read as ``x``) by ``period``."""

    table: str
    period: int
    """Seconds; 0 keeps bucket starts as they are (the per-start totals)."""
    key: str
    """The id column of ``table`` that says which source a row belongs to."""
    source: str
    source_key: str
    """The id column of ``x`` that says which source a row read belongs to."""
    columns: tuple[str, ...]
    """``table``'s key columns after ``start`` (``dim`` first for the group tables)."""
    exprs: tuple[str, ...]
    """What fills them, from ``x`` and its joins."""
    sums: tuple[str, ...]
    """The summed columns of ``table``."""
    values: tuple[str, ...]
    """What each of them adds up, per row read."""
    match: str = ""
    """A condition on ``table`` for the rows this step owns (one dimension of a group table)."""
    ordered: bool = False
    """The rows read come in the order of ``(start, *exprs)``: an ordered ``GROUP BY``."""

    def delete(self, ranged: bool) -> str:
        """Delete what this step recomputes: all of it, or one source's ``[?, ?)``."""
        where = [self.match] if self.match else []
        if ranged:
            where += ["start >= ? AND start < ?", f"{self.key} IN ({_OWNED[self.key]})"]
        return f"DELETE FROM {self.table}" + (f" WHERE {' AND '.join(where)}" if where else "")

    def insert(self, ranged: bool) -> str:
        """Recompute it: all of it, or one source's ``[?, ?)`` (as :meth:`delete`).

        Unless the rows read come in the target's order, each is added into its target row (an
        upsert) rather than grouped first: they come in ``start`` order, so the target rows
        being filled stay in cache, and there is no sort (a ``GROUP BY`` that is not the scan's
        order sorts every row first, which cost twice as much on a day's one-minute buckets).
        """
        p = f"(x.start / {self.period}) * {self.period}" if self.period else "x.start"
        where = (
            f"x.start >= ? AND x.start < ? AND x.{self.source_key} IN ({_OWNED[self.source_key]})"
            if ranged
            else "1"
        )
        head = (
            f"INSERT INTO {self.table} (start, {', '.join(self.columns)}, {', '.join(self.sums)})"
        )
        keys = ", ".join(self.exprs)
        if self.ordered:
            sums = ", ".join(f"SUM({v})" for v in self.values)
            return (
                f"{head} SELECT {p}, {keys}, {sums} FROM {self.source} WHERE {where}"
                f" GROUP BY {p}, {keys}"
            )
        add = ", ".join(f"{c} = {c} + excluded.{c}" for c in self.sums)
        return (
            f"{head} SELECT {p}, {keys}, {', '.join(self.values)} FROM {self.source}"
            f" WHERE {where} ON CONFLICT DO UPDATE SET {add}"
        )


_BY_SERIES = ("series_id", "priced"), ("x.series_id", "x.priced"), USAGE_SUMS
_PER_SERIES = (*_BY_SERIES, tuple(f"x.{c}" for c in USAGE_SUMS))
_WITH_SERIES = "JOIN series AS s ON s.id = x.series_id"
_STEPS: tuple[_Step, ...] = (
    _Step("usage_hour", HOUR, "series_id", "usage AS x", "series_id", *_PER_SERIES),
    _Step("usage_day", DAY, "series_id", "usage_hour AS x", "series_id", *_PER_SERIES),
    _Step(
        "usage_total",
        0,
        "origin_id",
        "usage AS x",
        "origin_id",
        ("origin_id",),
        ("x.origin_id",),
        SUMMED,
        _BY_PRICED,
        ordered=True,  # usage is clustered on (start, origin_id): no sort, no join
    ),
    _Step(
        "usage_model_hour",
        HOUR,
        "stream_id",
        f"usage_hour AS x {_WITH_SERIES}",
        "series_id",
        ("stream_id",),
        ("s.stream_id",),
        SUMMED,
        _BY_PRICED,
    ),
    _Step(
        "usage_model_day",
        DAY,
        "stream_id",
        "usage_model_hour AS x",
        "stream_id",
        ("stream_id",),
        ("x.stream_id",),
        SUMMED,
        _AS_SUMMED,
    ),
    _Step(
        "usage_total_hour",
        HOUR,
        "origin_id",
        "usage_model_hour AS x JOIN stream AS t ON t.id = x.stream_id",
        "stream_id",
        ("origin_id",),
        ("t.origin_id",),
        SUMMED,
        _AS_SUMMED,
    ),
    _Step(
        "usage_total_day",
        DAY,
        "origin_id",
        "usage_total_hour AS x",
        "origin_id",
        ("origin_id",),
        ("x.origin_id",),
        SUMMED,
        _AS_SUMMED,
    ),
    *(
        _Step(
            "usage_group_hour",
            HOUR,
            "origin_id",
            f"usage_hour AS x {_WITH_SERIES} JOIN stream AS t ON t.id = s.stream_id",
            "series_id",
            ("dim", "value", "origin_id"),
            (f"'{dim}'", f"s.{dim}", "t.origin_id"),
            SUMMED,
            _BY_PRICED,
            match=f"dim = '{dim}'",
        )
        for dim in GROUP_DIMENSIONS
    ),
    _Step(
        "usage_group_day",
        DAY,
        "origin_id",
        "usage_group_hour AS x",
        "origin_id",
        ("dim", "value", "origin_id"),
        ("x.dim", "x.value", "x.origin_id"),
        SUMMED,
        _AS_SUMMED,
    ),
)
"""Every usage rollup, each after those it is summed from. Per series: hours from the buckets,
days from hours. Per origin: the buckets' own starts (from the buckets), hours and days (from
the streams'). Per stream and per group: hours from the series' hours, days from those."""
_FROM_BUCKETS = frozenset(step.table for step in _STEPS if step.source.startswith("usage AS x"))
"""The rollups read straight from the buckets (the others are read from these)."""
USAGE_ROLLUP_TABLES: tuple[str, ...] = tuple(dict.fromkeys(step.table for step in _STEPS))
"""The tables every usage write keeps in step (all functions of ``usage``)."""
_RANGED_SQL = [(step, step.delete(True), step.insert(True)) for step in _STEPS]


def _refresh_usage_rollups(
    conn: sqlite3.Connection, source: str, lo: int, hi: int, appended: bool = False
) -> None:
    """Recompute every usage rollup of one source's buckets that start in ``[lo, hi]`` (seconds):
    the starts themselves, then the hours and UTC days that hold them.

    ``appended``: the write only added buckets, and :func:`_add_sums` has already added
    them into the rollups summed straight from ``usage`` (:data:`_FROM_BUCKETS`)."""
    for step, delete, insert in _RANGED_SQL:
        if appended and step.table in _FROM_BUCKETS:
            continue
        if step.period:
            a, b = lo // step.period * step.period, hi // step.period * step.period + step.period
        else:
            a, b = lo, hi + 1
        conn.execute(delete, (a, b, source))
        conn.execute(insert, (a, b, source))


def refresh_usage_rollups(conn: sqlite3.Connection, lo: int, hi: int) -> None:
    """Recompute every usage rollup of every source over ``[lo, hi)`` (seconds), after
    ``usage`` itself was rewritten there (retention folds buckets)."""
    for (source,) in conn.execute("SELECT DISTINCT source FROM origin").fetchall():
        _refresh_usage_rollups(conn, source, lo, hi - 1)


_ADD_HOUR = (
    f"INSERT INTO usage_hour (start, series_id, priced, {_SUMS})"
    f" VALUES ({', '.join('?' * (len(USAGE_SUMS) + 3))}) ON CONFLICT DO UPDATE SET "
    + ", ".join(f"{c} = {c} + excluded.{c}" for c in USAGE_SUMS)
)
_ADD_TOTAL = (
    f"INSERT INTO usage_total (start, origin_id, {', '.join(SUMMED)})"
    f" VALUES ({', '.join('?' * (len(SUMMED) + 2))}) ON CONFLICT DO UPDATE SET "
    + ", ".join(f"{c} = {c} + excluded.{c}" for c in SUMMED)
)


_Sums = tuple[dict[tuple[int, int, int], list[int]], dict[tuple[int, int], list[int]]]
"""Sums of some ``usage`` rows: per (hour, series_id, priced), :data:`USAGE_SUMS`; per
(start, origin_id), :data:`SUMMED`."""


def _sums(rows: list[tuple[Any, ...]]) -> _Sums:
    """:data:`_Sums` of ``usage`` rows (:data:`_USAGE_INSERT`'s columns)."""
    hours: dict[tuple[int, int, int], list[int]] = {}
    starts: dict[tuple[int, int], list[int]] = {}
    for r in rows:
        values = r[4:12]
        a = hours.setdefault((r[0] - r[0] % HOUR, r[2], r[12]), [0] * 8)
        a[:] = map(operator.add, a, values)
        t = starts.setdefault((r[0], r[1]), [0] * 10)
        unpriced = (0, 0) if r[12] else (sum(values[:5]), values[5])
        t[:] = map(operator.add, t, (*values, *unpriced))
    return hours, starts


def _add_sums(conn: sqlite3.Connection, sums: _Sums) -> None:
    """Add the sums of rows just appended to ``usage`` (no bucket deleted or replaced) into
    the rollups read straight from it; every other rollup is then recomputed from these."""
    hours, starts = sums
    conn.executemany(_ADD_HOUR, [(*k, *v) for k, v in hours.items()])
    conn.executemany(_ADD_TOTAL, [(*k, *v) for k, v in starts.items()])


def _rebuild_usage_rollups(conn: sqlite3.Connection) -> None:
    for step in _STEPS:
        conn.execute(step.delete(False))
        conn.execute(step.insert(False))


def _migrate_v1_usage(conn: sqlite3.Connection) -> None:
    """Move version 1's wide ``usage`` (renamed ``usage_v1``) into ``series`` and ``usage``."""
    conn.execute(
        f"INSERT OR IGNORE INTO series ({_SERIES})"
        f" SELECT DISTINCT {_SERIES} FROM usage_v1 ORDER BY {_SERIES}"
    )
    _fill_streams(conn)
    on = " AND ".join(f"s.{c} = v.{c}" for c in SERIES_COLUMNS)
    _copy_usage(conn, "usage_v1", "s.id", f"JOIN series AS s ON {on}")


def _migrate_v2_usage(conn: sqlite3.Connection) -> None:
    """Move version 2's ``usage`` (renamed ``usage_v2``: price references as text, keyed on
    ``(start, series_id, width)``) into version 3's."""
    _fill_streams(conn)
    _copy_usage(conn, "usage_v2", "v.series_id", "JOIN series AS s ON s.id = v.series_id")


def _copy_usage(conn: sqlite3.Connection, old: str, series: str, join: str) -> None:
    """Copy an older ``usage`` table (aliased ``v``, joined to ``series`` as ``s``) into
    ``usage``, each price reference stored once in ``price``; then drop it."""
    conn.execute(f"INSERT OR IGNORE INTO price (ref) SELECT DISTINCT price_ref FROM {old}")
    copied = conn.execute(
        f"INSERT INTO usage (start, origin_id, series_id, width, {_SUMS}, priced, price_id)"
        f" SELECT v.start, t.origin_id, {series}, v.width,"
        f" {', '.join(f'v.{c}' for c in USAGE_SUMS)}, v.priced, p.id FROM {old} AS v {join}"
        " JOIN stream AS t ON t.id = s.stream_id JOIN price AS p ON p.ref = v.price_ref"
    ).rowcount
    (stored,) = conn.execute(f"SELECT COUNT(*) FROM {old}").fetchone()
    if copied != stored:  # pragma: no cover - every row has exactly one series and price
        raise StoreError(f"migration copied {copied} of {stored} usage rows; nothing was changed")
    conn.execute(f"DROP TABLE {old}")


def _fill_streams(conn: sqlite3.Connection) -> None:
    """Give every series without one its origin and stream ids (a migration from version 2)."""
    conn.execute(
        "INSERT OR IGNORE INTO origin (source, provider)"
        " SELECT DISTINCT source, provider FROM series WHERE stream_id IS NULL"
        " ORDER BY source, provider"
    )
    conn.execute(
        "INSERT OR IGNORE INTO stream (origin_id, model)"
        " SELECT DISTINCT o.id, s.model FROM series AS s"
        " JOIN origin AS o ON o.source = s.source AND o.provider = s.provider"
        " WHERE s.stream_id IS NULL ORDER BY o.id, s.model"
    )
    conn.execute(
        "UPDATE series SET stream_id = (SELECT t.id FROM stream AS t JOIN origin AS o"
        " ON o.id = t.origin_id WHERE o.source = series.source"
        " AND o.provider = series.provider AND t.model = series.model)"
        " WHERE stream_id IS NULL"
    )


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

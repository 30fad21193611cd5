"""Alert state, history and the notification outbox, kept in the database.

Each alert rule x instance (``key``: ``""`` for a rule as a whole, else e.g. the source or model
it is about) has at most one row in ``alert_state``; no row means *inactive*. A row is
``pending`` (the condition holds, not yet for the rule's ``for``), ``firing``, or ``resolved``
(the condition ended; the row stays only until Alertmanager has been told). Every firing is an
*episode* in ``alert_history``: when it fired, with what value and summary, and when it resolved.
A restart reads the rows back, so a firing alert is neither sent again as new nor forgotten.

``alert_outbox`` holds webhook messages, one per transition, written in the same transaction as
the transition itself: a message is never lost to a crash and never made twice by a re-poll.
Rows hold no URL (a webhook URL carries its secret in its path), only a digest of it.

The tables belong to this module, not to :mod:`tokentop.store.db`'s schema: :func:`ensure_tables`
creates them (idempotently) on first use by a writer; readers treat a missing table as "no
alerts".
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tokentop.store.db import Store
from tokentop.store.records import from_epoch, to_epoch

STATES = ("pending", "firing", "resolved")
"""States a row can be in; *inactive* is no row."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS alert_state (
    rule TEXT NOT NULL,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    severity TEXT NOT NULL,
    value REAL,
    summary TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    labels TEXT NOT NULL DEFAULT '{}',
    active_since INTEGER NOT NULL,
    fired_at INTEGER,
    resolved_at INTEGER,
    updated_at INTEGER NOT NULL,
    episode INTEGER,
    am_sent_at INTEGER,
    am_severity TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (rule, key)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS alert_history (
    id INTEGER PRIMARY KEY,
    rule TEXT NOT NULL,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    severity TEXT NOT NULL,
    fired_at INTEGER NOT NULL,
    value REAL,
    summary TEXT NOT NULL DEFAULT '',
    labels TEXT NOT NULL DEFAULT '{}',
    resolved_at INTEGER,
    resolved_value REAL
);

CREATE INDEX IF NOT EXISTS alert_history_fired ON alert_history (fired_at);

CREATE TABLE IF NOT EXISTS alert_outbox (
    id INTEGER PRIMARY KEY,
    created_at INTEGER NOT NULL,
    channel TEXT NOT NULL,
    target TEXT NOT NULL,
    body TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at INTEGER NOT NULL,
    last_error TEXT NOT NULL DEFAULT ''
);
"""

_ensured: weakref.WeakSet[Store] = weakref.WeakSet()
_ensure_lock = threading.Lock()


def ensure_tables(store: Store) -> None:
    """Create the alert tables when missing (once per connection; idempotent)."""
    with _ensure_lock:
        if store in _ensured:
            return
        with store.transaction() as conn:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
        _ensured.add(store)


def target_id(url: str) -> str:
    """What the outbox keeps of a URL: a digest, so that the secret in it stays in the config."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class AlertState:
    """One rule x instance that is not inactive."""

    rule: str
    key: str
    kind: str
    state: str
    """``pending``, ``firing`` or ``resolved`` (waiting to tell Alertmanager)."""
    severity: str
    value: float | None
    summary: str
    description: str
    labels: dict[str, str]
    """Scope labels (``provider``, ``model``, ``source``, ...), as sent."""
    active_since: datetime
    """When the condition was first seen holding (start of ``pending``)."""
    updated_at: datetime
    """The last evaluation that saw this row."""
    fired_at: datetime | None = None
    resolved_at: datetime | None = None
    episode: int | None = None
    """The ``alert_history`` row of the current firing."""
    am_sent_at: datetime | None = None
    """When Alertmanager last accepted this alert (firing, or its resolution)."""
    am_severity: str = ""
    """The severity Alertmanager last accepted (a change resolves the old label set there)."""


@dataclass(frozen=True, slots=True)
class Episode:
    """One firing of an alert, from ``alert_history``."""

    id: int
    rule: str
    key: str
    kind: str
    severity: str
    """The highest severity it reached."""
    fired_at: datetime
    value: float | None
    summary: str
    labels: dict[str, str]
    resolved_at: datetime | None = None
    resolved_value: float | None = None


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """A webhook message waiting to be delivered."""

    id: int
    created_at: datetime
    channel: str
    target: str
    """:func:`target_id` of the URL."""
    body: str
    attempts: int
    next_at: datetime
    last_error: str = ""


@dataclass(slots=True)
class Changes:
    """What one evaluation changes, written by :func:`write_changes` in one transaction."""

    upserts: list[AlertState] = field(default_factory=list)
    """Rows to write as they are; a ``firing`` row without an ``episode`` opens one."""
    deletes: list[tuple[str, str]] = field(default_factory=list)
    """(rule, key) rows that became inactive."""
    closed: list[tuple[int, datetime, float | None]] = field(default_factory=list)
    """Episodes that resolved: (id, when, value)."""
    raised: list[tuple[int, str]] = field(default_factory=list)
    """Episodes whose severity rose: (id, severity)."""
    messages: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    """Outbox rows: (channel, target id, JSON body)."""

    def __bool__(self) -> bool:
        return bool(self.upserts or self.deletes or self.closed or self.raised or self.messages)


def _dt(value: int | None) -> datetime | None:
    return None if value is None else from_epoch(value)


def _ts(value: datetime | None) -> int | None:
    return None if value is None else to_epoch(value)


def _labels(text: str) -> dict[str, str]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def _state(row: sqlite3.Row) -> AlertState:
    return AlertState(
        rule=row["rule"],
        key=row["key"],
        kind=row["kind"],
        state=row["state"],
        severity=row["severity"],
        value=row["value"],
        summary=row["summary"],
        description=row["description"],
        labels=_labels(row["labels"]),
        active_since=from_epoch(row["active_since"]),
        updated_at=from_epoch(row["updated_at"]),
        fired_at=_dt(row["fired_at"]),
        resolved_at=_dt(row["resolved_at"]),
        episode=row["episode"],
        am_sent_at=_dt(row["am_sent_at"]),
        am_severity=row["am_severity"],
    )


def _has_tables(conn: sqlite3.Connection) -> bool:
    row = conn.execute(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'alert_state'"
    ).fetchone()
    return bool(row[0])


def read_states(conn: sqlite3.Connection) -> dict[tuple[str, str], AlertState]:
    """Every non-inactive row, by (rule, key); inside a caller's transaction."""
    if not _has_tables(conn):
        return {}
    cursor = conn.cursor()
    cursor.row_factory = sqlite3.Row
    rows = cursor.execute("SELECT * FROM alert_state ORDER BY rule, key").fetchall()
    return {(r["rule"], r["key"]): _state(r) for r in rows}


def _exists(store: Store, table: str) -> bool:
    return bool(
        store.query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,))
    )


def states(store: Store) -> list[AlertState]:
    """Every non-inactive row: firing first, then pending, then resolved; by rule and key."""
    if not _exists(store, "alert_state"):
        return []
    found = [_state(r) for r in store.query("SELECT * FROM alert_state")]
    order = {"firing": 0, "pending": 1, "resolved": 2}
    return sorted(found, key=lambda s: (order.get(s.state, 3), s.rule, s.key))


def firing(store: Store) -> list[AlertState]:
    """The alerts firing now, critical first, then longest firing first."""
    rank = {"critical": 0, "warning": 1}
    found = [s for s in states(store) if s.state == "firing"]
    return sorted(
        found, key=lambda s: (rank.get(s.severity, 2), s.fired_at or s.active_since, s.rule)
    )


def history(store: Store, limit: int = 200) -> list[Episode]:
    """The latest episodes, newest first."""
    if not _exists(store, "alert_history"):
        return []
    rows = store.query(
        "SELECT * FROM alert_history ORDER BY fired_at DESC, id DESC LIMIT ?", (limit,)
    )
    return [
        Episode(
            id=r["id"],
            rule=r["rule"],
            key=r["key"],
            kind=r["kind"],
            severity=r["severity"],
            fired_at=from_epoch(r["fired_at"]),
            value=r["value"],
            summary=r["summary"],
            labels=_labels(r["labels"]),
            resolved_at=_dt(r["resolved_at"]),
            resolved_value=r["resolved_value"],
        )
        for r in rows
    ]


_UPSERT = (
    "INSERT OR REPLACE INTO alert_state (rule, key, kind, state, severity, value, summary,"
    " description, labels, active_since, fired_at, resolved_at, updated_at, episode, am_sent_at,"
    " am_severity) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def write_changes(conn: sqlite3.Connection, changes: Changes, now: datetime) -> list[AlertState]:
    """Apply ``changes`` inside a caller's write transaction; returns the rows as written (with
    the episode ids of alerts that started firing)."""
    written: list[AlertState] = []
    for rule, key in changes.deletes:
        conn.execute("DELETE FROM alert_state WHERE rule = ? AND key = ?", (rule, key))
    for closed_id, at, value in changes.closed:
        conn.execute(
            "UPDATE alert_history SET resolved_at = ?, resolved_value = ? WHERE id = ?",
            (to_epoch(at), value, closed_id),
        )
    for raised_id, severity in changes.raised:
        conn.execute("UPDATE alert_history SET severity = ? WHERE id = ?", (severity, raised_id))
    for s in changes.upserts:
        episode = s.episode
        if s.state == "firing" and episode is None:
            fired = s.fired_at or now
            cursor = conn.execute(
                "INSERT INTO alert_history (rule, key, kind, severity, fired_at, value, summary,"
                " labels) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    s.rule,
                    s.key,
                    s.kind,
                    s.severity,
                    to_epoch(fired),
                    s.value,
                    s.summary,
                    json.dumps(s.labels, sort_keys=True),
                ),
            )
            episode = cursor.lastrowid
        row = (
            s.rule,
            s.key,
            s.kind,
            s.state,
            s.severity,
            s.value,
            s.summary,
            s.description,
            json.dumps(s.labels, sort_keys=True),
            to_epoch(s.active_since),
            _ts(s.fired_at),
            _ts(s.resolved_at),
            to_epoch(s.updated_at),
            episode,
            _ts(s.am_sent_at),
            s.am_severity,
        )
        conn.execute(_UPSERT, row)
        written.append(
            s if episode == s.episode else AlertState(**{**_asdict(s), "episode": episode})
        )
    for channel, target, body in changes.messages:
        conn.execute(
            "INSERT INTO alert_outbox (created_at, channel, target, body, next_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (to_epoch(now), channel, target, json.dumps(body, sort_keys=True), to_epoch(now)),
        )
    return written


def _asdict(s: AlertState) -> dict[str, Any]:
    return {name: getattr(s, name) for name in AlertState.__slots__}


def mark_sent(store: Store, sent: Iterable[tuple[str, str, str]], at: datetime) -> None:
    """Record that Alertmanager accepted these (rule, key, severity) alerts at ``at``; resolved
    rows it accepted are done and go."""
    items = list(sent)
    if not items:
        return
    with store.transaction() as conn:
        for rule, key, severity in items:
            conn.execute(
                "DELETE FROM alert_state WHERE rule = ? AND key = ? AND state = 'resolved'",
                (rule, key),
            )
            conn.execute(
                "UPDATE alert_state SET am_sent_at = ?, am_severity = ? WHERE rule = ? AND key = ?",
                (to_epoch(at), severity, rule, key),
            )


def drop_resolved(store: Store) -> None:
    """Forget resolved rows (when no Alertmanager is configured to tell)."""
    with store.transaction() as conn:
        if _has_tables(conn):
            conn.execute("DELETE FROM alert_state WHERE state = 'resolved'")


def _outbox_item(row: sqlite3.Row, *, attempts: int) -> OutboxItem:
    return OutboxItem(
        id=row["id"],
        created_at=from_epoch(row["created_at"]),
        channel=row["channel"],
        target=row["target"],
        body=row["body"],
        attempts=attempts,
        next_at=from_epoch(row["next_at"]),
        last_error=row["last_error"],
    )


def claim_outbox(
    store: Store, now: datetime, lease_s: int = 120, limit: int = 50
) -> list[OutboxItem]:
    """Take the messages due now (oldest first) for one delivery attempt: each is leased for
    ``lease_s`` seconds, so that a second process delivering at the same time skips it."""
    with store.transaction() as conn:
        if not _has_tables(conn):
            return []
        cursor = conn.cursor()
        cursor.row_factory = sqlite3.Row
        rows = cursor.execute(
            "SELECT * FROM alert_outbox WHERE next_at <= ? ORDER BY id LIMIT ?",
            (to_epoch(now), limit),
        ).fetchall()
        conn.executemany(
            "UPDATE alert_outbox SET next_at = ?, attempts = attempts + 1 WHERE id = ?",
            [(to_epoch(now) + lease_s, r["id"]) for r in rows],
        )
    # The rows were read before the lease counted the attempt it starts.
    return [_outbox_item(r, attempts=r["attempts"] + 1) for r in rows]


def outbox_done(store: Store, item_id: int) -> None:
    """A message was delivered (or given up on): remove it."""
    with store.transaction() as conn:
        conn.execute("DELETE FROM alert_outbox WHERE id = ?", (item_id,))


def outbox_retry(store: Store, item_id: int, at: datetime, error: str) -> None:
    """A delivery failed: try again at ``at``."""
    with store.transaction() as conn:
        conn.execute(
            "UPDATE alert_outbox SET next_at = ?, last_error = ? WHERE id = ?",
            (to_epoch(at), error[:300], item_id),
        )


def outbox(store: Store) -> list[OutboxItem]:
    """Every message not yet delivered, oldest first."""
    if not _exists(store, "alert_outbox"):
        return []
    return [
        _outbox_item(r, attempts=r["attempts"])
        for r in store.query("SELECT * FROM alert_outbox ORDER BY id")
    ]

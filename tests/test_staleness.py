"""A source is stale after max(3 x its interval, 10 s) without a successful poll; a meter writer
with a heartbeat that stops beating shows as stopped. Clock frozen throughout."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tokentop.collectors.meter import Recorder
from tokentop.pricing.book import PriceBook
from tokentop.store import queries
from tokentop.store.db import Store
from tokentop.store.records import SourceHealth, stale_after

T = datetime(2026, 12, 31, 23, 59, 30, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T + timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("interval_s", "limit_s"),
    [(0.5, 10.0), (1.0, 10.0), (2.0, 10.0), (5.0, 15.0), (60.0, 180.0), (300.0, 900.0)],
)
def test_limit_is_three_intervals_but_never_under_ten_seconds(
    interval_s: float, limit_s: float
) -> None:
    assert stale_after(interval_s) == limit_s
    h = SourceHealth("s", "demo", "ok", last_success=T, interval_s=interval_s)
    assert h.stale_after_s == limit_s
    assert not h.stale(at(limit_s))
    assert h.stale(at(limit_s + 1))
    assert h.shown_state(at(limit_s + 1)) == "stale"
    assert h.age_s(at(limit_s + 1)) == limit_s + 1


def test_a_one_second_source_is_stale_after_ten_seconds_a_provider_after_three_minutes() -> None:
    gpu = SourceHealth("demo-gpu", "demo", "ok", last_success=T, interval_s=1.0)
    provider = SourceHealth("openai", "openai", "ok", last_success=T, interval_s=60.0)
    assert not gpu.stale(at(9)) and gpu.stale(at(11))
    assert not provider.stale(at(11)) and not provider.stale(at(179))
    assert provider.stale(at(181))


def test_rows_without_an_interval_and_failing_states() -> None:
    # Written before intervals were stored: a polled source is assumed to poll every minute.
    old = SourceHealth("openai", "openai", "ok", last_success=T)
    assert old.stale_after_s == 180.0 and old.stale(at(181))
    # A meter without heartbeat writes only when traffic passes: silence says nothing.
    quiet = SourceHealth("pytest", "meter", "ok", last_success=T)
    assert quiet.stale_after_s is None and not quiet.stale(at(86400))
    # A failure state is shown as it is (and is failing), never as "stale".
    auth = SourceHealth("anthropic", "anthropic", "auth failed", last_success=T, interval_s=60)
    assert auth.overdue(at(3600)) and not auth.stale(at(3600))
    assert auth.shown_state(at(3600)) == "auth failed" and auth.failing(at(0))
    never = SourceHealth("openai", "openai", "ok")
    assert never.failing(at(0)) and not never.stale(at(0))
    ok = SourceHealth("demo", "demo", "ok", last_success=T, interval_s=1.0)
    assert not ok.failing(at(10)) and ok.failing(at(11))


def test_a_meter_with_a_heartbeat_that_stops_shows_stopped() -> None:
    proxy = SourceHealth(
        "proxy", "meter", "ok", last_success=T, interval_s=2.0, detail="listening on http://x"
    )
    assert proxy.shown_state(at(10)) == "ok"
    assert proxy.shown_state(at(11)) == "stopped" and proxy.failing(at(11))


def test_the_interval_is_stored_with_the_health(db_path: Path) -> None:
    with Store(db_path) as store:
        store.record_health(
            SourceHealth("demo", "demo", "ok", last_success=T, interval_s=1.0), now=T
        )
        # A write that does not say its interval keeps the one stored.
        store.record_health(SourceHealth("demo", "demo", "error", last_error="x"), now=at(5))
        (h,) = queries.sources(store, at(5))
    assert h.interval_s == 1.0 and h.state == "error"


def test_the_interval_column_is_added_to_an_older_file(db_path: Path) -> None:
    with Store(db_path) as store:
        store.conn.execute("ALTER TABLE source DROP COLUMN interval_s")
        store.conn.execute("INSERT INTO source (name, kind, state) VALUES ('old', 'openai', 'ok')")
    with Store(db_path, readonly=True) as viewer:  # a viewer of the old file still reads it
        assert queries.sources(viewer, T)[0].interval_s is None
    with Store(db_path) as store:  # a writer adds the column in place
        assert "interval_s" in store.db.table("source").columns_dict
        assert queries.sources(store, T)[0].name == "old"


def _proxy_row(db: Path) -> SourceHealth | None:
    if not db.exists():
        return None
    with Store(db) as store:
        return next((h for h in queries.sources(store, T) if h.name == "proxy"), None)


def test_a_recorder_with_a_heartbeat_beats_without_traffic_and_says_stopped(
    db_path: Path,
) -> None:
    recorder = Recorder(
        db_path, PriceBook(), health_name="proxy", detail="listening on x", heartbeat_s=0.05
    )
    try:
        deadline = time.monotonic() + 30
        row = _proxy_row(db_path)
        while row is None and time.monotonic() < deadline:
            time.sleep(0.05)
            row = _proxy_row(db_path)
        assert row is not None
        assert (row.state, row.kind, row.interval_s, row.detail) == (
            "ok",
            "meter",
            0.05,
            "listening on x",
        )
        assert row.last_success is not None
    finally:
        recorder.close()
    row = _proxy_row(db_path)
    assert row is not None
    # A clean stop says so at once (a kill -9 would go stale after 10 s instead).
    assert (row.state, row.detail) == ("stopped", "stopped; was listening on x")


def test_a_recorder_without_a_heartbeat_writes_nothing_until_traffic(db_path: Path) -> None:
    recorder = Recorder(db_path, PriceBook(), health_name="pytest")
    recorder.close()
    assert not db_path.exists()

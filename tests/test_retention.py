"""Retention: old minutes folded into hours and hours into days, with the figures unchanged.

The clock is frozen (at 23:59:30 UTC on 31 December, so day, month and year edges are all near);
no test depends on the hour it runs at.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import FakeCollector, bucket, nano
from tests.rollup_check import rollup_mismatches
from tokentop.collectors.compaction import Compactor
from tokentop.collectors.config import ConfigError, parse_config
from tokentop.collectors.runner import Runner
from tokentop.pricing.book import PriceBook
from tokentop.store import queries
from tokentop.store.db import HOURS_BEFORE, MINUTES_BEFORE, Store, StoreError
from tokentop.store.records import (
    Batch,
    GpuSample,
    InferenceSample,
    MeteredRequest,
    SourceHealth,
    UsageWindow,
    from_epoch,
    to_epoch,
)
from tokentop.store.retention import Retention, compact, compact_step, database_info
from tokentop.tui import cli

NOW = datetime(2025, 12, 31, 23, 59, 30, tzinfo=UTC)
"""The frozen clock: a year's last half-minute."""
DAYS = 60
FIRST = datetime.fromtimestamp((to_epoch(NOW) // 60 - DAYS * 1440 + 1) * 60, UTC)
"""The history's first minute: just inside ``--since 60d``."""


def _history(store: Store, days: int = DAYS, every_min: int = 7) -> None:
    """``days`` of usage (three series, two sources, priced and unpriced), GPU and inference
    samples and metered requests, one UTC day per batch with its window, as a backfill writes."""
    store.record_health(SourceHealth("meter", "meter", "ok"), now=NOW)
    t = FIRST
    while t < NOW:
        day_end = min(datetime.fromtimestamp((to_epoch(t) // 86400 + 1) * 86400, UTC), NOW)
        usage = []
        gpu = []
        inference = []
        requests = []
        m = t
        while m < day_end:
            i = to_epoch(m) // 60
            usage.append(
                bucket(
                    m,
                    source="oa",
                    model="gpt-4o",
                    cost=f"0.00{i % 97:02d}",
                    requests=3,
                    input_uncached=1000 + i % 13,
                    output=200 + i % 7,
                    project="p1",
                )
            )
            if i % 3 == 0:
                usage.append(
                    bucket(
                        m,
                        source="an",
                        provider="anthropic",
                        model="mystery",
                        cost=None,
                        requests=1,
                        output=50 + i % 5,
                        tag="eval",
                    )
                )
            if i % 5 == 0:
                usage.append(
                    bucket(
                        m,
                        source="oa",
                        model="gpt-4o-mini",
                        cost="0.0001",
                        api_key="k2",
                        cache_read=30,
                    )
                )
            gpu.append(
                GpuSample(
                    source="nvml",
                    device="GPU-0",
                    ts=m + timedelta(minutes=1),
                    interval_s=60,
                    name="H100",
                    cost_nano=nano("0.05") + i % 11,
                    idle_cost_nano=i % 3,
                )
            )
            inference.append(
                InferenceSample(
                    source="vllm",
                    endpoint="e1",
                    ts=m + timedelta(minutes=1),
                    interval_s=60,
                    requests=10 + i % 4,
                    prompt_tokens=700,
                    generation_tokens=90,
                )
            )
            if i % 11 == 0:
                requests.append(
                    MeteredRequest(
                        ts=m + timedelta(seconds=5),
                        provider="mistral",
                        model="small",
                        request_id=f"q{i}",
                        output=40,
                        cost_nano=1234,
                        priced=True,
                        tag="t",
                    )
                )
            m += timedelta(minutes=every_min)
        store.write_batch(
            Batch(
                usage=tuple(usage),
                windows=(UsageWindow("oa", 60, t, day_end), UsageWindow("an", 60, t, day_end)),
                gpu=tuple(gpu),
                inference=tuple(inference),
                requests=tuple(requests),
            )
        )
        t = day_end


@pytest.fixture
def history(db_path: Path) -> Iterator[Store]:
    with Store(db_path) as store:
        _history(store)
        yield store


def _figures(store: Store, start: datetime, end: datetime) -> tuple[Any, ...]:
    t = queries.totals(store, start, end)
    g = queries.gpu_overview(store, start, end)
    by_model = [(r.key, r.totals) for r in queries.cost_by(store, start, end)]
    return t, g.cost, g.idle_cost, g.inferences, by_model


def test_windows_across_the_horizon_keep_their_totals(history: Store) -> None:
    hour = datetime.fromtimestamp(to_epoch(NOW) // 3600 * 3600, UTC)
    windows = [
        (NOW - timedelta(days=DAYS), NOW + timedelta(seconds=1)),  # from before the history
        (hour - timedelta(days=40), NOW),  # straddles the minutes horizon, starts on an hour
        (hour - timedelta(days=36, hours=5), hour - timedelta(days=20)),  # ends past it too
        (NOW - timedelta(days=10), NOW),  # all one-minute data
    ]
    before = [_figures(history, lo, hi) for lo, hi in windows]
    steps = compact(history, NOW, Retention(minutes_days=35), max_rows=2000)
    assert steps and rollup_mismatches(history) == {}
    assert [_figures(history, lo, hi) for lo, hi in windows] == before
    horizon = to_epoch(NOW - timedelta(days=35)) // 3600 * 3600
    assert history.get_meta(MINUTES_BEFORE) == str(horizon)
    # Behind it: at most one bucket per series and hour, no GPU sample, no metered request.
    assert not history.query(
        "SELECT 1 FROM usage WHERE start < ? GROUP BY series_id, start / 3600 HAVING COUNT(*) > 1",
        (horizon,),
    )
    for table in ("gpu", "inference", "request"):
        assert (
            history.query(f"SELECT COUNT(*) FROM {table} WHERE ts < ?", (horizon * 1000,))[0][0]
            == 0
        )
    assert queries.resolution(history, windows[1][0]).step == "1h"
    assert "hourly data before" in queries.resolution(history, windows[1][0]).note
    assert queries.resolution(history, windows[3][0]).step == "1m"
    assert queries.resolution(history, windows[3][0]).note == ""
    assert compact(history, NOW, Retention(minutes_days=35)) == []  # nothing left to do


def test_a_window_starting_inside_a_folded_hour_is_exact_to_the_hour(history: Store) -> None:
    start = NOW - timedelta(days=40, minutes=27)  # mid-hour, behind the horizon
    compact(history, NOW, Retention(minutes_days=35))
    hour = datetime.fromtimestamp(to_epoch(start) // 3600 * 3600, UTC)
    folded = queries.totals(history, start, NOW).cost
    # The hour it starts in counts if its first minute with data is in the window.
    assert folded in (
        queries.totals(history, hour, NOW).cost,
        queries.totals(history, hour + timedelta(hours=1), NOW).cost,
    )


def test_hours_folded_into_days_keep_the_totals(history: Store) -> None:
    day = datetime.fromtimestamp(to_epoch(NOW) // 86400 * 86400, UTC)
    windows = [(FIRST - timedelta(days=1), NOW), (day - timedelta(days=45), NOW)]
    before = [_figures(history, lo, hi) for lo, hi in windows]
    compact(history, NOW, Retention(minutes_days=10, hours_days=30))
    assert rollup_mismatches(history) == {}
    assert [_figures(history, lo, hi) for lo, hi in windows] == before
    boundary = to_epoch(NOW - timedelta(days=30)) // 86400 * 86400
    assert history.get_meta(HOURS_BEFORE) == str(boundary)
    assert not history.query(
        "SELECT 1 FROM usage WHERE start < ? GROUP BY series_id, start / 86400 HAVING COUNT(*) > 1",
        (boundary,),
    )
    assert not history.query(
        "SELECT 1 FROM gpu_hour WHERE start < ? GROUP BY device, start / 86400 HAVING COUNT(*) > 1",
        (boundary,),
    )
    assert queries.resolution(history, windows[1][0]).step == "1d"


def test_steps_are_bounded(history: Store) -> None:
    step = compact_step(history, NOW, Retention(minutes_days=35), max_rows=40)
    assert step is not None and step.level == "minutes"
    # A day holds about 330 buckets here: a step takes a few hours of them, in one transaction.
    assert timedelta(hours=1) <= step.end - step.start < timedelta(hours=6)
    assert 0 < step.rows_after < step.rows_before <= 40


def test_writes_behind_the_horizon_never_count_twice(history: Store) -> None:
    compact(history, NOW, Retention(minutes_days=35))
    old = datetime.fromtimestamp(to_epoch(NOW - timedelta(days=45)) // 86400 * 86400, UTC)
    whole = (FIRST, NOW + timedelta(seconds=1))
    total = queries.totals(history, *whole)
    day = (old, old + timedelta(days=1))

    def day_batch(scale: int) -> Batch:
        usage = [
            bucket(
                old + timedelta(minutes=m),
                source="oa",
                model="gpt-4o",
                cost="0.01",
                requests=scale,
                project="p1",
            )
            for m in range(0, 1440, 7)
        ]
        return Batch(usage=tuple(usage), windows=(UsageWindow("oa", 60, *day),))

    # A re-poll of a whole folded day replaces it: what it read stands, once.
    oa_day = queries.totals(history, *day, text="gpt-4o")
    history.write_batch(day_batch(1))
    assert rollup_mismatches(history) == {}
    replaced = queries.totals(history, *day, text="gpt-4o")
    assert replaced.requests == len(day_batch(1).usage)
    assert queries.totals(history, *whole).requests == total.requests - oa_day.requests + (
        replaced.requests
    )
    # Twice is the same as once.
    history.write_batch(day_batch(1))
    assert queries.totals(history, *day, text="gpt-4o") == replaced
    # The next compaction folds the day again, the figures unchanged.
    compact(history, NOW, Retention(minutes_days=35))
    assert queries.totals(history, *day, text="gpt-4o") == replaced
    # A window over part of a folded hour cannot replace part of it: those buckets are left out.
    hour = (old + timedelta(hours=5), old + timedelta(hours=5, minutes=30))
    history.write_batch(
        Batch(
            usage=(
                bucket(
                    hour[0] + timedelta(minutes=7),
                    source="oa",
                    model="gpt-4o",
                    cost="5",
                    requests=99,
                    project="p1",
                ),
            ),
            windows=(UsageWindow("oa", 60, *hour),),
        )
    )
    assert queries.totals(history, *day, text="gpt-4o") == replaced
    assert history.left_out >= 1
    # A metered request behind the horizon is not stored (its minute is folded).
    history.write_batch(
        Batch(
            requests=(
                MeteredRequest(
                    ts=old + timedelta(hours=3),
                    provider="mistral",
                    model="small",
                    request_id="late",
                    output=1,
                ),
            )
        )
    )
    assert not history.query("SELECT 1 FROM request WHERE request_id = 'late'")
    assert rollup_mismatches(history) == {}


def test_a_late_write_into_an_empty_folded_hour_is_kept_and_folded_later(history: Store) -> None:
    compact(history, NOW, Retention(minutes_days=35))
    old = datetime.fromtimestamp(to_epoch(NOW - timedelta(days=50)) // 3600 * 3600, UTC)
    late = tuple(
        bucket(old + timedelta(minutes=m), source="new", model="gpt-4o", cost="0.5")
        for m in range(0, 60, 10)
    )
    gpu = GpuSample(
        source="nvml-2",  # the hour holds nothing of this source yet
        device="GPU-9",
        ts=old + timedelta(minutes=3),
        interval_s=60,
        name="L40S",
        cost_nano=77,
    )
    before = queries.totals(history, FIRST, NOW)
    history.write_batch(Batch(usage=late, gpu=(gpu,)))
    after = queries.totals(history, FIRST, NOW)
    assert after.cost - before.cost == sum(nano("0.5") for _ in late) / 10**9
    # The next compaction goes back and folds it.
    compact(history, NOW, Retention(minutes_days=35))
    rows = history.query(
        "SELECT COUNT(*) FROM usage AS u JOIN series AS s ON s.id = u.series_id"
        " WHERE s.source = 'new'"
    )
    assert rows[0][0] == 1
    assert queries.totals(history, FIRST, NOW) == after
    assert history.query("SELECT COUNT(*) FROM gpu WHERE device = 'GPU-9'")[0][0] == 0
    assert history.query("SELECT SUM(cost_nano) FROM gpu_hour WHERE device = 'GPU-9'")[0][0] == 77
    # A sample for an hour that is already folded would be summed into nothing: left out.
    history.write_batch(
        Batch(
            gpu=(
                GpuSample(
                    source="nvml-2",
                    device="GPU-9",
                    ts=old + timedelta(minutes=9),
                    interval_s=60,
                    name="L40S",
                    cost_nano=5,
                ),
            )
        )
    )
    assert history.query("SELECT SUM(cost_nano) FROM gpu_hour WHERE device = 'GPU-9'")[0][0] == 77
    assert rollup_mismatches(history) == {}


def _main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    monkeypatch.setattr("tokentop.tui.cli.utcnow", lambda: NOW)
    monkeypatch.setattr("tokentop.collectors.base.utcnow", lambda: NOW)
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


TOKENS = (
    "total_usd",
    "requests",
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
)


def test_report_since_60d_is_the_same_after_compaction(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with Store(db_path) as store:
        _history(store)
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = db_path.stat().st_size
    db = ("--db", str(db_path))
    before = json.loads(_main(monkeypatch, capsys, "report", "--since", "60d", "--json", *db))
    assert before["resolution"] == {
        "step": "1m",
        "note": "",
        "minutes_since": None,
        "hours_since": None,
    }
    out = json.loads(_main(monkeypatch, capsys, "db", "compact", "--json", *db))
    assert out["vacuumed"] and out["steps"] > 0
    after = json.loads(_main(monkeypatch, capsys, "report", "--since", "60d", "--json", *db))
    assert {k: after[k] for k in TOKENS} == {k: before[k] for k in TOKENS}
    assert after["unpriced"] == before["unpriced"]
    assert after["by_model"] == before["by_model"]
    assert after["gpu"]["cost_usd"] == before["gpu"]["cost_usd"]
    assert after["resolution"]["step"] == "1h" and after["resolution"]["note"]
    assert db_path.stat().st_size < size
    info = json.loads(_main(monkeypatch, capsys, "db", "info", "--json", *db))
    horizon = from_epoch(to_epoch(NOW - timedelta(days=35)) // 3600 * 3600)
    assert info["retention"]["minutes_since"] == horizon.isoformat()
    widths = {r["resolution"]: r for r in info["usage_by_resolution"]}
    assert horizon.isoformat() <= widths["1m"]["first"] < (horizon + timedelta(hours=1)).isoformat()
    assert widths["1h"]["last"] < horizon.isoformat() and "1d" not in widths
    tables = {t["name"]: t for t in info["tables"]}
    assert tables["usage"]["rows"] > 0 and tables["gpu"]["first"] >= horizon.isoformat()
    text = _main(monkeypatch, capsys, "db", "info", *db)
    assert "usage by resolution" in text and "one-minute data since" in text


def test_db_commands_say_what_is_wrong(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("tokentop.tui.cli.utcnow", lambda: NOW)
    assert cli.main(["db", "info", "--db", str(tmp_path / "none.db")]) == 2
    assert "no database" in capsys.readouterr().err
    args = ["db", "compact", "--minutes-days", "0", "--db", str(tmp_path / "x.db")]
    assert cli.main(args) == 2
    assert "--minutes-days" in capsys.readouterr().err


def test_retention_settings() -> None:
    assert parse_config({}).retention == Retention(35, 400)
    assert parse_config({"retention": {"minutes_days": 7, "hours_days": 90}}).retention == (
        Retention(7, 90)
    )
    for bad, needle in (
        ({"minutes_days": 0.5}, "retention.minutes_days"),
        ({"minutes_days": 40, "hours_days": 30}, "retention.hours_days"),
        ({"minutes_days": "a"}, "retention.minutes_days"),
        ({"keep": 1}, "retention.'keep'"),
    ):
        with pytest.raises(ConfigError, match=needle):
            parse_config({"retention": bad})


def test_the_collector_compacts_off_the_poll_path(history: Store) -> None:
    compactor = Compactor(history, Retention(minutes_days=35), clock=lambda: NOW, budget_s=60)
    source = FakeCollector(name="fake", default=Batch())
    runner = Runner(history, [source], PriceBook(), clock=lambda: NOW, periodic=[compactor])
    asyncio.run(runner.run_once_and_close())
    assert source.polls == 1
    assert compactor.done and compactor.steps and compactor.errors == 0
    assert history.get_meta(MINUTES_BEFORE) is not None


def test_a_failing_compaction_is_logged_not_raised(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store(db_path) as store:
        compactor = Compactor(store, Retention(), clock=lambda: NOW)

        def broken(*args: object) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr("tokentop.collectors.compaction.compact_step", broken)
        asyncio.run(compactor.tick())
        assert compactor.errors == 1 and not compactor.done


# Version 2 of the schema: price references as text, usage keyed on (start, series_id, width).
_V2 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '2');
CREATE TABLE series (id INTEGER PRIMARY KEY, source TEXT NOT NULL, provider TEXT NOT NULL,
    model TEXT NOT NULL, project TEXT NOT NULL DEFAULT '', api_key TEXT NOT NULL DEFAULT '',
    workspace TEXT NOT NULL DEFAULT '', tag TEXT NOT NULL DEFAULT '',
    service_tier TEXT NOT NULL DEFAULT '', batch TEXT NOT NULL DEFAULT '',
    context_window TEXT NOT NULL DEFAULT '');
CREATE UNIQUE INDEX series_key ON series (source, provider, model, project, api_key, workspace,
    tag, service_tier, batch, context_window);
CREATE TABLE usage (start INTEGER NOT NULL, series_id INTEGER NOT NULL, width INTEGER NOT NULL,
    input_uncached INTEGER NOT NULL DEFAULT 0, cache_read INTEGER NOT NULL DEFAULT 0,
    cache_write_5m INTEGER NOT NULL DEFAULT 0, cache_write_1h INTEGER NOT NULL DEFAULT 0,
    output INTEGER NOT NULL DEFAULT 0, requests INTEGER NOT NULL DEFAULT 0,
    web_searches INTEGER NOT NULL DEFAULT 0, cost_nano INTEGER NOT NULL DEFAULT 0,
    priced INTEGER NOT NULL, price_ref TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (start, series_id, width)) WITHOUT ROWID;
"""


def _v2_file(path: Path) -> list[tuple[Any, ...]]:
    rows = [
        (
            to_epoch(NOW) - 60 * m,
            1 + m % 3,
            60,
            m,
            0,
            0,
            0,
            2 * m,
            1,
            0,
            1000 * m,
            int(m % 3 != 2),
            f"ref {m % 3}",
        )
        for m in range(1, 300)
    ]
    conn = sqlite3.connect(path)
    conn.executescript(_V2)
    conn.executemany(
        "INSERT INTO series (id, source, provider, model, project) VALUES (?, ?, ?, ?, ?)",
        [
            (1, "oa", "openai", "m1", "p"),
            (2, "oa", "openai", "m2", ""),
            (3, "an", "anthropic", "m3", "p"),
        ],
    )
    conn.executemany(f"INSERT INTO usage VALUES ({', '.join('?' * 13)})", rows)
    conn.commit()
    conn.close()
    return rows


def test_a_version_2_file_is_migrated(db_path: Path) -> None:
    rows = _v2_file(db_path)
    with pytest.raises(StoreError, match="needs upgrading"):
        Store(db_path, readonly=True)
    with Store(db_path) as store:
        assert store.get_meta("schema_version") == "3"
        assert rollup_mismatches(store) == {}
        t = queries.totals(store, NOW - timedelta(days=1), NOW + timedelta(seconds=1))
        assert t.requests == len(rows)
        assert t.cost * 10**9 == sum(r[10] for r in rows)
        assert t.unpriced_tokens == sum(r[3] + r[7] for r in rows if not r[11])
        refs = store.query("SELECT ref FROM price ORDER BY ref")
        assert [r[0] for r in refs] == ["ref 0", "ref 1", "ref 2"]
        store.write_usage([bucket(NOW, source="oa", model="m1", project="p", cost="1")])
        assert store.query("SELECT COUNT(*) FROM series")[0][0] == 3
    with Store(db_path, readonly=True) as viewer:
        assert database_info(viewer).tables
